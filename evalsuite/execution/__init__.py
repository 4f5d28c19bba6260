"""Run model-written programs (HumanEval, MBPP) and judge them from outside: a sample passes only when
the task's tests, run in a trusted process of ours, saw every call answered correctly.

- channel.py: the plain-data protocol between the judge and the candidate
- judge.py: runs the tests (on the host), calling the candidate through the channel
- candidate.py, init.py: the candidate's side and PID 1, inside the sandbox
- sandbox.py: bubblewrap, the processes and pipes of one sample, the verdict
- cgroup.py: one cgroup per sandbox where the machine allows it
- children.py: how the child processes start (isolated interpreters, modules passed as source)

`sandbox="none"` runs the same processes without bubblewrap (rlimits, a cgroup where possible,
timeout): only for machines where bubblewrap cannot run, by explicit choice, recorded in results.json.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from tqdm import tqdm

from .cgroup import Cgroups, sweep
from .sandbox import (OUTPUT_KEPT, SANDBOXES, ExecResult, Limits, Program, SandboxError, bwrap_available, interpreter,
                      reap_orphans, require_sandbox, run_one)

__all__ = ["OUTPUT_KEPT", "SANDBOXES", "ExecResult", "Limits", "Program", "SandboxError", "bwrap_available",
           "containment", "interpreter", "require_sandbox", "run_all", "run_one"]


@cache
def machine_cgroups() -> tuple[Cgroups | None, str]:
    return Cgroups.find()


def containment() -> dict:
    """What bounds a sandbox on this machine, for results.json and the report."""
    cgroups, how = machine_cgroups()
    if cgroups is None:
        return {"cgroup": None, "why_no_cgroup": how,
                "bounds": "per process only: address space, CPU seconds, file size, open files; processes per uid; "
                          "/tmp size; wall clock. NOT bounded: memory of all processes together (forks, tmpfs, "
                          "shared memory, memfds, kernel memory), CPU share against other samples"}
    return {"cgroup": how, "bounds": f"per sandbox ({', '.join(cgroups.controllers)}): memory of all its processes "
            "with tmpfs, shared memory and kernel memory, process count" + (", CPU share" if "cpu" in cgroups.controllers
                                                                         else "") +
            "; per process: address space, CPU seconds, file size, open files; /tmp size; wall clock"}


def run_all(programs: list[Program], limits: Limits = Limits(), sandbox: str = "bwrap", workers: int | None = None,
            progress: bool = False) -> list[ExecResult]:
    """Run programs in parallel (one worker per core by default), results in input order. A failure
    of the harness's own machinery for one sample is that sample's "error", never the run's."""
    require_sandbox(sandbox)
    workers = workers or os.cpu_count() or 1
    uids: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        uids.put(61000 + i)
    cgroups, _ = machine_cgroups()
    if cgroups is not None:
        sweep(cgroups.run_dirs.values())  # the cgroups of runs that were killed

    def work(program: Program) -> ExecResult:
        uid = uids.get()
        try:
            return run_one(program, limits, sandbox, uid, cgroups)
        except Exception as e:  # noqa: BLE001 -- one sample's trouble, recorded with it
            return ExecResult("error", f"the harness could not run this sample: {type(e).__name__}: {e}")
        finally:
            uids.put(uid)

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(work, programs), total=len(programs), desc="execute", unit="prog",
                             disable=not progress))
    finally:
        if cgroups is not None:
            cgroups.remove()
        reap_orphans()
