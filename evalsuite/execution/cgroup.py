"""One cgroup per sandbox: a bound on everything its processes hold together (memory including tmpfs,
shared memory, memfds and kernel memory such as inodes; the number of processes; CPU time per
second), which per-process rlimits cannot give.

Layout: <the harness's own cgroup, or its parent>/evalsuite-<harness pid>/sample-<n>. Only cgroups
that evalsuite creates are written to; existing ones are never moved or changed. A run removes its
own at the end; the next run removes those of runs that died (their harness pid is gone). Works on
cgroup v2 where memory and pids are enabled for the chosen parent (systemd machines as root, or a
delegated subtree), and on cgroup v1 with the memory and pids hierarchies (cpu when mounted).
Elsewhere `Cgroups.find()` says why not, and the sandbox runs with rlimits only (results.json says so).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

CPU_PERIOD_US = 100_000


def _controllers_v1() -> dict[str, Path]:
    """controller -> the directory of this process's cgroup in that v1 hierarchy."""
    mounts, own = {}, {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _, opts) = left.split(), right.split(" ", 2)
        if fstype == "cgroup":
            for c in opts.strip().split(","):
                mounts[c] = (fields[3], Path(fields[4]))
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for c in names.split(","):
            own[c] = path
    found = {}
    for c in ("memory", "pids", "cpu"):
        if c in mounts and c in own:
            root, mountpoint = mounts[c]
            rel = own[c][len(root):] if own[c].startswith(root) and root != "/" else own[c]
            found[c] = mountpoint / rel.lstrip("/")
    return found


