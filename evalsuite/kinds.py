"""Task kinds: how an item of each kind becomes requests, and its answers a score and a record.

A task's `kind:` picks one class from KINDS. A kind says which templates and metrics a spec needs
(`check`), how a solved exemplar reads in a few-shot block (`example`), what an item asks
(`item`, `requests`), the programs its answers need run (`programs`, code tasks only) and how the
answers score (`score`). A new kind is one class here plus its task folders; nothing else branches
on the kind.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from . import metrics, scorers
from .records import ChoiceRecord, GenerationRecord
from .requests import Chat, Generation, Loglikelihood
from .settings import Sampling
from .spec import TaskError, TaskSpec


@dataclass
class Item:
    """One evaluated question: one Loglikelihood request per choice, or one Generation request."""
    task: str
    index: int  # row index in the evaluation split
    doc: dict[str, Any]  # the row as recorded (without joined rows)
    requests: list[Loglikelihood] | list[Generation]
    gold: Any  # index of the right choice; for a generate task, the rendered target
    choices: list[str]
    prompt: str
    fewshot_indices: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Shots:
    """An item's few-shot block: the description, then each solved example and the delimiter."""
    description: str
    examples: tuple[tuple[str, str], ...]
    delimiter: str
    chat: bool  # Gemma chat format: each example a user turn and a model turn

    @functools.cached_property
    def prefix(self) -> str:
        return self.description + "".join(p + a + self.delimiter for p, a in self.examples)

    def context(self, text: str) -> tuple[str | Chat, int]:
        """(the context of a request that ends in `text`, its characters shared with other items)."""
        if not self.chat:
            return self.prefix + text, len(self.prefix)
        turns = tuple((p.strip(), a.strip()) for p, a in self.examples)
        if turns:
            turns = ((self.description + turns[0][0], turns[0][1]),) + turns[1:]
        return Chat(turns, (self.description if not turns else "") + text), 0


@dataclass
class Scored:
    scores: dict[str, float] | None  # None: not scored (never a zero: a program could not be executed)
    record: ChoiceRecord | GenerationRecord


class TaskKind:
    templates: tuple[str, ...] = ()  # spec keys the kind needs
    decodes = False  # its requests are generations (the generation settings apply)

    def check(self, spec: TaskSpec) -> None:
        for key in self.templates:
            if getattr(spec, key) is None:
                raise TaskError(f"{spec.path}: a {spec.kind} task needs field {key!r}")
        allowed = self.allowed_metrics(spec)
        bad = [m for m in spec.metrics if m not in allowed]
        if bad:
            raise TaskError(f"{spec.path}: unknown metric(s) {bad}, expected some of {allowed}")

    def allowed_metrics(self, spec: TaskSpec) -> tuple[str, ...]:
        raise NotImplementedError

    def example(self, spec: TaskSpec, doc: dict[str, Any]) -> tuple[str, str]:
        """A solved example: (prompt part, answer part) as it appears in a few-shot block."""
        raise NotImplementedError

    def item(self, spec: TaskSpec, index: int, doc: dict[str, Any], shots: Shots) -> Item:
        raise NotImplementedError

    def requests(self, spec: TaskSpec, item: Item, sampling: Sampling, seed: int) -> list:
        return list(item.requests)

    def runs_code(self, spec: TaskSpec) -> bool:
        """Whether the task's answers are programs to execute (in the sandbox)."""
        return False

    def programs(self, spec: TaskSpec, item: Item, results: list) -> list | None:
        """The programs to execute for the item's answers (one per answer), or None."""
        return None

    def metric_names(self, spec: TaskSpec, sampling: Sampling) -> list[str]:
        return list(spec.metrics)

    def primary(self, spec: TaskSpec, sampling: Sampling) -> str:
        return spec.primary

    def score(self, spec: TaskSpec, item: Item, results: list, outcomes: list | None,
              sampling: Sampling) -> Scored:
        raise NotImplementedError


