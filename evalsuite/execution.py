"""Run model-written programs (HumanEval, MBPP) in isolation and say whether each passed.

Each program runs in its own process inside a bubblewrap sandbox: new user, PID, network, IPC and UTS
namespaces (no network: only a private loopback), a read-only view of /usr and the Python installation,
a private size-limited /tmp, no view of the home directory or the project, all capabilities dropped,
no further user namespaces. Inside, a launcher sets rlimits (CPU seconds, address space, processes,
file size, open files, no core dumps) before it execs the program, and the harness kills the whole
sandbox after a wall-clock timeout. When the harness runs as root, each worker also drops to its own
unprivileged uid, because the kernel does not enforce the process limit on root.

`sandbox="none"` runs the same launcher without bubblewrap (rlimits and timeout only): only for
machines where bubblewrap cannot run, by explicit choice, and recorded in results.json.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

SANDBOXES = ("bwrap", "none")
OUTPUT_KEPT = 4096  # bytes of a program's output kept in the result (the rest is read and dropped)


class SandboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0         # wall clock, whole sandbox killed after it
    cpu_s: int = 10                 # RLIMIT_CPU
    memory_mb: int = 1024           # RLIMIT_AS
    processes: int = 32             # RLIMIT_NPROC (counted inside the sandbox's user namespace)
    file_size_mb: int = 16          # RLIMIT_FSIZE, also caps what a program can print
    tmp_size_mb: int = 64           # size of the private /tmp


@dataclass
class ExecResult:
    status: str                     # passed | failed | timeout | killed | error (the sandbox itself failed)
    detail: str = ""                # the exception's last line, or the limit that stopped the program
    seconds: float = 0.0
    output: str = field(default="", repr=False)  # the first OUTPUT_KEPT bytes of stdout and stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs inside the sandbox as `python -I -S -c LAUNCHER <limits...> <program path>`: the limits are set on
# soft and hard values (the CPU hard limit one second later; limits cannot be raised again without
# CAP_SYS_RESOURCE, which is dropped), then the interpreter is replaced by a fresh one running the program.
LAUNCHER = """
import os, resource, sys
cpu, mem, nproc, fsize, prog = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
               (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (v, v))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the limit; SIGKILL a second later
