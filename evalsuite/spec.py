"""The task spec: tasks/<name>/task.yaml as typed dataclasses (every key: tasks/README.md).

A spec is read strictly: a key that is not a field of its section is refused with the closest
valid name (`fewshot: {smae: subject}` would otherwise silently drop the same-subject rule), a
value of the wrong type names its key, a key given twice names its line. Checks that need the
task kinds (required templates, metrics, `primary`) are made by evalsuite.tasks.load_spec.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class Hub:
    """The same split on the Hugging Face hub (data.source=hub)."""
    id: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    why_not: str | None = None  # why there is no hub copy in the schema the task uses


@dataclass(frozen=True)
class Data:
    hub: Hub = field(default_factory=Hub)
    file: str | list[str] | None = None  # carried in evalsuite/data (sha256 in its MANIFEST.json); a list: rows of each in turn
    fields_local: list[str] | None = None  # the local copy's fields where its schema is not the hub's (DROP)
    partial: str | None = None  # what the local copy lacks (a deviation of every local run)
    where: dict[str, list] = field(default_factory=dict)  # keep rows whose field is among the values
    why_not_local: str | None = None


@dataclass(frozen=True)
class Fewshot:
    count: int  # exemplars per item (the paper's shot count); num_fewshot= overrides it
    sampler: str = "fixed"  # first_n | fixed | random (evalsuite.tasks)
    file: str | None = None  # the few-shot split; none: the evaluation split minus the item
    hub_split: str | None = None
    same: str | None = None  # exemplars share this field with the item (MMLU's subject)
    where: dict[str, list] = field(default_factory=dict)  # candidate exemplars: rows whose field is among the values
    delimiter: str = "\n\n"  # after each solved example
    target_delimiter: str = " "  # between a generate task's exemplar prompt and its target
    in_prompt: int | str = 0  # exemplars written into the prompt template itself (BBH: 3; AGIEval: "3-5")
    examples: list[dict] | None = None  # exemplars written in the spec (MATH's Minerva prompt)
    holdout: int = 0  # no few-shot split (BBQ): this many seeded rows per `same` group are the pool, not evaluated
    holdout_by: str | None = None  # the held-out rows split evenly over this field's values, `data.where` aside (BBQ: both contexts)


@dataclass(frozen=True)
class Join:
    """Rows of another carried file, matched on a field, visible to templates under a name."""
    file: str
    key: str | None  # None: every row of the file (a list; `many` must be true)
    as_: str = field(metadata={"yaml": "as"})
    many: bool = False  # the list of all matching rows
    aliases: dict[str, str] = field(default_factory=dict)  # an item's key -> the key it borrows


@dataclass(frozen=True)
class GenerationSpec:
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 256


@dataclass(frozen=True)
class Published:
    """The published row a report compares with (benchmark and shots as in published_numbers.csv)."""
    benchmark: str
    shots: str
    ours: str | None = None  # what our task measures, where a reader could doubt it
    protocol_stated: bool = True  # false: the paper gives no prompt or metric definition for the row (Table 18)


@dataclass(frozen=True, eq=False)
class TaskSpec:
    name: str  # the folder's name
    version: int  # raised when a change can move scores
    paper_row: str
    data: Data
    fields: list[str]  # the data fields the task reads (checked on every row)
    fewshot: Fewshot
    kind: str  # evalsuite.kinds.KINDS
    metrics: list[str]
    primary: str  # one of metrics
    published: Published | None = None
    suites: dict[str, int] = field(default_factory=dict)  # suite -> the task's position in it
    description: str | None = None  # template before the few-shot block
    prompt: str | None = None  # templates (Jinja2, StrictUndefined): what each kind needs
    choices: str | None = None  # renders a JSON list of strings
    gold: str | None = None  # renders the index of the right choice
    golds: str | None = None  # renders a JSON list of the indices of every right choice (TruthfulQA MC2)
    contexts: str | None = None
    continuation: str | None = None
    target: str | None = None
    generation: GenerationSpec | None = None
    scorer: str | None = None  # evalsuite.scorers.SCORERS
    join: Join | None = None
    macro_by: str | None = None  # a task of subtasks: the score is the mean of the subtasks' means
    breakdown: str | None = None  # template naming an item's group: every metric is reported per group too
    cluster: str | None = None  # template naming an item's cluster (items not independent of each other): a
                                # clustered standard error beside the plain one; macro_by tasks: their groups
    path: Path = field(default=Path(), metadata={"yaml": None})  # not in the file

    def render(self, key: str, doc: dict[str, Any]) -> str:
        try:
            return _template(getattr(self, key)).render(**doc)
        except jinja2.UndefinedError as e:
            raise TaskError(f"{self.path}: template {key!r} uses a field the data lacks ({e})") from None

    def render_list(self, key: str, doc: dict[str, Any]) -> list[str]:
        out = json.loads(self.render(key, doc))
        if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
            raise TaskError(f"{self.path}: template {key!r} must render a JSON list of strings, got {out!r}")
        return out


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
_ENV.filters["literal"] = ast.literal_eval  # AGIEval's few-shot file stores examples as dict reprs


def _mentions(text: str, names) -> list[str]:
    """The names that occur in text as whole words (any case), in the order of their first mention."""
    found = [(m.start(), n) for n in names if (m := re.search(r"\b" + re.escape(n) + r"\b", text, re.IGNORECASE))]
    return [n for _, n in sorted(found)]


_ENV.filters["mentions"] = _mentions  # WinoBias: the occupations a sentence names


@lru_cache(maxsize=None)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


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


def read(path: Path) -> TaskSpec:
    with open(path) as fh:
        raw = yaml.load(fh, Loader=_StrictLoader)
    spec = build(TaskSpec, raw, str(path), path=path)
    if spec.name != path.parent.name:
        raise TaskError(f"{path}: name={spec.name!r}, expected the folder's name {path.parent.name!r}")
    if spec.breakdown and spec.macro_by:
        raise TaskError(f"{path}: give macro_by (a macro average over groups) or breakdown (groups beside the mean), not both")
    if spec.primary not in spec.metrics:
        raise TaskError(f"{path}: primary={spec.primary!r} is not among metrics {spec.metrics}")
    return spec


def build(cls, raw: Any, where: str, **extra):
    """An instance of dataclass `cls` from a YAML mapping: unknown keys, missing keys and values of
    the wrong type are TaskErrors naming `where` and the key."""
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected a mapping, got {raw!r}")
    keys = {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}
    keys.pop(None, None)
    for key in raw:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TaskError(f"{where}: unknown key {key!r}; {hint}valid keys: {', '.join(keys)}")
    hints = typing.get_type_hints(cls)
    values = dict(extra)
    for key, f in keys.items():
        if key in raw:
            values[f.name] = _typed(hints[f.name], raw[key], f"{where}: {key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TaskError(f"{where}: missing key {key!r}")
    return cls(**values)


def _typed(tp, value: Any, where: str):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:  # X | Y | None
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        options = [a for a in options if a is not type(None)]
        for option in options[:-1]:
            try:
                return _typed(option, value, where)
            except TaskError:
                pass
        tp = options[-1]
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    origin = typing.get_origin(tp) or tp
    ok = isinstance(value, origin) and not (origin is int and isinstance(value, bool))
    if not ok:
        raise TaskError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if origin is list and args and args[0] in (str, int):
        for v in value:
            _typed(args[0], v, where)
    return value
