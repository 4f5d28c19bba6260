"""Persistent cache of request results: a crashed, killed or interrupted run loses no finished work.

Every batch's results are committed to SQLite (WAL journal, synchronous=FULL) as soon as the batch
is done, so rerunning the same command computes only what is missing. An entry's key is a sha256
of everything that decides the result:
  * the model: weights fingerprint (sha256 of the weight files), tokenizer, dtype, device type,
    attention path (blocks or flex);
  * the numerics: a hash of the source of the code that computes results (evalsuite/model/*.py,
    requests, runner, batching, scoring, generation, backends), the torch version (and transformers' for the hf backend), TF32 flags;
  * the request as run: its token ids (a tokenizer change changes them), and for generation the
    stop strings, max_tokens and sampling settings with the request's own seed.
A change to any of these gives new keys, so a stale result is never served; old entries are simply
not read again (delete the folder to reclaim the space).

Modes (`cache=`): off (no cache), read (use entries, add none), write (use entries and add new ones:
the default), refresh (recompute everything and replace the entries).

Each process writes its own file, rank<k>.sqlite (k = torchrun's RANK, 0 alone), and reads all the
files of the folder, so any number of ranks share one cache without write contention. Put the
folder on a local disk: SQLite's WAL needs shared memory, which network filesystems may not give.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import torch

MODES = ("off", "read", "write", "refresh")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"cache={mode!r}: expected one of {', '.join(MODES)}")


_PACKAGE = Path(__file__).resolve().parent
# The code whose change can change a result: the network, weight loading, tokenizer, the runner.
CODE_FILES = sorted([*(_PACKAGE / "model").glob("*.py"), *(_PACKAGE / f"{name}.py" for name in (
    "requests", "runner", "batching", "scoring", "generation", "backends"))])


def code_version() -> str:
    h = hashlib.sha256()
    for f in CODE_FILES:
        h.update(f.relative_to(_PACKAGE).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def model_key(described: dict[str, Any]) -> dict[str, Any]:
    """What identifies the numbers a backend of ours produces, from its describe() and the environment;
    a backend's version_key() starts from it and adds what else it depends on."""
    key = {k: described.get(k) for k in ("backend", "family", "fingerprint_sha256", "tokenizer", "dtype",
                                          "attention")}
    key["device_type"] = str(described.get("device", "cpu")).split(":")[0]
    key["code"] = code_version()
    key["torch"] = torch.__version__
    key["tf32"] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    return key


class ResultCache:
    def __init__(self, folder: str | Path, mode: str, model: dict[str, Any], rank: int | None = None):
        check_mode(mode)
        if not model.get("fingerprint_sha256"):
            raise ValueError("the result cache needs the weights' fingerprint; the model has none (run with cache=off)")
        self.folder, self.mode = Path(folder), mode
        self._model = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.path = self.folder / f"rank{rank}.sqlite"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a crash of the machine
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, kind TEXT, value TEXT)")
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"cache_dir={str(self.folder)!r}: cannot open the result cache there ({e}); "
                             "give a writable folder or set cache=off") from None

    @property
    def reads(self) -> bool:
        return self.mode in ("read", "write")

    @property
    def writes(self) -> bool:
        return self.mode in ("write", "refresh")

    def key(self, kind: str, request: Any) -> str:
        return hashlib.sha256(json.dumps([self._model, kind, request], separators=(",", ":")).encode()).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """The cached values among `keys` (every rank's file is read)."""
        if not self.reads or not keys:
            return {}
        found: dict[str, Any] = {}
        for path in sorted(self.folder.glob("rank*.sqlite")):
            db = self._db if path == self.path else sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
            try:
                todo = [k for k in keys if k not in found]
                for start in range(0, len(todo), 500):
                    part = todo[start:start + 500]
                    rows = db.execute(f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(part))})", part)
                    found.update((k, json.loads(v)) for k, v in rows)
            except sqlite3.Error:
                continue  # another rank's file being created; its entries are simply recomputed
            finally:
                if db is not self._db:
                    db.close()
        return found

    def put_many(self, kind: str, items: dict[str, Any]) -> None:
        """Commit one batch's results durably."""
        if not self.writes or not items:
            return
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                                 [(k, kind, json.dumps(v)) for k, v in items.items()])

    def close(self) -> None:
        self._db.close()
