"""A run in the files lm-evaluation-harness writes, for the dashboards and leaderboard scripts that read them.

    python -m evalsuite.export lm_eval RUN_DIR [--out DIR]      (or export=lm_eval on a run)

writes DIR/<model>/results_<date>.json (lm-eval's aggregated results: `results`, `groups`,
`group_subtasks`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`, `config`,
`git_hash`, `date`; metric keys as `acc,none` and `acc_stderr,none`) and one
samples_<task>_<date>.jsonl per task (lm-eval's per-sample fields: doc_id, doc, target, arguments,
resps, filtered_resps, filter, metrics, the hashes, and each metric's value). DIR defaults to
RUN_DIR/lm_eval. A task with groups (BBQ's categories, CrowS-Pairs' bias types, a macro average's
subtasks) is exported as an lm-eval group: its own row in `groups` and one `<task>_<group>` row per
group in `results`. What lm-eval has no place for (deviations, the parity gate, clustered standard
errors) goes under the key `evalsuite`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from .records import load_run, read_samples, record_scores

# Metrics where a lower value is better, as lm-eval marks them (bias scores are best at 0, pct_stereotype at 50).
LOWER_IS_BETTER = ("bias_score", "avg_toxicity", "pct_toxic", "pct_stereotype",
                   "likelihood_diff")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()  # lm-eval's hash_string


def _metrics(scores: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, s in scores.items():
        if not isinstance(s, dict) or "value" not in s:
            continue  # num_items and the like
        out[f"{m},none"] = s["value"]
        out[f"{m}_stderr,none"] = s["stderr"] if s.get("stderr") is not None else "N/A"
    return out


def _sanitize(name: str) -> str:
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)  # lm-eval's sanitize_model_name


def aggregated(run: dict) -> dict[str, Any]:
    results, groups, group_subtasks, configs = {}, {}, {}, {}
    versions, n_shot, higher, n_samples = {}, {}, {}, {}
    for task, t in run["tasks"].items():
        row = {"alias": task, **_metrics(t["metrics"])}
        metric_names = [m for m, s in t["metrics"].items() if isinstance(s, dict) and "value" in s]
        hib = {m: m not in LOWER_IS_BETTER for m in metric_names}
        results[task] = row
        versions[task], n_shot[task], higher[task] = t["version"], t["num_fewshot"], hib
        n_samples[task] = {"original": t.get("split_items", t["num_items"]), "effective": t["num_items"]}
        kind = "generate_until" if _generates(run, task) else "multiple_choice"
        configs[task] = {"task": task, "output_type": kind, "num_fewshot": t["num_fewshot"],
                         "metric_list": [{"metric": m, "higher_is_better": hib[m]} for m in metric_names],
                         "metadata": {"version": t["version"], "paper_row": t["paper_row"]},
                         "dataset_path": t.get("data_file"), "dataset_sha256": t.get("data_sha256")}
        subs = []
        for g, gs in (t.get("groups") or {}).items():
            name = f"{task}_{_sanitize(str(g)).replace(' ', '_')}"
            results[name] = {"alias": f" - {g}", **_metrics(gs)}
            versions[name], n_shot[name], higher[name] = t["version"], t["num_fewshot"], hib
            n_samples[name] = {"original": gs.get("num_items"), "effective": gs.get("num_items")}
            subs.append(name)
        group_subtasks[task] = subs
        if subs:
            groups[task] = row
    cfg = run.get("config", {})
    model = run["model"]
    created = dt.datetime.fromisoformat(run["created"])
    return {
        "results": results, "groups": groups, "group_subtasks": group_subtasks, "configs": configs,
        "versions": versions, "n-shot": n_shot, "higher_is_better": higher, "n-samples": n_samples,
        "config": {"model": "evalsuite", "model_args": f"backend={model.get('backend')},source={model.get('source')}",
                   "model_name": model.get("source"), "model_sha": model.get("fingerprint_sha256"),
                   "batch_size": cfg.get("batch_size"), "device": cfg.get("device"), "limit": cfg.get("limit"),
                   "random_seed": cfg.get("seed"), "fewshot_seed": cfg.get("seed"), "bootstrap_iters": 0,
                   "gen_kwargs": None, "use_cache": cfg.get("cache")},
        "git_hash": (run.get("git_commit") or "")[:7] or None,
        "date": created.timestamp(),
        "model_name": model.get("source"), "model_name_sanitized": _sanitize(str(model.get("source"))),
        "evalsuite": {"version": run.get("evalsuite_version"), "model": model,
                      "deviations": {task: t.get("deviations", []) for task, t in run["tasks"].items()},
                      "clustered_stderr": {task: {m: {"stderr_clustered": s["stderr_clustered"], "clusters": s["clusters"]}
                                                  for m, s in t["metrics"].items() if isinstance(s, dict) and "clusters" in s}
                                           for task, t in run["tasks"].items()},
                      "skipped_tasks": run.get("skipped_tasks", {})},
    }


def _generates(run: dict, task: str) -> bool:
    for _, rec in read_samples(run, task):
        return "generation" in rec
    return False


def sample(rec: dict) -> dict[str, Any]:
    """One record of ours as an lm-eval sample line."""
    doc = rec.get("doc", {})
    if "choices" in rec:  # a choice item: one (context, continuation) request per choice
        args = [[rec["prompt"], " " + c] for c in rec["choices"]]
        resps = [[[lp, g]] for lp, g in zip(rec["logprobs"], rec["is_greedy"])]
        filtered = [[lp, g] for lp, g in zip(rec["logprobs"], rec["is_greedy"])]
        target = rec["gold"]
        scores = record_scores(rec)
    else:
        gens = rec["generation"] if isinstance(rec["generation"], list) else [rec["generation"]]
        args = [[rec["prompt"], {"until": None}]]
        resps, filtered, target = [gens], gens[:1] if len(gens) == 1 else [gens], rec["target"]
        scores = record_scores(rec) or {}  # None: not scored
    arguments = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)} for i, arg in enumerate(args)}
    out = {"doc_id": rec["index"], "doc": doc, "target": str(target), "arguments": arguments, "resps": resps,
           "filtered_resps": filtered, "filter": "none", "metrics": list(scores),
           "doc_hash": _hash(json.dumps(doc, indent=2, ensure_ascii=False)), "prompt_hash": _hash(rec["prompt"]),
           "target_hash": _hash(str(target))}
    out.update({m: v for m, v in scores.items() if isinstance(v, (int, float))})
    return out


def lm_eval(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the lm-eval files of a run; returns their paths (results file first)."""
    run = load_run(run_dir)
    res = aggregated(run)
    date_id = dt.datetime.fromisoformat(run["created"]).replace(tzinfo=None).isoformat().replace(":", "-")
    folder = Path(out or Path(run_dir) / "lm_eval") / res["model_name_sanitized"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"results_{date_id}.json"]
    paths[0].write_text(json.dumps(res, indent=2, ensure_ascii=False, allow_nan=False))
    for task in run["tasks"]:
        path = folder / f"samples_{task}_{date_id}.jsonl"
        with open(path, "w") as fh:
            for _, rec in read_samples(run, task):
                fh.write(json.dumps(sample(rec), ensure_ascii=False, allow_nan=False) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalsuite.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("format", choices=["lm_eval"])
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="folder for the files (default: RUN_DIR/lm_eval)")
    args = ap.parse_args(argv)
    try:
        paths = lm_eval(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"lm-eval results: {paths[0]}\n{len(paths) - 1} samples files beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
