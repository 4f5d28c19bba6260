"""Command lines of the child processes (the sandbox's init and candidate, the judge).

Each runs an interpreter in isolated mode without site-packages (`-I -S`): nothing from the harness's
environment, virtual environment or working directory is imported. The modules it needs (standard
library only) are passed as source in the command line and installed under their package names, so
that `from . import channel` works there as it does in the harness.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).parent

_BOOT = """
import sys, types
for name in ("evalsuite", "evalsuite.execution"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = []
for name, source in SOURCES:
    module = types.ModuleType("evalsuite.execution." + name)
    module.__package__ = "evalsuite.execution"
    sys.modules[module.__name__] = module
    setattr(sys.modules["evalsuite.execution"], name, module)
    exec(compile(source, "<" + name + ".py>", "exec"), module.__dict__)
sys.modules["evalsuite.execution." + SOURCES[-1][0]].main(sys.argv[1:])
"""


NEEDS = {"judge": ("channel", "judge"), "init": ("channel", "candidate", "init")}  # main module last


@cache
def _script(module: str) -> str:
    sources = [(n, (HERE / f"{n}.py").read_text()) for n in NEEDS[module]]
    return f"SOURCES = {sources!r}\n{_BOOT}"


def command(python: str, module: str, *args: str) -> list[str]:
    """`python -I -S -c BOOT args...` running `module`'s main(args), with the modules it imports."""
    return [python, "-I", "-S", "-c", _script(module), *map(str, args)]
