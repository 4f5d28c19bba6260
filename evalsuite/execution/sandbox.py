"""Run one sample: the candidate in the sandbox, the judge beside it, the verdict from the judge.

Per sample, three processes and three pipes, and nothing on the host's disk:
- the sandbox: bubblewrap (new user, PID, network, IPC, UTS and mount namespaces; all capabilities
  dropped; a read-only root with /usr; /dev with null, zero, full, random and urandom only, so no
  pseudo-terminals and no /dev/shm; a size-limited /tmp; no home, no project), with init.py as its
  PID 1 and candidate.py below it, started with a two-variable environment;
- the judge (judge.py, on the host, a different uid when run as root), which holds the test code;
- the channel between them (requests, answers) and the program's output pipe, which the harness
  drains, keeping head and tail and counting the rest, up to the output limit.
The sandbox goes into a cgroup of its own when the machine allows (cgroup.py) and is the kernel's
first choice when memory runs out (oom_score_adj 1000). The harness kills it all at the time limit,
and through the parent-death signal if the harness itself dies.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from . import children
from .cgroup import Cgroups, Sample, write_value

SANDBOXES = ("bwrap", "none")
OUTPUT_KEPT = 4096  # bytes of a program's output kept in the result: the first and the last half
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # all that any child process is given
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child between fork and exec must not dlopen
PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0         # wall clock for the whole sample; everything is killed after it
    cpu_s: int = 10                 # RLIMIT_CPU per process
    memory_mb: int = 1024           # RLIMIT_AS per process; with a cgroup, also all processes and tmpfs together
    processes: int = 32             # RLIMIT_NPROC (and the cgroup's pids.max)
    file_size_mb: int = 16          # RLIMIT_FSIZE per file; also the most a program may print
    tmp_size_mb: int = 64           # the private /tmp
    cpus: float = 1.0               # with a cgroup: CPU time per second, so a sample cannot starve its neighbours

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"execution.{name}={value!r}: expected a number above 0")


@dataclass(frozen=True)
class Program:
    """One sample: `candidate` (model-written code with the prompt it completes) runs in the sandbox;
    `test` (the task's, trusted) runs in the judge and reaches the candidate only through `remote`."""
    candidate: str
    test: str
    remote: tuple[str, ...]         # names the test calls that the candidate provides
    prelude: str = ""               # trusted code run in the judge before the test (HumanEval's prompt: helpers)
    setup: str = ""                 # trusted code run after the candidate, on its side (objects of its classes)
    refs: tuple[str, ...] = ()      # names `setup` binds, passed to calls by name
    unjudgeable: str = ""           # why these tests cannot be run against a candidate in another process


@dataclass
class ExecResult:
    status: str                     # passed | failed | timeout | killed | error (the harness's own failure)
    detail: str = ""                # why it failed, or the limit that stopped it
    seconds: float = 0.0
    output: str = field(default="", repr=False)  # head and tail of what the program printed
    output_bytes: int = 0           # all it printed
    memory_peak_mb: float | None = None  # the sandbox's peak, from its cgroup (None without one)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def interpreter() -> str:
    """The Python that runs programs: the system's /usr/bin/python3 where there is one (the harness's
    own may live in a virtual environment inside the project or a home directory), else the base one."""
    exe = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else (
        getattr(sys, "_base_executable", None) or sys.executable)
    return os.path.realpath(exe)


def bwrap_available() -> str | None:
    """None when bubblewrap runs here; otherwise why not."""
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        probe = subprocess.run([path, *bwrap_args(Limits()), "--", "/bin/true"], capture_output=True, text=True,
                               timeout=30, env=ENV, preexec_fn=_prepare(60999, None))
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap did not start: {e}"
    if probe.returncode != 0:
        return f"bubblewrap failed (exit {probe.returncode}): {probe.stderr.strip()[-300:]}"
    return None


def require_sandbox(sandbox: str) -> None:
    if sandbox not in SANDBOXES:
        raise SandboxError(f"execution.sandbox={sandbox!r}: expected one of {', '.join(SANDBOXES)}")
    if sandbox == "bwrap":
        why = bwrap_available()
        if why:
            raise SandboxError(f"cannot run generated code in a sandbox: {why}. Install bubblewrap, or accept "
                               "running model-written code with rlimits only by setting execution.sandbox=none")


def bwrap_args(limits: Limits) -> list[str]:
    exe = interpreter()
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--as-pid-1", "--clearenv", *(x for k, v in ENV.items() for x in ("--setenv", k, v)),
            "--ro-bind", "/usr", "/usr", "--proc", "/proc",
            # /dev: the five harmless devices and nothing writable (no devpts, no /dev/shm)
            "--size", str(64 << 10), "--tmpfs", "/dev",
            *(x for dev in ("null", "zero", "full", "random", "urandom") for x in ("--dev-bind", f"/dev/{dev}", f"/dev/{dev}")),
            "--remount-ro", "/dev",
            "--size", str(limits.tmp_size_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):  # merged-/usr systems: symlinks into /usr
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(exe))
    for extra in {prefix, os.path.dirname(exe)}:  # a Python installed outside /usr (e.g. /opt/python)
        if not extra.startswith("/usr/") and extra not in ("/usr", "/bin", "/"):
            args += ["--ro-bind", extra, extra]
    return [*args, "--remount-ro", "/"]  # the sandbox's root is an unsized tmpfs: nothing may be written there