def _controllers_v2() -> dict[str, Path]:
    """controller -> a cgroup v2 directory whose children get it: this process's own cgroup, or its
    parent (a sibling of ours: a cgroup with processes cannot enable controllers for children).
    Empty unless memory and pids are both there."""
    mount = next((Path(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.partition(" - ")[2].startswith("cgroup2 ")), None)
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), None)
    if mount is None or own is None:
        return {}
    here = mount / own.lstrip("/")
    for d in (here, here.parent):
        try:
            enabled = set((d / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        if {"memory", "pids"} <= enabled:
            return {c: d for c in ("memory", "pids", "cpu") if c in enabled}
    return {}


def write_value(path: str | Path, value: str) -> None:
    """One write(2), as cgroup and /proc files want; safe between fork and exec (no Python I/O objects)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pids(d: Path) -> list[int]:
    try:
        return [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _remove(d: Path) -> None:
    """Kill what is left in d (and below) and remove it."""
    if not d.is_dir():
        return
    for sub in [p for p in d.iterdir() if p.is_dir()]:
        _remove(sub)
    for wait in [0.001 * 2 ** i for i in range(6)] + [0.05] * 40:
        for pid in _pids(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(wait)  # the killed processes are still exiting
    raise OSError(f"could not remove cgroup {d}: processes {_pids(d)} still in it")


class Sample:
    """The cgroup of one sandbox: `dirs` are its directories (one per v1 hierarchy, or one in v2)."""

    def __init__(self, dirs: list[Path], version: int):
        self.dirs, self.version = dirs, version

    def enter(self) -> None:
        """Move the calling process in; runs in the child between fork and exec (preexec_fn)."""
        for d in self.dirs:
            write_value(d / "cgroup.procs", str(os.getpid()))

    def _read(self, name: str) -> str | None:
        for d in self.dirs:
            if (d / name).exists():
                try:
                    return (d / name).read_text()
                except OSError:
                    return None
        return None

    def memory_peak(self) -> int | None:
        """Bytes: the most the sandbox held at once, read from the host."""
        text = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(text) if text and text.strip().isdigit() else None

    def oom_killed(self) -> bool:
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return bool(m and int(m.group(1)))

    def remove(self) -> None:
        for d in self.dirs:
            _remove(d)


class Cgroups:
    """The cgroups of this harness process: create one per sandbox with the limits."""

    def __init__(self, bases: dict[str, Path], version: int):
        self.version, self.counter, self.lock = version, 0, threading.Lock()  # workers create samples concurrently
        self.run_dirs = {c: b / f"evalsuite-{os.getpid()}" for c, b in bases.items()}

    @property
    def controllers(self) -> list[str]:
        return sorted(self.run_dirs)

    def describe(self) -> str:
        parents = {c: d.parent for c, d in sorted(self.run_dirs.items())}
        if len(set(parents.values())) == 1:
            return f"cgroup v{self.version} ({', '.join(parents)}) under {next(iter(parents.values()))}"
        return f"cgroup v{self.version}: " + ", ".join(f"{c} under {p}" for c, p in parents.items())

    @classmethod
    def find(cls) -> tuple[Cgroups | None, str]:
        """(cgroups, description) or (None, why not): the first layout that works here, checked by
        creating a cgroup and moving a process into it."""
        why = []
        for version, find_bases in ((2, _controllers_v2), (1, _controllers_v1)):
            bases = find_bases()
            if not {"memory", "pids"} <= set(bases):
                why.append(f"cgroup v{version}: no cgroup whose children get the memory and pids controllers")
                continue
            candidate = cls(bases, version)
            problem = candidate._probe()
            if problem is None:
                return candidate, candidate.describe()
            why.append(f"cgroup v{version}: {problem}")
        return None, "; ".join(why)

    def _probe(self) -> str | None:
        try:
            sample = self.create(memory=64 << 20, processes=4, cpus=1)
            try:
                subprocess.run(["/bin/true"], preexec_fn=sample.enter, check=True, timeout=30)
            finally:
                sample.remove()
            return None
        except (OSError, subprocess.SubprocessError) as e:
            self.remove()
            return str(e)

    def create(self, memory: int, processes: int, cpus: float) -> Sample:
        with self.lock:
            self.counter += 1
            return self._create(self.counter, memory, processes, cpus)

    def _create(self, n: int, memory: int, processes: int, cpus: float) -> Sample:
        dirs = []
        try:
            for c, run_dir in sorted(self.run_dirs.items()):
                if not run_dir.is_dir():
                    run_dir.mkdir()
                    if self.version == 2:  # children of our own run directory get the controllers
                        have = set((run_dir / "cgroup.controllers").read_text().split())
                        write_value(run_dir / "cgroup.subtree_control",
                               " ".join(f"+{x}" for x in ("memory", "pids", "cpu") if x in have))
                d = run_dir / f"sample-{n}"
                if d in dirs:
                    continue
                d.mkdir()
                dirs.append(d)
            sample = Sample(dirs, self.version)
            self._limit(sample, memory, processes, cpus)
        except OSError:
            for d in dirs:
                _remove(d)
            raise
        return sample

    def _limit(self, sample: Sample, memory: int, processes: int, cpus: float) -> None:
        quota = int(CPU_PERIOD_US * cpus)
        if self.version == 2:
            settings = [("memory.max", memory), ("memory.swap.max", 0), ("memory.oom.group", 1),
                        ("pids.max", processes), ("cpu.max", f"{quota} {CPU_PERIOD_US}")]
        else:
            settings = [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),
                        ("pids.max", processes), ("cpu.cfs_period_us", CPU_PERIOD_US), ("cpu.cfs_quota_us", quota)]
        for name, value in settings:
            path = next((x / name for x in sample.dirs if (x / name).exists()), None)
            if path is None:
                if name in ("memory.max", "memory.limit_in_bytes", "pids.max"):  # the bounds that matter
                    raise OSError(f"{name} missing in {sample.dirs}")
                continue  # swap accounting off, cpu controller absent, older kernel
            write_value(path, str(value))

    def remove(self) -> None:
        """This run's cgroups, with whatever is left in them."""
        for run_dir in set(self.run_dirs.values()):
            _remove(run_dir)


def sweep(run_dirs) -> None:
    """Remove the evalsuite-<pid> cgroups beside the given ones whose harness is gone, killing what
    is left in them."""
    for run_dir in set(run_dirs):
        for d in run_dir.parent.glob("evalsuite-*"):
            pid = d.name.removeprefix("evalsuite-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _remove(d)
