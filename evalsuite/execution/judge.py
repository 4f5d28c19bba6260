"""The judge: runs a task's tests in a process that never executes model-written code, calling the
candidate (in the sandbox) through the channel.

The verdict is what this process saw: "passed" only when the test code ran to its end and every call
was answered with plain data. The candidate's exit status, output and own claims count for nothing.
The test code runs unchanged: the names it calls that the candidate provides are bound to proxies
that send the arguments as data and return the decoded answer (a fresh builtin value: no object of
the candidate's, no __eq__ of its own). An exception the candidate raised is raised here as the
builtin exception of that name, so tests that expect one still work; a broken call (the program
ended, answered late, answered with something that is not plain data or not a message) raises
CallFailed, which `except Exception` in a test does not catch, and fails the verdict even if the
test goes on.

Standard library only: the harness runs it from source in an isolated interpreter (children.py).
"""

import builtins
import ctypes
import json
import os
import sys
import time
import traceback

from . import channel


class CallFailed(BaseException):
    """A call the candidate did not answer properly. BaseException: a test's `except Exception`
    must not turn a dead or cheating candidate into a pass."""

    def __init__(self, status: str, detail: str, ended: bool = False):
        super().__init__(detail)
        self.status, self.detail, self.ended = status, detail, ended  # ended: the program's process did


class CandidateError(Exception):
    """An exception the candidate raised, of a type that is not a builtin exception."""


class Ref:
    """A name bound on the candidate's side (by the task's setup code), passed to calls by name."""

    def __init__(self, name: str):
        self.name = name


class Candidate:
    def __init__(self, requests_fd: int, answers_fd: int, deadline: float):
        self.requests, self.answers, self.deadline = requests_fd, channel.Reader(answers_fd), deadline
        self.calls, self.failure = 0, None

    def _fail(self, status: str, detail: str, ended: bool = False) -> CallFailed:
        """Record the first broken call (it fails the verdict whatever the test does) and return it."""
        self.failure = CallFailed(status, detail, ended)
        return self.failure

    def _receive(self, what: str) -> dict:
        try:
            return self.answers.read(self.deadline)
        except TimeoutError:
            raise self._fail("timeout", f"no answer to {what} within the time limit") from None
        except EOFError:
            raise self._fail("failed", f"the program ended before answering {what}", ended=True) from None
        except channel.ChannelError as e:
            raise self._fail("failed", f"the answer to {what} is not a valid message: {e}") from None

    def load(self, program: str, setup: str) -> None:
        # The candidate's process says "started" before the program exists there, so silence here is
        # the sandbox failing to start (the harness's error), never the program's doing.
        try:
            self.answers.read(self.deadline)
        except (TimeoutError, EOFError, channel.ChannelError) as e:
            raise self._fail("error", f"the sandbox did not start: {e}") from None
        channel.write_message(self.requests, {"program": program, "setup": setup})
        reply = self._receive("loading the program")
        if reply.get("loaded") is not True:
            raise self._fail("failed", f"the program did not load: {str(reply.get('error'))[:500]}")

    def call(self, name: str, args: tuple, kwargs: dict):
        self.calls += 1
        what = f"call {self.calls} ({name})"
        if self.failure:
            raise self.failure
        try:
            message = {"id": self.calls, "name": name, "kwargs": {k: channel.encode(v) for k, v in kwargs.items()},
                       "args": [{"ref": a.name} if isinstance(a, Ref) else {"value": channel.encode(a)} for a in args]}
        except TypeError as e:  # the test passes something the channel cannot carry: a task the judge can't run
            raise CallFailed("error", f"{what}: the test's argument cannot be sent: {e}") from None
        try:
            channel.write_message(self.requests, message)
        except BrokenPipeError:
            raise self._fail("failed", f"the program ended before {what}", ended=True) from None
        reply = self._receive(what)
        if reply.get("id") != self.calls:
            raise self._fail("failed", f"the answer to {what} is for another call")
        try:
            if "value" in reply:
                return channel.decode(reply["value"])
            if "not_plain" in reply:
                raise self._fail("failed", f"{what} returned something that is not plain data: "
                                 f"{str(reply['not_plain'])[:200]}")
            kind, text = (str(x)[:1000] for x in reply["raised"])
        except (channel.ChannelError, RecursionError, KeyError, ValueError, TypeError) as e:
            raise self._fail("failed", f"the answer to {what} is malformed: {str(e)[:200]}") from None
        exc = getattr(builtins, kind, None)
        if isinstance(exc, type) and issubclass(exc, Exception):
            raise exc(f"{text} (raised by the program)" if text else "(raised by the program)")
        raise CandidateError(f"{kind}: {text} (raised by the program)" if text else f"{kind} (raised by the program)")

    def function(self, name: str):
        def proxy(*args, **kwargs):
            return self.call(name, args, kwargs)
        proxy.__name__ = proxy.__qualname__ = name
        return proxy


def judge(spec: dict, requests_fd: int, answers_fd: int) -> dict:
    candidate = Candidate(requests_fd, answers_fd, time.monotonic() + spec["timeout_s"])
    try:
        candidate.load(spec["program"], spec["setup"])
        namespace = {"__name__": "judge"}
        if spec["prelude"]:  # trusted code the tests use: HumanEval's prompt (helpers such as poly())
            exec(compile(spec["prelude"], "prelude.py", "exec"), namespace)
        namespace.update({name: candidate.function(name) for name in spec["remote"]})
        namespace.update({name: Ref(name) for name in spec["refs"]})
        stdout, sys.stdout = sys.stdout, sys.stderr  # what the tests print is not the verdict
        try:
            exec(compile(spec["test"], "test.py", "exec"), namespace)
        finally:
            sys.stdout = stdout
    except CallFailed as e:
        return {"status": e.status, "detail": e.detail, "calls": candidate.calls, "ended": e.ended}
    except Exception as e:
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "test.py"]
        where = f" (test line {line[-1]})" if line else ""
        try:
            text = str(e) if isinstance(e, CandidateError) else f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except Exception:
            text = type(e).__name__
        return {"status": "failed", "detail": f"{text[:500]}{where}", "calls": candidate.calls}
    if candidate.failure:  # the test swallowed a broken call (a bare except)
        failure = candidate.failure
        return {"status": failure.status, "detail": failure.detail, "calls": candidate.calls, "ended": failure.ended}
    if candidate.calls == 0:  # a test that never called the program says nothing of it
        return {"status": "error", "detail": "the tests made no call to the program", "calls": 0, "ended": False}
    return {"status": "passed", "detail": "", "calls": candidate.calls}


def main(argv: list) -> None:
    # Not dumpable: without the sandbox (execution.sandbox=none) a program running as the same user
    # could otherwise ptrace this process or read its memory and forge the verdict.
    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    getattr(sys, "set_int_max_str_digits", lambda n: None)(channel.MAX_INT_DIGITS)  # Python >= 3.10.7
    spec = json.loads(sys.stdin.read())
    try:
        verdict = judge(spec, int(argv[0]), int(argv[1]))
    except BaseException as e:  # the judge's own failure: the harness records it as an error, not a score
        verdict = {"status": "error", "detail": f"judge: {type(e).__name__}: {str(e)[:300]}", "calls": 0}
    os.write(1, json.dumps(verdict).encode())