def _prepare(uid: int, cgroup: Sample | None, oom_score: int | None = 1000):
    """preexec_fn: into the sample's cgroup, first in line for the OOM killer, as root down to an
    unprivileged uid of our own (the kernel applies no process limit to root, and one uid per worker
    keeps one sample's processes from counting against another's), killed if the harness dies."""
    def prepare():
        if cgroup is not None:
            cgroup.enter()
        if oom_score is not None:
            write_value("/proc/self/oom_score_adj", str(oom_score))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    return prepare


def _candidate_command(limits: Limits, sandbox: str, requests: int, answers: int) -> list[str]:
    init = children.command(interpreter(), "init", limits.cpu_s, limits.memory_mb << 20, limits.processes,
                            limits.file_size_mb << 20, requests, answers)
    init.insert(1, "-u")  # unbuffered: what a program printed before it was killed is not lost
    return init if sandbox == "none" else ["bwrap", *bwrap_args(limits), "--", *init]


class Output:
    """Head and tail of a program's output, and how much there was."""

    def __init__(self):
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = OUTPUT_KEPT // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail = (self.tail + chunk)[-(OUTPUT_KEPT // 2):]

    def text(self) -> str:
        left_out = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {left_out} bytes left out ...]\n".encode() if left_out else b""
        return (self.head + middle + self.tail).decode("utf-8", "replace")


_SPAWNED: set[int] = set()  # pids of the processes we started and have not reaped yet
_SPAWN_LOCK = threading.Lock()


def _spawn(command: list[str], **kwargs) -> subprocess.Popen:
    with _SPAWN_LOCK:
        proc = subprocess.Popen(command, **kwargs)
        _SPAWNED.add(proc.pid)
    return proc


def _kill(proc: subprocess.Popen) -> int:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap and, through its death, the sandbox's PID namespace
    except (ProcessLookupError, PermissionError):
        pass
    rc = proc.wait()
    _SPAWNED.discard(proc.pid)
    return rc


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _stop(sandbox: subprocess.Popen, bwrap: bool) -> int:
    """End a sandbox: kill the candidate (init's child), so that init kills and reaps all the rest and
    exits, as it does whenever the candidate ends; everything is killed at once if that takes over a
    second (bubblewrap's child is the init; without bubblewrap the process is the init)."""
    if sandbox.poll() is None:
        for init in _children(sandbox.pid) if bwrap else [sandbox.pid]:
            for pid in _children(init):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            sandbox.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    return _kill(sandbox)


def reap_orphans() -> None:
    """As PID 1 (a container without an init), the processes left when a sandbox's PID namespace dies
    are handed to us: reap those that are not ours (ours are reaped by their Popen)."""
    if os.getpid() != 1:
        return
    with _SPAWN_LOCK:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in _SPAWNED:
                continue
            try:
                state, ppid = open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[:2]
            except (OSError, ValueError):
                continue
            if state == "Z" and ppid == "1":
                try:
                    os.waitpid(int(entry), os.WNOHANG)
                except ChildProcessError:
                    pass


def run_one(program: Program, limits: Limits = Limits(), sandbox: str = "bwrap", uid: int = 61000,
            cgroups: Cgroups | None = None) -> ExecResult:
    if program.unjudgeable:  # the harness cannot judge it: an error, never a failure of the candidate
        return ExecResult("error", program.unjudgeable)
    t0 = time.monotonic()
    sample = cgroups.create(limits.memory_mb << 20, limits.processes + 2, limits.cpus) if cgroups else None
    try:
        candidate, judge, out_r = _start(limits, sandbox, uid, sample)
        try:
            judged, rc, output, timed_out, too_much = _watch(program, limits, sandbox, candidate, judge, out_r, t0)
        finally:  # on every path: nothing of the sample outlives it
            _stop(candidate, sandbox == "bwrap")
            _kill(judge)
            judge.stdout.close()
            os.close(out_r)
    finally:
        peak = sample.memory_peak() if sample else None
        oom = sample.oom_killed() if sample else False
        if sample:
            sample.remove()
        reap_orphans()
    result = _classify(judged, rc, timed_out, too_much, oom, limits)
    result.seconds, result.output, result.output_bytes = time.monotonic() - t0, output.text(), output.total
    result.memory_peak_mb = round(peak / 2**20, 1) if peak is not None else None
    return result


