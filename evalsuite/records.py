"""What a run writes and what the report and compare read: results.json and samples_<task>.jsonl.

One schema (SCHEMA_VERSION, in results.json), one writer, strict JSON: NaN and infinity are never
written (JavaScript, `jq`, dashboards reject them); a value that cannot be computed is null with
the reason beside it (`"stderr": null, "null_reason": "1 item: no standard error"`). Files from
before the schema had a version may hold NaN: readers take them, NaN read as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (ValueError on NaN or infinity)."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)


def _reject(constant: str):
    raise ValueError(f"{constant} is not JSON")


def loads(text: str, where: str, strict: bool = True) -> Any:
    """Parse JSON; strict: NaN/Infinity are an error naming `where`, else they read as None."""
    try:
        return json.loads(text, parse_constant=_reject if strict else (lambda c: None))
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


# ---- per-sample records ---------------------------------------------------------------------------

OMITTED: Any = type("Omitted", (), {"__repr__": lambda self: "OMITTED"})()  # a field the record leaves out

@dataclass(kw_only=True)
class ChoiceRecord:
    """One multiple-choice item: a log-likelihood per choice and each metric's predicted choice."""
    index: int  # row in the evaluation split
    prompt: str
    choices: list[str]
    gold: int | list[int]  # a list: every right choice (TruthfulQA MC2, BBQ's unknown phrasings)
    logprobs: list[float]
    is_greedy: list[bool]
    num_tokens: list[int]
    predictions: dict[str, int]
    scores: Any = OMITTED  # kinds whose item score is not a right-or-wrong choice (MC2 mass, bias answers)
    fewshot_indices: list[int]
    doc: dict[str, Any]


@dataclass(kw_only=True)
class GenerationRecord:
    """One generate item. With n samples per prompt, generation, finish and num_tokens are lists."""
    index: int
    prompt: str
    generation: str | list[str]
    finish: str | list[str]
    num_tokens: int | list[int]
    target: str
    scores: dict[str, float] | None  # None: not scored (its program could not be executed)
    execution: Any = OMITTED  # code tasks: the sandbox's verdict (a list with n > 1)
    sample_scores: Any = OMITTED  # n > 1: each sample's scores (None where the item is not scored)
    answers: Any = OMITTED  # n > 1: the extracted answers maj@n voted on
    unscored_reason: Any = OMITTED  # why the item has no scores (a scorer's missing resource)
    toxicity: Any = OMITTED  # toxicity tasks: the classifier's verdict (toxicity, truncated, error)
    fewshot_indices: list[int]
    doc: dict[str, Any]


def record_json(rec: ChoiceRecord | GenerationRecord) -> dict[str, Any]:
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec) if getattr(rec, f.name) is not OMITTED}


# ---- results.json -------------------------------------------------------------------------------

@dataclass
class Score:
    value: float | None
    stderr: float | None
    null_reason: str | None = None  # why value or stderr is null
    stderr_clustered: float | None = None  # items clustered (the spec's `cluster`): the cluster-robust one
    clusters: int | None = None

    @classmethod
    def of(cls, value: float, stderr: float, num_items: int, macro: bool = False) -> "Score":
        """NaN (nothing to average, or no spread to estimate) becomes null with the reason."""
        if math.isnan(value):
            return cls(None, None, "no item was scored")
        if math.isnan(stderr):
            why = ("a group has a single item: no standard error for it" if macro else
                   f"{num_items} item: no standard error")
            return cls(value, None, why)
        return cls(value, stderr)

    def to_json(self) -> dict[str, Any]:
        out = {"value": self.value, "stderr": self.stderr}
        if self.null_reason:
            out["null_reason"] = self.null_reason
        if self.clusters is not None:
            se = self.stderr_clustered
            out["stderr_clustered"], out["clusters"] = (None if se is None or math.isnan(se) else se), self.clusters
        return out


