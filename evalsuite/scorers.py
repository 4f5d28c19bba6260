"""Scorers for generated answers: scorer(generation text, doc) -> {metric: 0.0..1.0}.

A generation task names its scorer in task.yaml (`scorer: gsm8k`); the metrics a spec lists must be
among the scorer's METRICS.
"""

from __future__ import annotations

import re
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

SCORERS: dict[str, Callable[[str, dict[str, Any]], dict[str, float]]] = {"gsm8k": gsm8k}
