"""What a task asks of a model and what comes back: the request and result types, and the split rule.

Plain data, importable without torch: tasks build requests, a backend (evalsuite.backends) answers
them, evaluate pairs the answers with the items that asked.

Tokenization split (stable, stated): trailing spaces of a context move to the front of its
continuation (`split_pair`); then the runner encodes each part alone: the shared few-shot prefix
(with BOS), the rest of the context (with BOS when there is no prefix), and the continuation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Chat:
    """A prompt in the Gemma chat format: few-shot examples as (user, model) turns, then the question.

    Encoded as [BOS] (<start_of_turn>user\\n{u}<end_of_turn>\\n<start_of_turn>model\\n{m}<end_of_turn>\\n)*
    <start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n, with the turn markers inserted
    by id (never parsed out of text). The example turns are the shared prefix. Gemma 4 names its
    markers <|turn> and <turn|> (the same ids, 105 and 106, as Gemma 3's).

    system: an optional system instruction. Gemma 4 has a system role (a first `system` turn);
    Gemma 1-3 have none, and it goes before the first user text followed by a blank line, as Gemma
    3's chat template puts it.
    """
    examples: tuple[tuple[str, str], ...]
    user: str
    system: str = ""

    def folded(self, system_role: bool) -> "Chat":
        """The same prompt for a model without a system role: the instruction in the first user turn."""
        if not self.system or system_role:
            return self
        if self.examples:
            (user, model), *rest = self.examples
            return Chat(((f"{self.system}\n\n{user}", model), *rest), self.user)
        return Chat((), f"{self.system}\n\n{self.user}")


@dataclass(frozen=True)
class Loglikelihood:
    context: str | Chat
    continuation: str
    shared_prefix: int = 0  # leading characters of `context` shared by many requests (few-shot block)


@dataclass(frozen=True)
class Generation:
    context: str | Chat
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0  # sampling generator seed, per request, so outputs do not depend on batching
    shared_prefix: int = 0  # leading characters of `context` shared by many requests (few-shot block)


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    num_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    text: str  # up to, not including, the first stop string
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"  # "stop" (a stop string), "eos" (a stop token) or "length"


class TooLong(ValueError):
    """A request longer than the model's context. Nothing is truncated: a score computed on a cut
    prompt is not the benchmark's score, so the run stops and names the request."""

    def __init__(self, index: int, what: str):
        self.index, self.what = index, what
        super().__init__(f"request {index} {what}; evalsuite does not truncate prompts")


class RequestFailed(ValueError):
    """A request an engine could not answer, or answered with something that cannot be scored (an
    inference server's error after its retries, a reply without the prompt's log-probs): the run
    stops and names it. Nothing is scored as 0 or skipped."""

    def __init__(self, index: int, what: str):
        self.index, self.what = index, what
        super().__init__(f"request {index}: {what}")


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return context, continuation


@runtime_checkable
class RequestBackend(Protocol):
    """What evaluate asks of an engine. evalsuite.runner.Runner implements it over backends that
    expose hidden states (ours, transformers: packing, prefix sharing and the head only where scored
    live there); a backend that only answers requests (an inference server) implements it directly.
    Results come back in the order of the requests."""

    def loglikelihood(self, requests: list[Loglikelihood]) -> list[LoglikelihoodResult]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[LoglikelihoodResult]: ...

    def generate_until(self, requests: list[Generation]) -> list[GenerationResult]: ...

    def describe(self) -> dict[str, Any]:
        """What results.json records about the model."""
        ...

    def version_key(self) -> dict[str, Any]:
        """Everything that decides the numbers (weights, code, library versions): the result cache's key."""
        ...
