"""Run-vs-run comparison: paired statistics checked by hand and against scipy, on fixture runs."""

from __future__ import annotations

import json
import math

import pytest

from evalsuite import compare, metrics


def write_run(path, tasks: dict[str, dict], seed: int = 1234):
    """A run directory as python -m evalsuite writes it. tasks: name -> {"kind": "mc" | "gen",
    "scores": per-item primary values, optional setting overrides}."""
    path.mkdir(parents=True)
    report = {}
    for name, t in tasks.items():
        primary = "acc" if t["kind"] == "mc" else "f1"
        report[name] = {"version": 1, "primary": primary, "data_sha256": "d" * 64, "fewshot_sha256": "f" * 64,
                        "num_fewshot": 0, "fewshot_sampler": None, "chat_format": False, **t.get("settings", {})}
        with open(path / f"samples_{name}.jsonl", "w") as fh:
            for i, v in enumerate(t["scores"]):
                rec = ({"index": i, "gold": 1, "predictions": {"acc": 1 if v else 0}} if t["kind"] == "mc"
                       else {"index": i, "scores": {"f1": v}})
                fh.write(json.dumps(rec) + "\n")
    (path / "results.json").write_text(json.dumps({"config": {"seed": seed}, "tasks": report}))
    return path


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (3, 7), (10, 2), (25, 25), (0, 12), (40, 61)])
def test_mcnemar_exact_equals_scipy_binomial_test(b, c):
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert metrics.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_by_hand():
    # 0 vs 3 discordant items: 2 * (1/2)^3 = 0.25; 1 vs 4: 2 * (1 + 5) / 32 = 0.375
    assert metrics.mcnemar_exact(0, 3) == 0.25
    assert metrics.mcnemar_exact(1, 4) == 0.375


def test_paired_bootstrap_matches_scipy_bootstrap_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np
    base = [0.2, 0.5, 0.9, 0.4, 0.7, 0.1, 0.6, 0.3, 0.8, 0.5, 0.45, 0.35]
    cand = [0.3, 0.4, 1.0, 0.6, 0.9, 0.2, 0.5, 0.6, 0.8, 0.7, 0.50, 0.55]
    d = np.subtract(cand, base)
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=20000, method="percentile", random_state=1)
    dist = ref.bootstrap_distribution
    p_scipy = (np.count_nonzero(np.abs(dist - d.mean()) >= abs(d.mean()) - 1e-12) + 1) / (len(dist) + 1)
    p_ours = metrics.paired_bootstrap(base, cand, resamples=20000, seed=0)
    assert p_ours == pytest.approx(p_scipy, abs=0.01)
    assert metrics.paired_bootstrap(base, base) == 1.0  # no difference at all


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 -> 3*0.01=0.03, 2*0.02=0.04, 1*0.04=0.04 (monotone), back in input order
    assert metrics.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert metrics.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_planted_regression_exits_1_and_lists_flipped_items(tmp_path, capsys):
    good = [1] * 30 + [0] * 10
    worse = [0] * 12 + [1] * 18 + [0] * 10  # 12 right -> wrong, none the other way: p = 2 / 2^12
    base = write_run(tmp_path / "base", {"arc": {"kind": "mc", "scores": good},
                                         "drop": {"kind": "gen", "scores": [0.5] * 40}})
    cand = write_run(tmp_path / "cand", {"arc": {"kind": "mc", "scores": worse},
                                         "drop": {"kind": "gen", "scores": [0.5] * 40}})
    result = compare.compare(compare.load_run(base), compare.load_run(cand))
    arc, drop = result["tasks"]
    assert arc["test"] == "McNemar (exact)" and arc["p"] == pytest.approx(2 / 2 ** 12)
    assert arc["p_holm"] == pytest.approx(2 * 2 / 2 ** 12) and arc["lost"] == list(range(12)) and arc["gained"] == []
    assert arc["delta"] == pytest.approx(-12 / 40) and arc["verdict"] == "regressed"
    assert drop["test"].startswith("paired bootstrap") and drop["p"] == 1.0  # 0.5 is not pass/fail
    assert compare.main([str(base), str(cand)]) == 1
    out = capsys.readouterr().out
    # MDE by hand: 12 differences of -1, 28 of 0: sd 0.46410, se 0.07338, times z_.975 + z_.8 = 2.80164
    assert "| arc | acc | 40 | 75.00 | 45.00 | -30.00 | ±20.56 | McNemar (exact) |" in out
    assert "- arc right→wrong: items 0, 1, 2" in out
    assert compare.main([str(base), str(base)]) == 0


