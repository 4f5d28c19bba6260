"""Sandboxed execution of generated code: the reference solutions pass, wrong ones fail, and hostile
programs neither harm the host nor the harness.

Needs bubblewrap; without it these tests skip with the reason, except where EVALSUITE_REQUIRE_TOOLS=1
(CI sets it, after installing bubblewrap) turns the missing sandbox into a failure.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from evalsuite import data, execution, scorers
from evalsuite.execution import Limits, run_all, run_one

WHY_NOT = execution.bwrap_available()
if WHY_NOT and os.environ.get("EVALSUITE_REQUIRE_TOOLS") == "1":
    raise RuntimeError(f"EVALSUITE_REQUIRE_TOOLS=1 but {WHY_NOT}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no sandbox here: {WHY_NOT}")

FAST = Limits(timeout_s=5, cpu_s=4)
PROJECT = Path(__file__).resolve().parents[1]


def test_reference_solutions_pass_and_a_wrong_one_fails():
    he = data.load_local("humaneval/test.jsonl.gz").rows
    mbpp = data.load_local("mbpp/test.jsonl.gz").rows
    assert len(he) == 164 and len(mbpp) == 500
    programs = [scorers.humaneval_program(d["canonical_solution"], d) for d in he]
    programs += [scorers.mbpp_program(d["code"], d) for d in mbpp]
    # Wrong: HumanEval/0 answering the opposite; MBPP 11 with the body of another task.
    programs.append(scorers.humaneval_program("    return not any(abs(a - b) < threshold for a in numbers for b in numbers)\n", he[0]))
    programs.append(scorers.mbpp_program(mbpp[1]["code"], mbpp[0]))
    results = run_all(programs, Limits(timeout_s=20, cpu_s=20))
    failed = [(i, r.status, r.detail) for i, r in enumerate(results[:-2]) if not r.passed]
    assert failed == []
    assert [r.status for r in results[-2:]] == ["failed", "failed"]
    assert "AssertionError" in results[-2].detail


def test_result_says_why_a_program_failed():
    assert run_one("raise ValueError('bad input')", FAST).detail == "ValueError: bad input"
    assert run_one("def f(:\n  pass", FAST).detail.startswith("SyntaxError")
    r = run_one("import os; os._exit(3)", FAST)
    assert r.status == "failed" and r.detail == "exit status 3"
    r = run_one("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", FAST)
    assert r.status == "killed" and "segmentation fault" in r.detail


@pytest.fixture
def marker():
    """A file in the project's tree and one in the home directory that no program may touch."""
    files = [PROJECT / ".sandbox-marker", Path.home() / ".evalsuite-sandbox-secret"]
    for f in files:
        f.write_text("untouched")
    yield files
    for f in files:
        assert f.read_text() == "untouched", f"{f} was changed by a sandboxed program"
        f.unlink()


def hostile(marker) -> dict[str, str]:
    project_file, home_file = marker
    return {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "infinite loop": "while True:\n    pass\n",
        "8 GB allocation": "block = bytearray(8 * 1024 ** 3)\n",
        "write into the project": f"open({str(project_file)!r}, 'w').write('owned')\n",
        "delete in the project": f"import os\nos.remove({str(project_file)!r})\n",
        "write a new file outside": f"open({str(PROJECT / 'sandbox-escape.txt')!r}, 'w').write('x')\n",
        "write into the system": "open('/usr/sandbox-escape.txt', 'w').write('x')\n",
        "read the home directory": f"print(open({str(home_file)!r}).read())\n",
        "delete in the home directory": f"import os\nos.remove({str(home_file)!r})\n",
        "kill the parent": f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({os.getpid()}, signal.SIGKILL)\n"
                           "os.kill(-1, signal.SIGKILL)\n",
        "print 1 GB": "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)\n",
    }


def test_hostile_programs_fail_and_leave_the_host_unchanged(marker):
    progs = hostile(marker)
    before = sorted(p.name for p in PROJECT.iterdir())
    results = run_all(list(progs.values()), Limits(timeout_s=5, cpu_s=4, memory_mb=1024))
    by_name = dict(zip(progs, results))
    assert all(not r.passed for r in results), {k: r.status for k, r in by_name.items()}
    # Spinning ends at the CPU limit or the wall-clock limit, whichever the machine's load makes first;
    # the fork bomb's forks fail at the process limit, so it spins too.
    for name in ("infinite loop", "fork bomb"):
        r = by_name[name]
        assert (r.status, r.detail) in (("timeout", "wall-clock limit 5s"), ("killed", "CPU time limit 4s")), r
    assert "MemoryError" in by_name["8 GB allocation"].detail and "1024 MB" in by_name["8 GB allocation"].detail
    assert "untouched" not in by_name["read the home directory"].output
    assert "file size limit" in by_name["print 1 GB"].detail
    assert len(by_name["print 1 GB"].output) < 2 * execution.OUTPUT_KEPT  # the harness kept only head and tail
    assert sorted(p.name for p in PROJECT.iterdir()) == before
    assert not Path("/usr/sandbox-escape.txt").exists()
    # The harness is alive (this line runs), and nothing a program started is left running.
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).endswith("/sandbox/program.py")]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_no_network_not_even_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(_accept(server)))
    t.start()
    r = run_one(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n", FAST)
    t.join()
    server.close()
    assert r.status == "failed" and "Connection refused" in r.detail
    assert accepted == [None]


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_missing_bubblewrap_is_a_clear_error_unless_opted_out(monkeypatch):
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    with pytest.raises(execution.SandboxError, match="bubblewrap is not installed.*execution.sandbox=none"):
        run_all(["pass"])
    assert run_all(["pass", "assert False"], sandbox="none")[0].passed  # the explicit opt-out still runs
    with pytest.raises(execution.SandboxError, match="execution.sandbox='docker'"):
        run_all(["pass"], sandbox="docker")