os.execv(sys.executable, [sys.executable, "-I", prog])
"""


def interpreter() -> tuple[str, str]:
    """The Python that runs programs, and its installation prefix (bound read-only into the sandbox):
    the system's /usr/bin/python3 where there is one, since the harness's own interpreter may live in
    a virtual environment inside the project or under a home directory; else the base interpreter."""
    exe = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else (
        getattr(sys, "_base_executable", None) or sys.executable)
    exe = os.path.realpath(exe)
    return exe, os.path.dirname(os.path.dirname(exe))


def bwrap_available() -> str | None:
    """None when bubblewrap runs here; otherwise why not."""
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        probe = subprocess.run([path, *_bwrap_args(), "--", "/bin/true"], capture_output=True, text=True, timeout=30,
                               preexec_fn=_drop_root(60999))
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap did not start: {e}"
    if probe.returncode != 0:
        return f"bubblewrap failed (exit {probe.returncode}): {probe.stderr.strip()[-300:]}"
    return None


def _bwrap_args(tmp_mb: int = 64) -> list[str]:
    exe, prefix = interpreter()
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
            "--size", str(tmp_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):  # merged-/usr systems: symlinks into /usr
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for extra in {prefix, os.path.dirname(exe)}:  # a Python installed outside /usr (e.g. /opt/python)
        if not extra.startswith("/usr/") and extra not in ("/usr", "/bin", "/"):
            args += ["--ro-bind", extra, extra]
    return args


def _drop_root(uid: int):
    """preexec_fn: as root, become an unprivileged uid of our own (the process limit is not applied to
    root, and a fresh uid keeps one program's processes from counting against another's)."""
    def pre():
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return pre


def _command(program_path: str, inner_path: str, limits: Limits, sandbox: str) -> list[str]:
    exe, _ = interpreter()
    launch = [exe, "-I", "-S", "-c", LAUNCHER, str(limits.cpu_s), str(limits.memory_mb << 20),
              str(limits.processes), str(limits.file_size_mb << 20), inner_path]
    if sandbox == "none":
        return launch
    return ["bwrap", *_bwrap_args(limits.tmp_size_mb), "--ro-bind", program_path, inner_path, "--", *launch]


def _classify(rc: int | None, timed_out: bool, output: str, limits: Limits, seconds: float,
              output_full: bool = False) -> ExecResult:
    if timed_out:
        return ExecResult("timeout", f"wall-clock limit {limits.timeout_s:g}s", seconds, output)
    # bubblewrap reports a child killed by signal N as exit status 128 + N.
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and 128 < rc < 160 else None)
    if rc == 0:
        return ExecResult("passed", "", seconds, output)
    if sig is not None:
        why = {signal.SIGXCPU: f"CPU time limit {limits.cpu_s}s", signal.SIGXFSZ: f"file size limit {limits.file_size_mb} MB",
               signal.SIGKILL: f"killed (SIGKILL: past the CPU hard limit {limits.cpu_s + 1}s, or by the system)", signal.SIGSEGV: f"segmentation fault (memory limit {limits.memory_mb} MB?)"}
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return ExecResult("killed", why.get(sig, f"signal {name}"), seconds, output)
    if output_full:  # not even the traceback fits any more
        return ExecResult("failed", f"output reached the file size limit {limits.file_size_mb} MB", seconds, output)
    last = [ln for ln in output.strip().splitlines() if ln.strip()]
    detail = last[-1][:300] if last else f"exit status {rc}"
    if "MemoryError" in detail:
        detail += f" (memory limit {limits.memory_mb} MB)"
    elif "File too large" in detail:  # Python ignores SIGXFSZ, so the write fails instead
        detail += f" (file size limit {limits.file_size_mb} MB)"
    return ExecResult("failed", detail, seconds, output)


def run_one(program: str, limits: Limits = Limits(), sandbox: str = "bwrap", uid: int = 61000) -> ExecResult:
    with tempfile.TemporaryDirectory(prefix="evalsuite-exec-") as host_dir:
        os.chmod(host_dir, 0o755)
        prog = Path(host_dir) / "program.py"
        prog.write_text(program)
        prog.chmod(0o444)
        inner = "/sandbox/program.py" if sandbox == "bwrap" else str(prog)
        # Output goes to a file in the host directory: RLIMIT_FSIZE bounds it, and the harness never
        # holds more than OUTPUT_KEPT bytes of it in memory.
        out_path = Path(host_dir) / "output"
        t0 = time.perf_counter()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(_command(str(prog), inner, limits, sandbox), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=host_dir if sandbox == "none" else "/", preexec_fn=_drop_root(uid),
                                    env={"PATH": "/usr/bin:/bin", "HOME": host_dir} if sandbox == "none" else None)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
            finally:
                # The whole process group (bubblewrap, and through its death signal the sandbox's PID
                # namespace): nothing a program started outlives its run.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.perf_counter() - t0
        with open(out_path, "rb") as fh:  # head and tail: the exception is at the end of a long output
            size = out_path.stat().st_size
            output = fh.read(OUTPUT_KEPT // 2)
            if size > OUTPUT_KEPT:
                fh.seek(size - OUTPUT_KEPT // 2)
                output += f"\n[... {size - OUTPUT_KEPT} bytes left out ...]\n".encode() + fh.read()
            elif size > OUTPUT_KEPT // 2:
                output += fh.read()
            output = output.decode("utf-8", "replace")
    return _classify(rc, timed_out, output, limits, seconds, size >= limits.file_size_mb << 20)


def require_sandbox(sandbox: str) -> None:
    if sandbox not in SANDBOXES:
        raise SandboxError(f"execution.sandbox={sandbox!r}: expected one of {', '.join(SANDBOXES)}")
    if sandbox == "bwrap":
        why = bwrap_available()
        if why:
            raise SandboxError(f"cannot run generated code in a sandbox: {why}. Install bubblewrap, or accept "
                               "running model-written code with rlimits only by setting execution.sandbox=none")


def run_all(programs: list[str], limits: Limits = Limits(), sandbox: str = "bwrap", workers: int | None = None,
            progress: bool = False) -> list[ExecResult]:
    """Run programs in parallel (one worker per core by default), results in input order."""
    require_sandbox(sandbox)
    workers = workers or os.cpu_count() or 1
    uids: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        uids.put(61000 + i)

    def work(program: str) -> ExecResult:
        uid = uids.get()
        try:
            return run_one(program, limits, sandbox, uid)
        except OSError as e:
            return ExecResult("error", f"could not start the program: {e}")
        finally:
            uids.put(uid)

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(work, programs), total=len(programs), desc="execute", unit="prog",
                         disable=not progress))
