"""Task plugins: tasks/<name>/task.yaml, a declarative spec rendered with Jinja2 (StrictUndefined).

A spec names its data (a file carried in evalsuite/data, or the same split on the hub), the
few-shot rule, the prompt templates, the request kind and the metrics. `build_items` turns it
into items, each with its log-likelihood requests; the runner executes them, `score` reduces them.

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

import ast
import difflib
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from . import data, scorers
from .runner import Chat, Generation, Loglikelihood

TASKS_DIR = Path(os.environ.get("EVALSUITE_TASKS_DIR", Path(__file__).resolve().parents[1] / "tasks"))
KINDS = ("multiple_choice", "multiple_choice_context", "generate")
METRICS = ("acc", "acc_norm", "acc_bytes")  # multiple-choice kinds; a generate task's come from its scorer

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
# `literal`: a field holding a Python literal (AGIEval's few-shot file stores each example as a dict repr).
_ENV.filters["literal"] = ast.literal_eval


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path
    raw: dict[str, Any]

    def __getitem__(self, key):
        return self.raw[key]

    def get(self, key, default=None):
        return self.raw.get(key, default)


@dataclass
class Item:
    """One evaluated question: one Loglikelihood request per choice, or one Generation request."""
    task: str
    index: int  # row index in the evaluation split
    doc: dict[str, Any]
    requests: list[Loglikelihood] | list[Generation]
    gold: Any  # index of the right choice; for a generate task, the rendered target
    choices: list[str]
    prompt: str
    fewshot_indices: list[int] = field(default_factory=list)


def available_tasks() -> list[str]:
    return sorted(p.parent.name for p in TASKS_DIR.glob("*/task.yaml"))


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise TaskError(f"{self.name}: line {key_node.start_mark.line + 1}: field {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@lru_cache(maxsize=None)
def load_spec(name: str) -> TaskSpec:
    path = TASKS_DIR / name / "task.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name, available_tasks(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise TaskError(f"unknown task {name!r}; {hint}available tasks: {', '.join(available_tasks())}")
    with open(path) as fh:
        raw = yaml.load(fh, Loader=_StrictLoader)
    for key in ("name", "version", "data", "fields", "fewshot", "kind", "metrics", "primary"):
        if key not in raw:
            raise TaskError(f"{path}: missing field {key!r}")
    if raw["kind"] != "generate" and "gold" not in raw:
        raise TaskError(f"{path}: missing field 'gold' (the index of the right choice)")
    if raw["kind"] not in KINDS:
        raise TaskError(f"{path}: kind={raw['kind']!r}, expected one of {KINDS}")
    allowed = METRICS
    if raw["kind"] == "generate":
        for key in ("prompt", "target", "scorer", "generation"):
            if key not in raw:
                raise TaskError(f"{path}: a generate task needs field {key!r}")
        if raw["scorer"] not in scorers.SCORERS:
            raise TaskError(f"{path}: scorer={raw['scorer']!r}, expected one of {sorted(scorers.SCORERS)}")
        allowed = scorers.SCORERS[raw["scorer"]].METRICS
    bad = [m for m in raw["metrics"] if m not in allowed]
    if bad:
        raise TaskError(f"{path}: unknown metric(s) {bad}, expected some of {allowed}")
    return TaskSpec(raw["name"], path, raw)


@lru_cache(maxsize=None)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _render(spec: TaskSpec, key: str, doc: dict[str, Any]) -> str:
    try:
        return _template(spec[key]).render(**doc)
    except jinja2.UndefinedError as e:
        raise TaskError(f"{spec.path}: template {key!r} uses a field the data lacks ({e})") from None


def _render_list(spec: TaskSpec, key: str, doc: dict[str, Any]) -> list[str]:
    out = json.loads(_render(spec, key, doc))
    if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
        raise TaskError(f"{spec.path}: template {key!r} must render a JSON list of strings, got {out!r}")
    return out


def no_local_copy(spec: TaskSpec) -> str:
    d = spec["data"]
    return (f"{spec.path}: task {spec.name!r} has no local copy of its data in evalsuite/data "
            f"({d.get('why_not_local', 'not carried')}); run it with data.source=hub, which loads "
            f"{d['hub']['id']} ({d['hub'].get('config')}, {d['hub']['split']}) with datasets.load_dataset "
            "(needs the Hugging Face hub and `pip install datasets`)")


def load_split(spec: TaskSpec, source: str = "local", fewshot: bool = False) -> data.Split | None:
    d, fs = spec["data"], spec["fewshot"]
    fields = tuple(spec["fields"])
    if fewshot and fs.get("examples"):  # exemplars written in the spec itself (e.g. MATH's Minerva prompt)
        blob = json.dumps(fs["examples"], sort_keys=True, ensure_ascii=False).encode()
        return data.Split(file=f"tasks/{spec.name}/task.yaml#fewshot.examples", rows=list(fs["examples"]),
                          sha256=hashlib.sha256(blob).hexdigest(), entry={})
    if fewshot and not fs.get("file") and not (source == "hub" and fs.get("hub_split")):
        return None  # no few-shot split: the pool is the evaluation split minus the item
    if source == "local":
        if not d.get("file"):
            raise TaskError(no_local_copy(spec))
        return data.load_local(fs["file"] if fewshot else d["file"], fields)
    if source == "hub":
        hub = d["hub"]
        if not hub.get("id"):
            raise TaskError(f"{spec.path}: task {spec.name!r} has no hub copy in the schema it uses "
                            f"({hub.get('why_not', 'see its README')}); run it with data.source=local")
        split = fs.get("hub_split", hub["split"]) if fewshot else hub["split"]
        return data.load_hub(hub["id"], hub.get("config"), split, hub.get("revision"), fields)
    raise TaskError(f"data.source={source!r}: expected 'local' or 'hub'")


SAMPLERS = ("first_n", "fixed", "random")


def _fewshot_indices(spec: TaskSpec, candidates: list[int], group, pool_is_eval: bool, index: int, count: int,
                     seed: int, sampler: str) -> list[int]:
    if count == 0:
        return []
    same = spec["fewshot"].get("same")
    if sampler == "first_n":
        chosen = [i for i in candidates[:count + 1] if not (pool_is_eval and i == index)][:count]
    elif sampler == "fixed":
        draw = random.Random(f"{seed}:{spec.name}" + (f":{group}" if same else "")).sample(
            candidates, min(count + 1, len(candidates)))
        chosen = [i for i in draw if not (pool_is_eval and i == index)][:count]
    elif sampler == "random":
        draw = random.Random(f"{seed}:{spec.name}:{index}").sample(candidates, min(count + 1, len(candidates)))
        chosen = [i for i in draw if not (pool_is_eval and i == index)][:count]
    else:
        raise TaskError(f"{spec.path}: fewshot sampler {sampler!r}, expected one of {SAMPLERS}")
    if len(chosen) < count:
        raise TaskError(f"{spec.path}: only {len(chosen)} few-shot exemplars available for item {index}, need {count}")
    return chosen


def _example(spec: TaskSpec, doc: dict) -> tuple[str, str]:
    """A solved example: (prompt part, answer part) as it appears in a few-shot prefix."""
    if spec["kind"] == "generate":  # target_delimiter: "" where the prompt ends in a newline (MBPP's [BEGIN])
        return _render(spec, "prompt", doc), spec["fewshot"].get("target_delimiter", " ") + _render(spec, "target", doc)
    gold = int(_render(spec, "gold", doc))
    if spec["kind"] == "multiple_choice":
        return _render(spec, "prompt", doc), " " + _render_list(spec, "choices", doc)[gold]
    return _render_list(spec, "contexts", doc)[gold], " " + _render(spec, "continuation", doc)


def _chat_turns(description: str, examples: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    turns = tuple((p.strip(), a.strip()) for p, a in examples)
    return ((description + turns[0][0], turns[0][1]),) + turns[1:] if turns else ()


def build_items(spec: TaskSpec, num_fewshot: int | None = None, limit: int | None = None, seed: int = 1234,
                source: str = "local", chat: bool = False, sampler: str | None = None
                ) -> tuple[list[Item], dict[str, Any]]:
    """Items of the task plus provenance (data hashes, few-shot pool, deviations from the paper).

    chat: wrap prompts in the Gemma chat format, each few-shot example a user turn and a model turn.
    sampler: override the spec's few-shot rule (first_n, fixed, random).
    """
    split = load_split(spec, source)
    fs_split = load_split(spec, source, fewshot=True)
    count = spec["fewshot"]["count"] if num_fewshot is None else num_fewshot
    sampler = sampler or spec["fewshot"].get("sampler", "fixed")
    if sampler not in SAMPLERS:
        raise TaskError(f"fewshot_sampler={sampler!r}: expected one of {SAMPLERS}")
    pool = fs_split.rows if fs_split else split.rows
    # (row index, row) to evaluate: `data.where` keeps rows whose field is among the listed values;
    # with `macro_by` (a task of subtasks), `limit` applies per subtask.
    where = spec["data"].get("where") or {}
    selected = [(i, row) for i, row in enumerate(split.rows) if all(row[f] in v for f, v in where.items())]
    macro_by = spec.get("macro_by")
    if limit is None:
        rows = selected
    elif macro_by:
        seen: dict[Any, int] = {}
        rows = []
        for i, row in selected:
            seen[row[macro_by]] = seen.get(row[macro_by], 0) + 1
            if seen[row[macro_by]] <= limit:
                rows.append((i, row))
    else:
        rows = selected[:limit]
    same = spec["fewshot"].get("same")
    groups: dict[Any, list[int]] = {}
    fs_where = spec["fewshot"].get("where") or {}  # e.g. MBPP's exemplars: task ids 2, 3 and 4
    for i, row in enumerate(pool):
        if all(row[f] in v for f, v in fs_where.items()):
            groups.setdefault(row[same] if same else None, []).append(i)
    description_tpl = spec.get("description")
    # `join`: rows of another carried file, matched on a field, visible to templates under a name
    # (BBH: each subtask's published chain-of-thought prompt). `many: true` gives the list of all
    # matching rows; `aliases` maps an item's key to the key it borrows (AGIEval's
    # sat-en-without-passage uses sat-en's examples).
    join = spec.get("join")
    joined: dict[Any, Any] = {}
    if join:
        for row in data.load_local(join["file"]).rows:
            if join.get("many"):
                joined.setdefault(row[join["key"]], []).append(row)
            else:
                joined[row[join["key"]]] = row
    items = []
    for index, doc in rows:
        group = doc[same] if same else None
        shots = _fewshot_indices(spec, groups.get(group, []), group, fs_split is None, index, count, seed, sampler)
        item_doc = doc  # what samples_<task>.jsonl records (without joined rows)
        if join:
            key = doc[join["key"]]
            key = join.get("aliases", {}).get(key, key)
            if key not in joined:
                raise TaskError(f"{spec.path}: item {index}: no row with {join['key']}={key!r} in {join['file']}")
            doc = {**doc, join["as"]: joined[key]}
        description = _template(description_tpl).render(**doc) if description_tpl else ""
        examples = [_example(spec, pool[i]) for i in shots]
        delimiter = spec["fewshot"].get("delimiter", "\n\n")
        prefix = description + "".join(p + a + delimiter for p, a in examples)
        if spec["kind"] == "generate":
            question = _render(spec, "prompt", doc)
            gen = spec["generation"]
            context = (Chat(_chat_turns(description, examples), (description if not examples else "") + question)
                       if chat else prefix + question)
            request = Generation(context, stop=tuple(gen.get("stop", ())), max_tokens=int(gen.get("max_tokens", 256)),
                                 shared_prefix=0 if chat else len(prefix))
            items.append(Item(spec.name, index, item_doc, [request], _render(spec, "target", doc), [], prefix + question,
                              shots))
            continue
        gold = int(_render(spec, "gold", doc))
        if spec["kind"] == "multiple_choice":
            question = _render(spec, "prompt", doc)
            choices = _render_list(spec, "choices", doc)
            contexts, continuations = [question] * len(choices), [" " + c for c in choices]
            prompt = prefix + question
        else:  # multiple_choice_context: the options change the context, the scored continuation is shared
            choices = _render_list(spec, "contexts", doc)
            contexts, continuations = choices, [" " + _render(spec, "continuation", doc)] * len(choices)
            prompt = prefix + "|".join(choices)
        if chat:
            turns = _chat_turns(description, examples)
            requests = [Loglikelihood(Chat(turns, (description if not turns else "") + c), k)
                        for c, k in zip(contexts, continuations)]
        else:
            requests = [Loglikelihood(prefix + c, k, shared_prefix=len(prefix)) for c, k in zip(contexts, continuations)]
        if not 0 <= gold < len(requests):
            raise TaskError(f"{spec.path}: item {index} has gold index {gold} but {len(requests)} choices")
        items.append(Item(spec.name, index, item_doc, requests, gold, choices, prompt, shots))
    provenance = {
        "data_file": split.file, "data_sha256": split.sha256, "data_status": split.entry.get("status"),
        "fewshot_file": fs_split.file if fs_split else split.file,
        "fewshot_sha256": fs_split.sha256 if fs_split else split.sha256,
        "num_fewshot": count or spec["fewshot"].get("in_prompt", 0),
        "fewshot_sampler": sampler if count else ("fixed prompt text" if spec["fewshot"].get("in_prompt") else None),
        "chat_format": chat,
        "deviations": [],
    }
    if count and fs_split is None:
        provenance["deviations"].append(
            f"few-shot exemplars drawn from the evaluation split ({split.file}) minus the item: no train split "
            "is carried locally")
    if join:
        provenance["fewshot_file"] = join["file"]
        provenance["fewshot_sha256"] = data.load_local(join["file"]).sha256
    if limit is not None and len(rows) < len(selected):
        per = f" per {macro_by}" if macro_by else ""
        provenance["deviations"].append(f"limit={limit}{per}: {len(rows)} of {len(selected)} items")
    return items, provenance
