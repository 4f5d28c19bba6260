"""Did a change move any score? Paired comparison of two runs on the items both scored.

    python -m evalsuite.compare <baseline run dir> <candidate run dir> [--alpha 0.05] [--json FILE]

Per task, on the primary metric: exact McNemar test when the per-item scores are pass/fail, paired
bootstrap otherwise; Holm correction across tasks; the items that flipped. Exit status 1 when a task
regresses significantly (candidate lower, Holm-adjusted p < alpha), 0 otherwise, 2 when the runs are
not comparable (different data, task versions or few-shot settings), with the reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import metrics
from .records import load_run, read_samples, record_scores

# What must be equal for two runs of a task to be compared item by item.
SETTINGS = ("version", "primary", "data_sha256", "fewshot_sha256", "num_fewshot", "fewshot_sampler", "chat_format",
            "sampling")


class NotComparable(Exception):
    pass


def item_scores(run: dict, task: str) -> dict[int, float]:
    """Per-item value of the task's primary metric, keyed by the item's index in its split."""
    primary = run["tasks"][task]["primary"]
    out = {}
    for n, rec in read_samples(run, task):
        try:
            scores = record_scores(rec)
        except ValueError as e:
            raise ValueError(f"{run['_dir']}/samples_{task}.jsonl:{n}: {e}") from None
        if scores is not None:  # None: not scored (its program could not be executed)
            out[rec["index"]] = float(scores[primary])
    return out


def differences(base: dict, cand: dict) -> list[str]:
    """Why two runs cannot be compared (empty when they can)."""
    why = []
    common = [t for t in base["tasks"] if t in cand["tasks"]]
    if not common:
        why.append(f"no task in common (baseline: {', '.join(base['tasks'])}; candidate: {', '.join(cand['tasks'])})")
    seed_b, seed_c = base.get("config", {}).get("seed"), cand.get("config", {}).get("seed")
    if seed_b != seed_c:
        why.append(f"few-shot seed differs: {seed_b} vs {seed_c}")
    for t in common:
        for key in SETTINGS:
            vb, vc = base["tasks"][t].get(key), cand["tasks"][t].get(key)
            if vb != vc:
                why.append(f"{t}: {key} differs: {vb!r} vs {vc!r}")
    return why


def compare(base: dict, cand: dict, alpha: float = 0.05, resamples: int = 10000) -> dict:
    why = differences(base, cand)
    if why:
        raise NotComparable("; ".join(why))
    rows = []
    for task in [t for t in base["tasks"] if t in cand["tasks"]]:
        sb, sc = item_scores(base, task), item_scores(cand, task)
        common = sorted(set(sb) & set(sc))
        xb, xc = [sb[i] for i in common], [sc[i] for i in common]
        binary = all(v in (0.0, 1.0) for v in xb + xc)
        if binary:
            lost = [i for i in common if sb[i] == 1.0 and sc[i] == 0.0]
            gained = [i for i in common if sb[i] == 0.0 and sc[i] == 1.0]
            p, test = metrics.mcnemar_exact(len(lost), len(gained)), "McNemar (exact)"
        else:
            lost = [i for i in common if sc[i] < sb[i]]
            gained = [i for i in common if sc[i] > sb[i]]
            p, test = metrics.paired_bootstrap(xb, xc, resamples), f"paired bootstrap ({resamples})"
        n = len(common)
        mb, mc = (sum(xb) / n, sum(xc) / n) if n else (float("nan"), float("nan"))
        se, basis = metrics.paired_stderr(xb, xc)
        rows.append({"task": task, "metric": base["tasks"][task]["primary"], "items": n,
                     "items_only_in_one_run": len(set(sb) ^ set(sc)), "baseline": mb, "candidate": mc,
                     "delta": mc - mb, "test": test, "p": p, "lost": lost, "gained": gained,
                     # the difference this comparison would have caught 80% of the time (two-sided, alpha)
                     "mde": metrics.minimum_detectable_effect(se, alpha), "mde_basis": basis})
    for row, adj in zip(rows, metrics.holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["verdict"] = ("regressed" if row["delta"] < 0 and adj < alpha else
                          "improved" if row["delta"] > 0 and adj < alpha else "no significant change")
    return {"baseline": base["_dir"], "candidate": cand["_dir"], "alpha": alpha, "tasks": rows,
            "regressed": [r["task"] for r in rows if r["verdict"] == "regressed"]}


def markdown(result: dict, max_flips: int = 20) -> str:
    lines = [f"Baseline: `{result['baseline']}`  ", f"Candidate: `{result['candidate']}`  ",
             f"Holm-corrected across {len(result['tasks'])} tasks, alpha = {result['alpha']}", "",
             "MDE: the smallest true difference detected 80% of the time (two-sided test at alpha, before Holm)", "",
             "| task | metric | items | baseline | candidate | Δ | MDE (80% power) | test | p | p (Holm) | right→wrong | "
             "wrong→right | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        mde = f"±{100 * r['mde']:.2f}" + (" (unpaired)" if r["mde_basis"].startswith("unpaired") else "")
        lines.append(f"| {r['task']} | {r['metric']} | {r['items']} | {100 * r['baseline']:.2f} | "
                     f"{100 * r['candidate']:.2f} | {100 * r['delta']:+.2f} | {mde} | {r['test']} | {r['p']:.4g} | "
                     f"{r['p_holm']:.4g} | {len(r['lost'])} | {len(r['gained'])} | {r['verdict']} |")
    for r in result["tasks"]:
        for label, idx in (("right→wrong" if r["test"].startswith("McNemar") else "lower", r["lost"]),
                           ("wrong→right" if r["test"].startswith("McNemar") else "higher", r["gained"])):
            if idx:
                more = f" … (+{len(idx) - max_flips})" if len(idx) > max_flips else ""
                lines.append(f"- {r['task']} {label}: items {', '.join(map(str, idx[:max_flips]))}{more}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalsuite.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm correction")
    ap.add_argument("--resamples", type=int, default=10000, help="paired bootstrap resamples")
    ap.add_argument("--json", help="also write the comparison to this JSON file")
    args = ap.parse_args(argv)
    try:
        result = compare(load_run(args.baseline), load_run(args.candidate), args.alpha, args.resamples)
    except NotComparable as e:
        print(f"not comparable: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["regressed"]:
        print(f"regressed: {', '.join(result['regressed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