@dataclass
class TaskResult:
    paper_row: str
    version: int
    primary: str
    metrics: dict[str, Score]
    num_items: int
    provenance: dict[str, Any]  # data and few-shot files with their sha256, shots, sampler, deviations
    unscored_items: list[int] | None = None  # items whose programs the harness could not execute
    execution: dict | None = None  # code tasks: sandbox, limits, containment, statuses
    classifier: dict | None = None  # toxicity tasks: the classifier, its revision and sha256
    sampling: dict | None = None  # decoding changed from the task's setting
    aggregation: str | None = None  # macro average: over which groups
    groups: dict | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"paper_row": self.paper_row, "version": self.version, "primary": self.primary,
               "metrics": {m: s.to_json() for m, s in self.metrics.items()}, "num_items": self.num_items,
               **self.provenance}
        for key in ("unscored_items", "execution", "classifier", "sampling", "aggregation", "groups"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class RunResult:
    evalsuite_version: str
    git_commit: str | None
    created: str
    config: dict[str, Any]
    model: dict[str, Any]
    tasks: dict[str, TaskResult]
    skipped_tasks: dict[str, str]
    timing: dict[str, Any]
    cache: dict[str, Any]
    distributed: dict[str, Any] | None = None  # torchrun: each rank's share
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_json(self) -> dict[str, Any]:
        out = {"schema_version": self.schema_version, "evalsuite_version": self.evalsuite_version,
               "git_commit": self.git_commit, "created": self.created, "config": self.config, "model": self.model,
               "tasks": {n: t.to_json() for n, t in self.tasks.items()}, "skipped_tasks": self.skipped_tasks,
               "timing": self.timing, "cache": self.cache}
        if self.distributed is not None:
            out["distributed"] = self.distributed
        return out


# ---- writing and reading -------------------------------------------------------------------------

class SamplesWriter:
    """samples_<task>.jsonl, one record per line, written as items are scored."""

    def __init__(self, out_dir: Path, task: str):
        self._fh = open(out_dir / f"samples_{task}.jsonl", "w")

    def write(self, rec: ChoiceRecord | GenerationRecord) -> None:
        self._fh.write(dumps(record_json(rec)) + "\n")

    def close(self) -> None:
        self._fh.close()


def write_results(out_dir: Path, result: RunResult) -> dict[str, Any]:
    out = result.to_json()
    (out_dir / "results.json").write_text(dumps(out, indent=2))
    return out


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """results.json of a run directory, with "_dir" added."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (expected a run directory written by python -m evalsuite)")
    constants: list[str] = []  # NaN/Infinity met while parsing (read as None)
    try:
        res = json.loads(path.read_text(), parse_constant=lambda c: constants.append(c))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "schema_version" in res:
        if constants:  # a versioned file must be strict JSON
            raise ValueError(f"{path}: not valid JSON ({constants[0]} is not JSON)")
        if res["schema_version"] > SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {res['schema_version']} is newer than this evalsuite reads "
                             f"({SCHEMA_VERSION}); upgrade evalsuite")
    res["_dir"] = str(run_dir)
    return res


def record_scores(rec: dict[str, Any]) -> dict[str, float] | None:
    """A sample record's per-item metric values: its `scores` (None: not scored), or for a choice
    record without them, 1.0 for each metric whose predicted choice is the gold one."""
    if "scores" in rec:
        return rec["scores"]
    if "predictions" in rec:
        gold = rec["gold"] if isinstance(rec["gold"], list) else [rec["gold"]]
        return {m: float(p in gold) for m, p in rec["predictions"].items()}
    raise ValueError("record has neither 'scores' nor 'predictions'")


def read_samples(run: dict[str, Any], task: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a task's samples file."""
    path = Path(run["_dir"]) / f"samples_{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the per-item records of task {task!r})")
    strict = "schema_version" in run
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            yield n, loads(line, f"{path}:{n}", strict)