def test_non_binary_metric_uses_the_paired_bootstrap(tmp_path):
    base = write_run(tmp_path / "base", {"drop": {"kind": "gen", "scores": [0.2, 0.5, 0.9, 0.4, 1.0, 0.0]}})
    cand = write_run(tmp_path / "cand", {"drop": {"kind": "gen", "scores": [0.2, 0.5, 0.9, 0.4, 1.0, 0.3]}})
    row = compare.compare(compare.load_run(base), compare.load_run(cand))["tasks"][0]
    assert row["test"].startswith("paired bootstrap") and row["gained"] == [5] and row["lost"] == []
    assert 0 < row["p"] <= 1 and row["verdict"] == "no significant change"


def test_runs_on_different_data_are_not_comparable(tmp_path, capsys):
    base = write_run(tmp_path / "base", {"arc": {"kind": "mc", "scores": [1, 0]}})
    cand = write_run(tmp_path / "cand", {"arc": {"kind": "mc", "scores": [1, 0], "settings": {"data_sha256": "e" * 64}}})
    other_seed = write_run(tmp_path / "seed", {"arc": {"kind": "mc", "scores": [1, 0]}}, seed=7)
    assert compare.main([str(base), str(cand)]) == 2
    assert "arc: data_sha256 differs" in capsys.readouterr().err
    assert compare.main([str(base), str(other_seed)]) == 2
    assert "few-shot seed differs: 1234 vs 7" in capsys.readouterr().err
    assert compare.main([str(base), str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert not math.isnan(metrics.mcnemar_exact(0, 0))


def test_minimum_detectable_effect_and_clustered_stderr_by_hand():
    from scipy.stats import norm
    from evalsuite import metrics
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert metrics.minimum_detectable_effect(0.01) == pytest.approx(z * 0.01, rel=1e-12)
    assert metrics.minimum_detectable_effect(0.01, alpha=0.01, power=0.9) == pytest.approx(
        (norm.ppf(0.995) + norm.ppf(0.9)) * 0.01, rel=1e-12)
    base, cand = [1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0]  # differences 0 -1 0 0 1 -1
    mean = -1 / 6
    sd = ((mean ** 2 * 3 + (-1 - mean) ** 2 * 2 + (1 - mean) ** 2) / 5) ** 0.5
    assert metrics.paired_stderr(base, cand) == (pytest.approx(sd / 6 ** 0.5), "paired")
    se, basis = metrics.paired_stderr(base, base)  # nothing differs: the runs' own spread, unpaired
    assert basis.startswith("unpaired") and se == pytest.approx((2 * (4 / 6 * 2 / 6 * 6 / 5) / 6) ** 0.5)
    # clusters a, b, c with residuals 0, +1, -1 about the mean 0.5: sqrt(0 + 1 + 1) / 6
    assert metrics.clustered_stderr([1, 0, 1, 1, 0, 0], list("aabbcc")) == (pytest.approx(2 ** 0.5 / 6), 3)
    # one item per cluster: the plain standard error times sqrt((n - 1) / n)
    vals = [0.3, 1.0, 0.0, 0.7, 0.2]
    plain = metrics.mean_stderr(vals)[1]
    assert metrics.clustered_stderr(vals, list("abcde"))[0] == pytest.approx(plain * (4 / 5) ** 0.5)
    # two clusters of identical items: residual sums +1 and -1, sqrt(2) / 4, against the plain 0.2887
    assert metrics.clustered_stderr([1, 1, 0, 0], list("aabb"))[0] == pytest.approx(2 ** 0.5 / 4)
    assert metrics.mean_stderr([1, 1, 0, 0])[1] == pytest.approx(1 / 12 ** 0.5)
    assert metrics.between_groups_stderr([0.2, 0.4, 0.9]) == pytest.approx(
        (sum((x - 0.5) ** 2 for x in (0.2, 0.4, 0.9)) / 2 / 3) ** 0.5)
