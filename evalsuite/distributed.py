"""Data parallel evaluation under torchrun: every rank builds the same requests, computes its share
(balanced by token count) and all ranks gather the results; rank 0 scores and writes the files.

A single process (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a world of one and never
touches torch.distributed. Ranks talk through torch.distributed: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank's index on its own machine (its GPU)

    def all_gather(self, obj: Any) -> list:
        """Every rank's obj, in rank order (picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, facts: dict[str, str]) -> None:
        """ValueError naming every fact (config, code, weights, a task's data) on which ranks differ:
        ranks that evaluate different things must not be merged into one result."""
        every = self.all_gather(facts)
        names = sorted({k for f in every for k in f})
        differ = [k for k in names if len({f.get(k) for f in every}) > 1]
        if differ:
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {_short(f.get(k))}" for r, f in enumerate(every))
                               for k in differ)
            raise ValueError(f"the {self.size} ranks of this torchrun job do not run the same evaluation ({detail}). "
                             "Every rank must run the same command with the same code, weights and data: check "
                             "that each node has the same evalsuite commit, model files and overrides")


def _short(value: str | None) -> str:
    return "(missing)" if value is None else value[:16]


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able value (or of its repr), to compare across ranks."""
    try:
        text = json.dumps(obj, sort_keys=True, default=repr)
    except TypeError:
        text = repr(obj)
    return hashlib.sha256(text.encode()).hexdigest()


def init(device: str = "cpu", timeout_minutes: float = 180) -> World:
    """The world torchrun started this process in (WORLD_SIZE, RANK, LOCAL_RANK), its process group
    joined: NCCL when the model runs on CUDA, gloo otherwise. timeout_minutes: how long a rank waits
    for the others at a gather (a rank that finished its share early waits for the slowest)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"WORLD_SIZE={size} but RANK/LOCAL_RANK are missing or not numbers ({e}): "
                         "start several ranks with torchrun") from None
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=timeout_minutes))
    return World(rank, size, local_rank)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(costs: list[float], size: int) -> list[int]:
    """The rank of each unit: the units, in their order, cut into `size` contiguous runs of about
    equal total cost (a unit goes to the rank whose share holds its midpoint). Contiguous runs keep
    the questions of one few-shot block together, so each rank computes only a few prefixes; the
    imbalance is at most one unit's cost. The same costs give the same shards on every rank."""
    total = float(sum(costs))
    if size <= 1 or total <= 0:
        return [0] * len(costs)
    out, before = [], 0.0
    for c in costs:
        out.append(min(size - 1, int(size * (before + c / 2) / total)))
        before += c
    return out
