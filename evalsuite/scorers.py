"""Scorers for generated answers: scorer(generation text, doc) -> {metric: 0.0..1.0}.

A generation task names its scorer in task.yaml (`scorer: gsm8k`); the metrics a spec lists must be
among the scorer's METRICS.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable

INVALID = "[invalid]"

# GSM8K, as lm-evaluation-harness's gsm8k task scores it: the reference is the number after "####";
# "strict" reads the number after "#### " in the generation (the format the exemplars teach),
# "flexible" takes the last number-like span anywhere in it. Both sides then drop commas, "$" and a
# trailing period before an exact string comparison.
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _gsm8k_clean(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def gsm8k_reference(answer: str) -> str:
    return _gsm8k_clean(answer.split("####")[-1])


def gsm8k_extract(text: str) -> dict[str, str]:
    strict = _GSM8K_STRICT.search(text)
    spans = [a or b for a, b in _GSM8K_FLEXIBLE.findall(text)]
    return {"strict": _gsm8k_clean(strict.group(1)) if strict else INVALID,
            "flexible": _gsm8k_clean(spans[-1]) if spans else INVALID}


def gsm8k(text: str, doc: dict[str, Any]) -> dict[str, float]:
    ref = gsm8k_reference(doc["answer"])
    got = gsm8k_extract(text)
    return {"exact_match_strict": float(got["strict"] == ref), "exact_match_flexible": float(got["flexible"] == ref)}


gsm8k.METRICS = ("exact_match_strict", "exact_match_flexible")  # type: ignore[attr-defined]

# Short-answer QA (Natural Questions open, TriviaQA): the official SQuAD/TriviaQA answer normalisation
# (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed), then exact match
# against any of the reference answers.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`", "“", "”"}


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_any(text: str, references: list[str]) -> float:
    got = normalize_answer(text)
    return float(any(got == normalize_answer(r) for r in references))


def nq_open(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": exact_match_any(text, doc["answer"])}


def triviaqa(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": exact_match_any(text, doc["answer"]["aliases"])}


nq_open.METRICS = triviaqa.METRICS = ("exact_match",)  # type: ignore[attr-defined]

# BBH with chain of thought (Suzgun et al. 2022): the answer is what follows the last "the answer is"
# in the generation, without a final period, compared exactly with the target.
_BBH_ANSWER = re.compile(r"the answer is ", re.IGNORECASE)


def bbh_extract(text: str) -> str:
    found = list(_BBH_ANSWER.finditer(text))
    if not found:
        return INVALID
    ans = text[found[-1].end():].split("\n", 1)[0].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def bbh(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": float(bbh_extract(text) == doc["target"].strip())}


bbh.METRICS = ("exact_match",)  # type: ignore[attr-defined]

SCORERS: dict[str, Callable[[str, dict[str, Any]], dict[str, float]]] = {
    "gsm8k": gsm8k, "nq_open": nq_open, "triviaqa": triviaqa, "bbh": bbh}
