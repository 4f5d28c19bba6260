"""Multiple-choice metrics with standard errors (sample standard deviation / sqrt(n))."""

from __future__ import annotations

import math


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first maximum on ties


def choice_predictions(logprobs: list[float], choices: list[str]) -> dict[str, int]:
    """acc: highest log-prob; acc_norm: per character of the choice text; acc_bytes: per UTF-8 byte."""
    return {
        "acc": argmax(logprobs),
        "acc_norm": argmax([lp / max(1, len(c)) for lp, c in zip(logprobs, choices)]),
        "acc_bytes": argmax([lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logprobs, choices)]),
    }


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