class MultipleChoice(TaskKind):
    """The prompt, then each choice as the continuation scored (acc, acc_norm, acc_bytes)."""
    templates = ("prompt", "choices", "gold")

    def allowed_metrics(self, spec):
        return metrics.CHOICE_METRICS

    def options(self, spec: TaskSpec, doc: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        """(choices as recorded, each request's context end, each request's continuation)."""
        choices = spec.render_list("choices", doc)
        return choices, [spec.render("prompt", doc)] * len(choices), [" " + c for c in choices]

    def example(self, spec, doc):
        return spec.render("prompt", doc), " " + spec.render_list("choices", doc)[int(spec.render("gold", doc))]

    def shown(self, spec: TaskSpec, contexts: list[str], shots: Shots) -> str:
        return shots.prefix + contexts[0]

    def item(self, spec, index, doc, shots):
        gold = int(spec.render("gold", doc))
        choices, contexts, continuations = self.options(spec, doc)
        requests = [Loglikelihood(*_pair(shots.context(c), k)) for c, k in zip(contexts, continuations)]
        if not 0 <= gold < len(requests):
            raise TaskError(f"{spec.path}: item {index} has gold index {gold} but {len(requests)} choices")
        return Item(spec.name, index, doc, requests, gold, choices, self.shown(spec, contexts, shots))

    def score(self, spec, item, results, outcomes, sampling):
        record = self.record(spec, item, results)
        return Scored({m: float(record.predictions[m] == item.gold) for m in spec.metrics}, record)

    def record(self, spec: TaskSpec, item: Item, results: list) -> ChoiceRecord:
        """The item's log-likelihoods and the choice each of the spec's choice metrics predicts."""
        lps = [r.logprob for r in results]
        preds = metrics.choice_predictions(lps, item.choices)
        return ChoiceRecord(
            index=item.index, prompt=item.prompt, choices=item.choices, gold=item.gold, logprobs=lps,
            is_greedy=[r.is_greedy for r in results], num_tokens=[r.num_tokens for r in results],
            predictions={m: preds[m] for m in spec.metrics if m in preds}, fewshot_indices=item.fewshot_indices,
            doc=item.doc)


class MultipleChoiceContext(MultipleChoice):
    """Partial scoring (WinoGrande): each option completes the context; the text after it, the same
    for all options, is the continuation scored."""
    templates = ("contexts", "continuation", "gold")

    def options(self, spec, doc):
        contexts = spec.render_list("contexts", doc)
        return contexts, contexts, [" " + spec.render("continuation", doc)] * len(contexts)

    def example(self, spec, doc):
        return spec.render_list("contexts", doc)[int(spec.render("gold", doc))], " " + spec.render("continuation", doc)

    def shown(self, spec, contexts, shots):
        return shots.prefix + "|".join(contexts)


def _pair(context: tuple[str | Chat, int], continuation: str) -> tuple[str | Chat, str, int]:
    return context[0], continuation, context[1]


class Generate(TaskKind):
    """A generation per prompt (n with sampling), scored by the task's scorer: maj@n where the scorer
    extracts answers, pass@k for pass/fail metrics, and code run in the sandbox where it gives programs."""
    templates = ("prompt", "target", "scorer", "generation")
    decodes = True

    def check(self, spec):
        if spec.scorer is not None and spec.scorer not in scorers.SCORERS:
            raise TaskError(f"{spec.path}: scorer={spec.scorer!r}, expected one of {sorted(scorers.SCORERS)}")
        super().check(spec)

    def allowed_metrics(self, spec):
        return scorers.SCORERS[spec.scorer].metrics

    def example(self, spec, doc):  # target_delimiter: "" where the prompt ends in a newline (MBPP's [BEGIN])
        return spec.render("prompt", doc), spec.fewshot.target_delimiter + spec.render("target", doc)

    def item(self, spec, index, doc, shots):
        question = spec.render("prompt", doc)
        context, shared = shots.context(question)
        request = Generation(context, stop=tuple(spec.generation.stop), max_tokens=int(spec.generation.max_tokens),
                             shared_prefix=shared)
        return Item(spec.name, index, doc, [request], spec.render("target", doc), [], shots.prefix + question)

    def requests(self, spec, item, sampling, seed):
        (req,) = item.requests
        if sampling.default:
            return [req]
        return [dataclasses.replace(req, **sampling.overrides(), seed=Sampling.seed(seed, spec.name, item.index, j))
                for j in range(sampling.n)]

    def runs_code(self, spec):
        return scorers.SCORERS[spec.scorer].program is not None

    def programs(self, spec, item, results):
        program = scorers.SCORERS[spec.scorer].program
        return [program(r.text, item.doc) for r in results] if program else None

    def derived(self, spec: TaskSpec, sampling: Sampling) -> list[tuple[str, str, int, str]]:
        """(name, aggregate, k, base metric) of the metrics that several samples add."""
        if sampling.n == 1:
            return []
        scorer = scorers.SCORERS[spec.scorer]
        out = [(f"maj@{sampling.n}_{m}", "maj", sampling.n, m) for m in spec.metrics if scorer.answer]
        return out + [(f"pass@{k}" if m == "pass@1" else f"pass@{k}_{m}", "pass", k, m)
                      for m in spec.metrics if m not in scorer.continuous for k in metrics.pass_ks(sampling.n) if k > 1]

    def metric_names(self, spec, sampling):
        return list(spec.metrics) + [name for name, *_ in self.derived(spec, sampling)]

    def primary(self, spec, sampling):
        maj = f"maj@{sampling.n}_{spec.primary}"
        return maj if maj in self.metric_names(spec, sampling) else spec.primary

    def sample_scores(self, spec, item, results, outcomes, sampling) -> tuple[dict, list[dict], list]:
        """Per-item metrics from the item's samples: each metric's mean over samples (for one sample,
        its score), maj@n (the score of the most common extracted answer) and pass@k (k > 1)."""
        scorer = scorers.SCORERS[spec.scorer]
        per_sample = ([scorer.score(r.text, item.doc, o) for r, o in zip(results, outcomes)] if outcomes is not None
                      else [scorer.score(r.text, item.doc) for r in results])
        got = {m: sum(s[m] for s in per_sample) / len(per_sample) for m in spec.metrics}
        answers = [scorer.answer(r.text) for r in results] if scorer.answer else []
        for name, agg, k, m in self.derived(spec, sampling):
            if agg == "maj":
                got[name] = per_sample[metrics.majority_index([a[m] for a in answers], scorers.INVALID)][m]
            else:
                got[name] = metrics.pass_at_k(sampling.n, int(sum(s[m] for s in per_sample)), k)
        return got, per_sample, answers

    def score(self, spec, item, results, outcomes, sampling):
        first = results[0]
        got = per_sample = answers = None
        if outcomes is None or not any(o.status == "error" for o in outcomes):
            got, per_sample, answers = self.sample_scores(spec, item, results, outcomes, sampling)
        rec = GenerationRecord(index=item.index, prompt=item.prompt, generation=first.text, finish=first.finish,
                               num_tokens=len(first.tokens), target=item.gold, scores=got,
                               fewshot_indices=item.fewshot_indices, doc=item.doc)
        if outcomes is not None:
            execs = [{"status": o.status, "detail": o.detail, "seconds": round(o.seconds, 3),
                      "output_bytes": o.output_bytes, "memory_peak_mb": o.memory_peak_mb} for o in outcomes]
            rec.execution = execs if sampling.n > 1 else execs[0]
        if sampling.n > 1:
            rec.generation, rec.finish = [r.text for r in results], [r.finish for r in results]
            rec.num_tokens, rec.sample_scores, rec.answers = [len(r.tokens) for r in results], per_sample, answers
        return Scored(got, rec)


KINDS: dict[str, TaskKind] = {"multiple_choice": MultipleChoice(), "multiple_choice_context": MultipleChoiceContext(),
                              "generate": Generate()}
