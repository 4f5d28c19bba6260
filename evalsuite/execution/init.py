"""PID 1 of the sandbox (bubblewrap --as-pid-1): forks the candidate under its limits, reaps every
process of the PID namespace, and when the candidate ends, kills and reaps all the others and exits.
(With execution.sandbox=none it is not PID 1 and only starts, limits and waits.)

It makes itself non-dumpable first, so that the program (same uid, no capabilities) can neither
ptrace it nor read its /proc/1/mem or /proc/1/environ; the kernel ignores every signal the program
sends it (PID 1 installs no handler). Its exit status is the candidate's: the code, or 128 + the
signal that killed it.

Standard library only: run from source with the system's interpreter (children.py).
"""

import ctypes
import os
import resource
import signal
import sys
import traceback

from . import candidate

PR_SET_DUMPABLE = 4


def set_limits(cpu_s: int, memory: int, processes: int, file_size: int) -> None:
    """Soft and hard values alike (the CPU hard limit a second later: SIGXCPU first, then SIGKILL);
    no capability is left to raise them again."""
    for lim, v in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, processes),
                   (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_MEMLOCK, 0), (resource.RLIMIT_MSGQUEUE, 0)):
        resource.setrlimit(lim, (v, v))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def main(argv: list) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        os.write(2, b"sandbox init: prctl(PR_SET_DUMPABLE) failed\n")
        os._exit(125)
    cpu_s, memory, processes, file_size, requests, answers = (int(a) for a in argv[:6])
    child = os.fork()
    if child == 0:  # the candidate: this interpreter, forked (one start-up less than an exec)
        code = 126
        try:
            libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # nothing of init's is left to protect here
            set_limits(cpu_s, memory, processes, file_size)
            candidate.main([requests, answers])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    status = None
    while status is None:  # reap orphans until the candidate itself ends
        pid, st = os.wait()
        if pid == child:
            status = st
    if os.getpid() == 1:
        # Kill and reap everything left before exiting: what PID 1 leaves behind when it exits is
        # killed by the kernel but handed, unreaped, to the host's init.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:  # nothing else is left
            pass
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)
