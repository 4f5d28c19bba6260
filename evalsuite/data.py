"""Benchmark splits: the copies carried in evalsuite/data (checked against MANIFEST.json) or the hub.

Local files are gzip-compressed JSON Lines in the schema of the named Hugging Face dataset, so a
task reads the same fields whichever source it uses. A local file is hashed before first use; a
mismatch with its manifest sha256 is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"


class DataError(RuntimeError):
    pass


@dataclass(frozen=True)
class Split:
    file: str  # path under evalsuite/data, e.g. "arc/ARC-Easy/test.jsonl.gz"
    rows: list[dict[str, Any]]
    sha256: str  # of the file bytes, or "hub:<id>@<revision>" when loaded from the hub
    entry: dict[str, Any]  # the manifest entry (source, licence, status, hub id)


@lru_cache(maxsize=1)
def manifest() -> dict[str, dict[str, Any]]:
    path = DATA_DIR / "MANIFEST.json"
    return {f["file"]: f for f in json.loads(path.read_text())["files"]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=64)
def load_local(file: str, required_fields: tuple[str, ...] = ()) -> Split:
    entry = manifest().get(file)
    if entry is None:
        raise DataError(f"{file}: not in {DATA_DIR / 'MANIFEST.json'}; known files: {', '.join(sorted(manifest()))}")
    path = DATA_DIR / file
    if not path.exists():
        raise DataError(f"{path}: listed in the manifest but missing from this installation")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DataError(f"{path}: sha256 {digest} does not match MANIFEST.json ({entry['sha256']}); the file was "
                        "modified or corrupted. Reinstall evalsuite, or use data.source=hub.")
    rows = []
    # Split on "\n" only: some strings hold U+2028/U+2029/U+0085, which str.splitlines() breaks on.
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e})") from None
        for f in required_fields:
            if f not in row:
                raise DataError(f"{path}: line {lineno} has no field {f!r} (fields: {', '.join(row)})")
        rows.append(row)
    if len(rows) != entry["rows"]:
        raise DataError(f"{path}: {len(rows)} rows, manifest says {entry['rows']}")
    return Split(file, rows, digest, entry)


def load_files(files: str | list[str], required_fields: tuple[str, ...] = ()) -> Split:
    """One carried file, or several read in turn as one split (BBQ: a file per category); the
    sha256 of several is that of their sha256s, in order."""
    if isinstance(files, str):
        return load_local(files, required_fields)
    parts = [load_local(f, required_fields) for f in files]
    digest = hashlib.sha256(" ".join(p.sha256 for p in parts).encode()).hexdigest()
    statuses = sorted({str(p.entry.get("status")) for p in parts})
    return Split(", ".join(files), [row for p in parts for row in p.rows], digest, {"status": "/".join(statuses)})


def load_hub(hub_id: str, config: str | None, split: str, revision: str | None,
             required_fields: tuple[str, ...] = ()) -> Split:
    """The same split from the Hugging Face hub (needs `datasets` and network access)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hub needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except Exception as e:
        raise DataError(f"could not load {hub_id} ({config}, {split}) from the hub: {type(e).__name__}: {e}. "
                        "Use data.source=local for the copies shipped with evalsuite.") from None
    rows = [dict(r) for r in ds]
    for f in required_fields:
        if rows and f not in rows[0]:
            raise DataError(f"{hub_id} ({config}, {split}): no field {f!r} (fields: {', '.join(rows[0])})")
    fingerprint = getattr(ds, "_fingerprint", "")
    return Split(f"hub:{hub_id}/{config}/{split}", rows, f"hub:{hub_id}@{revision or 'main'}:{fingerprint}",
                 {"hub_id": hub_id, "hub_config": config, "split": split, "status": "hub"})
