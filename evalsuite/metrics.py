"""Metrics: multiple-choice predictions, the aggregations of per-item values into a task's score
(mean with its standard error, sample standard deviation / sqrt(n); macro average over groups), and
the aggregates of several samples per prompt (majority vote, unbiased pass@k)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHOICE_METRICS = ("acc", "acc_norm", "acc_bytes")  # the per-item rules of choice_predictions
NOT_SHARES = ("likelihood_diff",)  # metrics in their own unit; every other is a share, shown as a percentage


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first maximum on ties


def choice_predictions(logprobs: list[float], choices: list[str]) -> dict[str, int]:
    """acc: highest log-prob; acc_norm: per character of the choice text; acc_bytes: per UTF-8 byte."""
    return {
        "acc": argmax(logprobs),
        "acc_norm": argmax([lp / max(1, len(c)) for lp, c in zip(logprobs, choices)]),
        "acc_bytes": argmax([lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logprobs, choices)]),
    }


def probability_mass(logprobs: list[float], right: list[int]) -> float:
    """The share of probability on the right choices, the choices' probabilities normalised to sum 1
    (TruthfulQA MC2); computed from log-probabilities shifted by their maximum, so nothing underflows."""
    top = max(logprobs)
    p = [math.exp(lp - top) for lp in logprobs]
    return sum(p[i] for i in right) / sum(p)


def bootstrap_stderr(statistic, columns: dict[str, list[float]], resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of a statistic of whole items (a ratio, not a mean) by resampling items with
    replacement: the sample standard deviation of the statistic over `resamples` resamples."""
    import numpy as np

    n = len(next(iter(columns.values())))
    if n < 2:
        return float("nan")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    rng = np.random.default_rng(seed)
    stats = [statistic(**{k: a[idx] for k, a in arrays.items()})
             for idx in rng.integers(0, n, size=(resamples, n))]
    return float(np.std(stats, ddof=1))


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def clustered_stderr(values: list[float], clusters: list[str]) -> tuple[float, int]:
    """(standard error of the mean, number of clusters) when items come in clusters whose items are
    not independent (one MMLU subject, one BBQ template): the cluster-robust variance of a mean,
    sum over clusters of (sum of the cluster's residuals x_i - mean) squared, over n squared (Miller
    2024, "Adding Error Bars to Evals", arXiv 2411.00640, eq. 4; no small-sample correction). With
    one item per cluster it is the plain standard error times sqrt((n - 1) / n)."""
    n = len(values)
    if n < 2 or len(set(clusters)) < 2:
        return float("nan"), len(set(clusters))
    mean = sum(values) / n
    residual: dict[str, float] = {}
    for v, c in zip(values, clusters):
        residual[c] = residual.get(c, 0.0) + (v - mean)
    return math.sqrt(sum(r * r for r in residual.values())) / n, len(residual)


def between_groups_stderr(means: list[float]) -> float:
    """Standard error of a macro average when its groups (BBH's subtasks) are themselves a sample:
    the standard deviation of the group means over sqrt(number of groups)."""
    g = len(means)
    if g < 2:
        return float("nan")
    m = sum(means) / g
    return math.sqrt(sum((x - m) ** 2 for x in means) / (g - 1) / g)


def minimum_detectable_effect(stderr: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with probability `power`,
    given the standard error of the estimated difference: (z_(1 - alpha/2) + z_power) * stderr
    (normal approximation; Miller 2024, section 5). 2.80 standard errors at the defaults."""
    from statistics import NormalDist
    return (NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)) * stderr


def paired_stderr(base: list[float], cand: list[float]) -> tuple[float, str]:
    """(standard error of the mean paired difference, how it was estimated): the differences' own
    spread; where no item differs that is 0 and says nothing of what could have been detected, so
    the runs' variances are used as if unpaired (an upper bound when the pairs correlate positively)."""
    n = len(base)
    if n < 2:
        return float("nan"), "fewer than 2 items"
    d = [c - b for b, c in zip(base, cand)]
    se = mean_stderr(d)[1]
    if se > 0:
        return se, "paired"
    return math.sqrt(mean_stderr(base)[1] ** 2 + mean_stderr(cand)[1] ** 2), "unpaired (no item differs)"


class Mean:
    """The mean over items and its standard error."""

    def __call__(self, values: list[float], docs: list[dict[str, Any]]) -> tuple[float, float, dict | None]:
        return (*mean_stderr(values), None)


@dataclass(frozen=True)
class MacroMean:
    """A task of subtasks: the mean of the subtasks' means (items grouped by a field of their doc);
    its standard error from the subtasks' independent ones (NaN when a subtask has a single item)."""
    field: str

    def describe(self, groups: int) -> str:
        return f"macro average over {groups} {self.field} groups"

    def __call__(self, values: list[float], docs: list[dict[str, Any]]) -> tuple[float, float, dict | None]:
        by: dict[str, list[float]] = {}
        for doc, v in zip(docs, values):
            by.setdefault(str(doc[self.field]), []).append(v)
        sub = {g: (len(v), *mean_stderr(v)) for g, v in by.items()}  # group -> (items, mean, stderr)
        if not sub:
            return float("nan"), float("nan"), {}
        mean = sum(v[1] for v in sub.values()) / len(sub)
        return mean, math.sqrt(sum(v[2] ** 2 for v in sub.values())) / len(sub), sub


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(answers: list[str], invalid: str | None = None) -> int:
    """Index of the first sample whose answer is the most frequent one (ties: the answer seen first).
    Samples whose answer is `invalid` (nothing extracted) do not vote unless no sample has an answer."""
    voters = [i for i, a in enumerate(answers) if a != invalid] or list(range(len(answers)))
    counts: dict[str, int] = {}
    for i in voters:
        counts[answers[i]] = counts.get(answers[i], 0) + 1
    top = max(counts.values())
    return next(i for i in voters if counts[answers[i]] == top)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, the powers of ten below n, and n."""
    return sorted({1, n} | {10 ** e for e in range(1, 6) if 10 ** e < n})


# ---- paired statistics for run-vs-run comparison ----------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b items right only in the baseline, c only in the candidate;
    under no difference each discordant item goes either way with probability 1/2 (a binomial test)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(base: list[float], cand: list[float], resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference (cand - base) by resampling items with
    replacement: the share of resampled mean differences at least as far from the observed one as the
    observed one is from 0 (the bootstrap distribution centred under the null)."""
    import numpy as np

    d = np.asarray(cand, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(d) == 0:
        return 1.0
    observed = d.mean()
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    return float((extreme + 1) / (resamples + 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