def _start(limits: Limits, sandbox: str, uid: int, sample: Sample | None):
    """The sandbox and the judge, joined by the channel's two pipes; the program's output pipe."""
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    out_r, out_w = os.pipe()
    candidate = None
    try:
        candidate = _spawn(_candidate_command(limits, sandbox, requests_r, answers_w), stdin=subprocess.DEVNULL,
                           stdout=out_w, stderr=out_w, pass_fds=(requests_r, answers_w), env=ENV, cwd="/",
                           start_new_session=True, preexec_fn=_prepare(uid, sample))
        judge = _spawn(children.command(interpreter(), "judge", requests_w, answers_r), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(requests_w, answers_r),
                       env=ENV, cwd="/", start_new_session=True, preexec_fn=_prepare(uid + 1000, None, None))
    except BaseException:
        if candidate is not None:
            _stop(candidate, sandbox == "bwrap")
        os.close(out_r)
        raise
    finally:  # the children hold their own copies
        for fd in (requests_r, requests_w, answers_r, answers_w, out_w):
            os.close(fd)
    return candidate, judge, out_r


def _watch(program: Program, limits: Limits, sandbox: str, candidate: subprocess.Popen, judge: subprocess.Popen,
           out_r: int, t0: float):
    """Give the judge its tests, drain the program's output, wait for the verdict (or the time limit)."""
    spec = {"program": program.candidate, "setup": program.setup, "prelude": program.prelude, "test": program.test,
            "remote": list(program.remote), "refs": list(program.refs), "timeout_s": limits.timeout_s}
    try:
        judge.stdin.write(json.dumps(spec).encode())  # ASCII: a lone surrogate travels escaped
        judge.stdin.close()
    except BrokenPipeError:
        pass  # the judge died at once; it gives no verdict, which is an error
    output, verdict, timed_out, too_much = Output(), bytearray(), False, False
    deadline = t0 + limits.timeout_s + 2  # the judge keeps its own deadline; this one is for a stuck judge
    open_fds = {out_r, judge.stdout.fileno()}
    while judge.stdout.fileno() in open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for fd in select.select(list(open_fds), [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
            elif fd == out_r:
                output.add(chunk)
                if output.total > limits.file_size_mb << 20 and not too_much:
                    too_much = True
                    _stop(candidate, sandbox == "bwrap")  # the judge then sees the program end
            elif len(verdict) < 1 << 16:
                verdict += chunk
    judged = _parse(verdict) if not timed_out else None
    if judged and judged.get("ended") is True:
        try:  # the program ended by itself: wait for its status, which says how
            candidate.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    rc = candidate.poll()
    _stop(candidate, sandbox == "bwrap")
    while out_r in open_fds and select.select([out_r], [], [], 0)[0]:  # what is left in the pipe
        chunk = os.read(out_r, 1 << 16)
        if not chunk:
            break
        output.add(chunk)
    return judged, rc, output, timed_out, too_much


def _parse(verdict: bytes) -> dict | None:
    try:
        judged = json.loads(verdict)
    except ValueError:
        return None
    return judged if isinstance(judged, dict) and isinstance(judged.get("status"), str) else None


SIGNALS = {signal.SIGXCPU: "CPU time limit {cpu_s}s", signal.SIGXFSZ: "file size limit {file_size_mb} MB",
           signal.SIGKILL: "killed (SIGKILL: past the CPU hard limit {cpu_s}s + 1, or by the system)",
           signal.SIGSEGV: "segmentation fault (memory limit {memory_mb} MB?)"}


def _classify(judged: dict | None, rc: int | None, timed_out: bool, too_much: bool, oom: bool,
              limits: Limits) -> ExecResult:
    """The judge's verdict decides a pass; for the rest, the most specific reason the host saw."""
    if judged and judged["status"] == "passed":
        return ExecResult("passed")
    if timed_out or (judged and judged["status"] == "timeout"):
        return ExecResult("timeout", f"wall-clock limit {limits.timeout_s:g}s")
    if too_much:
        return ExecResult("killed", f"output limit {limits.file_size_mb} MB")
    if oom:
        return ExecResult("killed", f"memory limit {limits.memory_mb} MB (the sandbox's cgroup)")
    if judged is None:
        return ExecResult("error", "the judge gave no verdict")
    detail = str(judged.get("detail", ""))
    if judged.get("ended") is True and rc is not None:
        # bubblewrap and our init report a program killed by signal N as 128 + N
        sig = -rc if rc < 0 else (rc - 128 if 128 < rc < 160 else None)
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return ExecResult("killed", SIGNALS.get(sig, "signal " + name).format(**limits.__dict__))
        detail += f" (exit status {rc})"
    if judged["status"] not in ("failed", "error"):
        return ExecResult("error", f"the judge's verdict {judged['status'][:40]!r} is unknown")
    if "MemoryError" in detail:
        detail += f" (memory limit {limits.memory_mb} MB)"
    elif "File too large" in detail:  # Python ignores SIGXFSZ, so the write fails instead
        detail += f" (file size limit {limits.file_size_mb} MB)"
    return ExecResult(judged["status"], detail)
