"""Task plugins: tasks/<name>/task.yaml, a declarative spec (evalsuite.spec) rendered with Jinja2.

A spec names its data (a file carried in evalsuite/data, or the same split on the hub), the
few-shot rule, the prompt templates, the kind (evalsuite.kinds) and the metrics. `build_items`
turns it into items, each with its requests; evaluate has them answered and the kind scores them.

Few-shot rules (seeded, documented). The pool is the spec's few-shot split, restricted to rows
with the same `same` field when given (e.g. MMLU's subject); when the spec has no few-shot file,
the pool is the evaluation split and the item itself is never a candidate (a recorded deviation).
  first_n  the first `count` candidates, in split order.
  fixed    one draw of `count + 1` rows with random.Random(f"{seed}:{task}") (per `same` group:
           f"{seed}:{task}:{group}"); every item takes the first `count` of them that are not
           itself. Nearly all items share one few-shot block, whose KV the runner computes once.
  random   a draw of `count + 1` rows with random.Random(f"{seed}:{task}:{item index}") per item,
           minus the item (lm-evaluation-harness style variety; no prefix sharing).
In every rule an item's exemplars depend on neither `limit` nor the other items.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import data, spec as spec_file
from .kinds import KINDS, Item, Shots
from .spec import TaskError, TaskSpec

__all__ = ["Item", "SAMPLERS", "TaskError", "TaskSpec", "available_tasks", "build_items", "load_spec", "suites"]

TASKS_DIR = Path(os.environ.get("EVALSUITE_TASKS_DIR", Path(__file__).resolve().parents[1] / "tasks"))
SAMPLERS = ("first_n", "fixed", "random")


def available_tasks() -> list[str]:
    return sorted(p.parent.name for p in TASKS_DIR.glob("*/task.yaml"))


@lru_cache(maxsize=None)
def load_spec(name: str) -> TaskSpec:
    path = TASKS_DIR / name / "task.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name, available_tasks(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise TaskError(f"unknown task {name!r}; {hint}available tasks: {', '.join(available_tasks())}"
                        + (f"; suites: {', '.join(suites())}" if suites() else ""))
    spec = spec_file.read(path)
    if spec.kind not in KINDS:
        raise TaskError(f"{path}: kind={spec.kind!r}, expected one of {tuple(KINDS)}")
    KINDS[spec.kind].check(spec)
    if spec.fewshot.sampler not in SAMPLERS:
        raise TaskError(f"{path}: fewshot: sampler={spec.fewshot.sampler!r}, expected one of {SAMPLERS}")
    return spec


@lru_cache(maxsize=None)
def suites() -> dict[str, list[str]]:
    """suite -> its tasks, in the order the tasks' `suites:` give (the paper's table order)."""
    members: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(TASKS_DIR.glob("*/task.yaml")):
        for suite, position in spec_file.read(path).suites.items():
            members.setdefault(suite, []).append((position, path.parent.name))
    return {suite: [name for _, name in sorted(tasks)] for suite, tasks in sorted(members.items())}


def no_local_copy(spec: TaskSpec) -> str:
    d = spec.data
    return (f"{spec.path}: task {spec.name!r} has no local copy of its data in evalsuite/data "
            f"({d.why_not_local or 'not carried'}); run it with data.source=hub, which loads "
            f"{d.hub.id} ({d.hub.config}, {d.hub.split}) with datasets.load_dataset "
            "(needs the Hugging Face hub and `pip install datasets`)")


def load_split(spec: TaskSpec, source: str = "local", fewshot: bool = False) -> data.Split | None:
    d, fs = spec.data, spec.fewshot
    fields = tuple(d.fields_local or spec.fields) if source == "local" else tuple(spec.fields)
    if fewshot and fs.examples:  # exemplars written in the spec itself (e.g. MATH's Minerva prompt)
        blob = json.dumps(fs.examples, sort_keys=True, ensure_ascii=False).encode()
        return data.Split(file=f"tasks/{spec.name}/task.yaml#fewshot.examples", rows=list(fs.examples),
                          sha256=hashlib.sha256(blob).hexdigest(), entry={})
    if fewshot and not fs.file and not (source == "hub" and fs.hub_split):
        return None  # no few-shot split: the pool is the evaluation split minus the item
    if source == "local":
        if not d.file:
            raise TaskError(no_local_copy(spec))
        return data.load_local(fs.file, fields) if fewshot else data.load_files(d.file, fields)
    if source == "hub":
        if not d.hub.id:
            raise TaskError(f"{spec.path}: task {spec.name!r} has no hub copy in the schema it uses "
                            f"({d.hub.why_not or 'see its README'}); run it with data.source=local")
        split = (fs.hub_split or d.hub.split) if fewshot else d.hub.split
        return data.load_hub(d.hub.id, d.hub.config, split, d.hub.revision, fields)
    raise TaskError(f"data.source={source!r}: expected 'local' or 'hub'")


def _fewshot_indices(spec: TaskSpec, candidates: list[int], group, pool_is_eval: bool, index: int, count: int,
                     seed: int, sampler: str) -> list[int]:
    if count == 0:
        return []
    if sampler == "first_n":
        chosen = [i for i in candidates[:count + 1] if not (pool_is_eval and i == index)][:count]
    elif sampler == "fixed":
        draw = random.Random(f"{seed}:{spec.name}" + (f":{group}" if spec.fewshot.same else "")).sample(
            candidates, min(count + 1, len(candidates)))
        chosen = [i for i in draw if not (pool_is_eval and i == index)][:count]
    else:  # random
        draw = random.Random(f"{seed}:{spec.name}:{index}").sample(candidates, min(count + 1, len(candidates)))
        chosen = [i for i in draw if not (pool_is_eval and i == index)][:count]
    if len(chosen) < count:
        raise TaskError(f"{spec.path}: only {len(chosen)} few-shot exemplars available for item {index}, need {count}")
    return chosen


def _selected(spec: TaskSpec, split: data.Split) -> list[tuple[int, dict]]:
    """`data.where`: the rows whose field is among the listed values."""
    return [(i, row) for i, row in enumerate(split.rows) if all(row[f] in v for f, v in spec.data.where.items())]


def _holdout(spec: TaskSpec, split: data.Split, seed: int) -> dict[Any, list[int]]:
    """`fewshot.holdout` (a task without a few-shot split, BBQ): per `same` group, a draw of that many
    rows with random.Random(f"{seed}:{task}:holdout:{group}"), in split order. They are the exemplar
    pool and are not evaluated. With `holdout_by`, the draw is split evenly over that field's values
    among all the group's rows, whatever `data.where` keeps (BBQ: half ambiguous, half disambiguated
    contexts, so the exemplars do not teach the answer type); else it is of the selected rows. A limit
    changes neither the draw nor the pool."""
    fs, by = spec.fewshot, {}
    rows = enumerate(split.rows) if fs.holdout_by else _selected(spec, split)
    for i, row in rows:
        strata = by.setdefault(row[fs.same] if fs.same else None, {})
        strata.setdefault(row[fs.holdout_by] if fs.holdout_by else None, []).append(i)
    held = {}
    for g, strata in by.items():
        if fs.holdout % len(strata):
            raise TaskError(f"{spec.path}: fewshot: holdout={fs.holdout} does not split evenly over the "
                            f"{len(strata)} values of {fs.holdout_by!r} in group {g!r}")
        rng = random.Random(f"{seed}:{spec.name}:holdout:{g}")
        per = fs.holdout // len(strata)
        held[g] = sorted(i for key in sorted(strata, key=str) for i in rng.sample(strata[key], min(per, len(strata[key]))))
    return held


def _rows(spec: TaskSpec, split: data.Split, limit: int | None, held: set[int] = frozenset()
          ) -> tuple[list[tuple[int, dict]], int]:
    """(row index, row) to evaluate, and how many rows were selected before the limit: the selected
    rows that are not held out as exemplars; with `macro_by` (a task of subtasks), `limit` applies
    per subtask."""
    selected = [(i, row) for i, row in _selected(spec, split) if i not in held]
    if limit is None:
        return selected, len(selected)
    if not spec.macro_by:
        return selected[:limit], len(selected)
    seen: dict[Any, int] = {}
    rows = []
    for i, row in selected:
        seen[row[spec.macro_by]] = seen.get(row[spec.macro_by], 0) + 1
        if seen[row[spec.macro_by]] <= limit:
            rows.append((i, row))
    return rows, len(selected)


def _candidates(spec: TaskSpec, pool: list[dict]) -> dict[Any, list[int]]:
    """Candidate exemplars per `same` group (one group, None, without it); `fewshot.where` keeps rows
    whose field is among the values (e.g. MBPP's exemplars: task ids 2, 3 and 4)."""
    groups: dict[Any, list[int]] = {}
    same, where = spec.fewshot.same, spec.fewshot.where
    for i, row in enumerate(pool):
        if all(row[f] in v for f, v in where.items()):
            groups.setdefault(row[same] if same else None, []).append(i)
    return groups


def _joined(spec: TaskSpec) -> dict[Any, Any]:
    """`join`: rows of another carried file, matched on a field, visible to templates under a name
    (BBH: each subtask's published chain-of-thought prompt). `many: true` gives the list of all
    matching rows; `aliases` maps an item's key to the key it borrows (AGIEval's
    sat-en-without-passage uses sat-en's examples)."""
    joined: dict[Any, Any] = {}
    for row in data.load_local(spec.join.file).rows:
        if spec.join.key is None:
            joined.setdefault(None, []).append(row)
        elif spec.join.many:
            joined.setdefault(row[spec.join.key], []).append(row)
        else:
            joined[row[spec.join.key]] = row
    return joined


def _with_join(spec: TaskSpec, joined: dict, index: int, doc: dict) -> dict:
    key = None if spec.join.key is None else doc[spec.join.key]
    key = spec.join.aliases.get(key, key)
    if key not in joined:
        raise TaskError(f"{spec.path}: item {index}: no row with {spec.join.key}={key!r} in {spec.join.file}")
    return {**doc, spec.join.as_: joined[key]}


def build_items(spec: TaskSpec, num_fewshot: int | None = None, limit: int | None = None, seed: int = 1234,
                source: str = "local", chat: bool = False, sampler: str | None = None
                ) -> tuple[list[Item], dict[str, Any]]:
    """Items of the task plus provenance (data hashes, few-shot pool, deviations from the paper).

    chat: wrap prompts in the Gemma chat format, each few-shot example a user turn and a model turn.
    sampler: override the spec's few-shot rule (first_n, fixed, random).
    """
    kind = KINDS[spec.kind]
    split, fs_split = load_split(spec, source), load_split(spec, source, fewshot=True)
    count = spec.fewshot.count if num_fewshot is None else num_fewshot
    sampler = sampler or spec.fewshot.sampler
    if sampler not in SAMPLERS:
        raise TaskError(f"fewshot_sampler={sampler!r}: expected one of {SAMPLERS}")
    pool = fs_split.rows if fs_split else split.rows
    held = _holdout(spec, split, seed) if spec.fewshot.holdout and count and fs_split is None else {}
    rows, selected = _rows(spec, split, limit, {i for idx in held.values() for i in idx})
    candidates = held or _candidates(spec, pool)
    joined = _joined(spec) if spec.join else {}
    items = []
    for index, row in rows:
        group = row[spec.fewshot.same] if spec.fewshot.same else None
        shots = _fewshot_indices(spec, candidates.get(group, []), group, fs_split is None, index, count, seed, sampler)
        doc = _with_join(spec, joined, index, row) if spec.join else row
        description = spec.render("description", doc) if spec.description else ""
        block = Shots(description, tuple(kind.example(spec, pool[i]) for i in shots), spec.fewshot.delimiter, chat)
        item = kind.item(spec, index, doc, block)
        item.doc, item.fewshot_indices = row, shots  # recorded without the joined rows
        item.group = spec.render("breakdown", doc) if spec.breakdown else None
        item.cluster = spec.render("cluster", doc) if spec.cluster else (
            str(row[spec.macro_by]) if spec.macro_by else None)
        items.append(item)
    provenance = _provenance(spec, split, fs_split, count, sampler, chat, limit, len(rows), selected, held)
    if source == "local" and spec.data.partial:
        provenance["deviations"].append(f"local copy: {spec.data.partial}; data.source=hub for the whole benchmark")
    return items, provenance


def _provenance(spec: TaskSpec, split: data.Split, fs_split: data.Split | None, count: int, sampler: str,
                chat: bool, limit: int | None, rows: int, selected: int, held: dict) -> dict[str, Any]:
    fs = spec.fewshot
    provenance = {
        "data_file": split.file, "data_sha256": split.sha256, "data_status": split.entry.get("status"),
        "fewshot_file": fs_split.file if fs_split else split.file,
        "fewshot_sha256": fs_split.sha256 if fs_split else split.sha256,
        "num_fewshot": count or fs.in_prompt,
        "fewshot_sampler": sampler if count else ("fixed prompt text" if fs.in_prompt else None),
        "chat_format": chat,
        "split_items": selected,  # items the split offers for evaluation (before limit)
        "deviations": [],
    }
    if held:
        provenance["fewshot_holdout"] = {str(g): idx for g, idx in held.items()}
        provenance["deviations"].append(
            f"few-shot exemplars: {spec.fewshot.holdout} seeded rows per {spec.fewshot.same or 'task'}"
            + (f" (split evenly over {spec.fewshot.holdout_by})" if spec.fewshot.holdout_by else "")
            + " held out of the evaluation split and not evaluated: no train split exists")
    elif count and fs_split is None:
        provenance["deviations"].append(
            f"few-shot exemplars drawn from the evaluation split ({split.file}) minus the item: no train split "
            "is carried locally")
    if spec.join:
        provenance["fewshot_file"] = spec.join.file
        provenance["fewshot_sha256"] = data.load_local(spec.join.file).sha256
    if limit is not None and rows < selected:
        per = f" per {spec.macro_by}" if spec.macro_by else ""
        provenance["deviations"].append(f"limit={limit}{per}: {rows} of {selected} items")
    return provenance


# ---- golden requests: tests/golden/<task>.txt --------------------------------------------------

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"


def golden_text(name: str) -> str:
    """The requests of the task's first item, exactly, as tests/golden/<task>.txt holds them."""
    items, _ = build_items(load_spec(name), limit=1)
    it = items[0]
    text = f"gold={it.gold!r}\n" if isinstance(it.gold, str) else f"gold={it.gold}\n"
    for i, r in enumerate(it.requests):
        tail = (f"--- continuation\n{r.continuation!r}\n" if hasattr(r, "continuation")
                else f"--- stop={list(r.stop)!r} max_tokens={r.max_tokens}\n")
        text += f"=== request {i}\n{r.context!r}\n" + tail
    return text


def main(argv: list[str] | None = None) -> int:
    """python -m evalsuite.tasks golden NAME [NAME ...]: rewrite tests/golden/NAME.txt (read the diff)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m evalsuite.tasks", description=main.__doc__)
    ap.add_argument("action", choices=["golden"])
    ap.add_argument("names", nargs="+", metavar="NAME", help=f"tasks: {', '.join(available_tasks())}")
    args = ap.parse_args(argv)
    try:
        for name in args.names:
            path = GOLDEN_DIR / f"{name}.txt"
            path.write_text(golden_text(name))
            print(path)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
