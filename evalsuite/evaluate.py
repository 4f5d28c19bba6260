"""Run tasks on a model and write results.json, samples_<task>.jsonl and a Markdown summary."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from . import metrics, scorers, tasks
from .backends import as_backend
from .runner import Runner

# Rows of the Gemma 2 paper's table that exist as tasks so far.
SUITES = {"paper": ["mmlu", "arc_c", "arc_e", "gsm8k", "math", "agieval", "bbh", "triviaqa", "nq", "drop", "hellaswag", "winogrande", "piqa", "siqa",
                    "boolq"]}


def expand_tasks(names: list[str], data_source: str = "local") -> tuple[list[str], dict[str, str]]:
    """Task names to run, and the suite members left out (name -> why): with data.source=local, a
    suite skips the tasks that have no local copy; a task named on its own is never skipped."""
    out: list[str] = []
    skipped: dict[str, str] = {}
    for n in names:
        for t in SUITES.get(n, [n]):
            spec = tasks.load_spec(t)  # unknown names fail here, listing the valid ones
            if data_source == "local" and not spec["data"].get("file"):
                if n not in SUITES:
                    raise tasks.TaskError(tasks.no_local_copy(spec))
                skipped[t] = f"no local copy of {spec['data']['hub']['id']}; run with data.source=hub"
            elif t not in out:
                out.append(t)
    return out, skipped


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(model, task_names: list[str], out_dir: Path, *, limit=None, num_fewshot=None, seed=1234,
        batch_size=16, token_budget=16384, data_source="local", progress=True, chat=False, fewshot_sampler=None,
        share_prefix=True, skipped: dict[str, str] | None = None, config: dict | None = None) -> dict:
    """model: a LoadedModel (our network) or a backend from evalsuite.backends."""
    backend = as_backend(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    built = {}
    for name in task_names:
        spec = tasks.load_spec(name)
        built[name] = (spec, *tasks.build_items(spec, num_fewshot, limit, seed, data_source, chat=chat,
                                                sampler=fewshot_sampler))
    # All tasks' requests are pooled, per request type, so batching and sharing work across tasks.
    ll_requests = [r for spec, items, _ in built.values() if spec["kind"] != "generate" for it in items
                   for r in it.requests]
    gen_requests = [it.requests[0] for spec, items, _ in built.values() if spec["kind"] == "generate" for it in items]
    runner = Runner(backend, batch_size=batch_size, token_budget=token_budget, progress=progress,
                    share_prefix=share_prefix)
    t0 = time.perf_counter()
    ll_results = runner.loglikelihood(ll_requests) if ll_requests else []
    gen_results = runner.generate_until(gen_requests) if gen_requests else []
    score_seconds = time.perf_counter() - t0
    k = g = 0  # next unread result of each request type
    report: dict[str, Any] = {}
    for name, (spec, items, prov) in built.items():
        per_metric: dict[str, list[float]] = {m: [] for m in spec["metrics"]}
        with open(out_dir / f"samples_{name}.jsonl", "w") as fh:
            for it in items:
                if spec["kind"] == "generate":
                    res = gen_results[g]
                    g += 1
                    got = scorers.SCORERS[spec["scorer"]](res.text, it.doc)
                    record = {"index": it.index, "prompt": it.prompt, "generation": res.text, "finish": res.finish,
                              "num_tokens": len(res.tokens), "target": it.gold,
                              "scores": {m: got[m] for m in spec["metrics"]}}
                else:
                    res = ll_results[k:k + len(it.requests)]
                    k += len(it.requests)
                    lps = [r.logprob for r in res]
                    preds = metrics.choice_predictions(lps, it.choices)
                    got = {m: float(preds[m] == it.gold) for m in spec["metrics"]}
                    record = {"index": it.index, "prompt": it.prompt, "choices": it.choices, "gold": it.gold,
                              "logprobs": lps, "is_greedy": [r.is_greedy for r in res],
                              "num_tokens": [r.num_tokens for r in res],
                              "predictions": {m: preds[m] for m in spec["metrics"]}}
                for m in spec["metrics"]:
                    per_metric[m].append(got[m])
                record.update(fewshot_indices=it.fewshot_indices, doc=it.doc)
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        scores, groups = {}, {}
        macro_by = spec.get("macro_by")
        for m, vals in per_metric.items():
            if macro_by:  # mean of the subtask means; stderr from the subtasks' independent stderrs
                by: dict[str, list[float]] = {}
                for it, v in zip(items, vals):
                    by.setdefault(str(it.doc[macro_by]), []).append(v)
                sub = {g: metrics.mean_stderr(v) for g, v in by.items()}
                for group, (mean, se) in sub.items():
                    groups.setdefault(group, {"num_items": len(by[group])})[m] = {"value": mean, "stderr": se}
                mean = sum(v[0] for v in sub.values()) / len(sub)
                se = math.sqrt(sum(v[1] ** 2 for v in sub.values() if v[1] == v[1])) / len(sub)
            else:
                mean, se = metrics.mean_stderr(vals)
            scores[m] = {"value": mean, "stderr": se}
        report[name] = {"paper_row": spec["paper_row"], "version": spec["version"], "primary": spec["primary"],
                        "metrics": scores, "num_items": len(items), **prov}
        if macro_by:
            report[name].update(aggregation=f"macro average over {len(groups)} {macro_by} groups", groups=groups)
    out = {
        "evalsuite_version": "0.1.0", "git_commit": git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {}, "model": backend.describe(),
        "tasks": report, "skipped_tasks": skipped or {},
        "timing": {"wall_seconds": time.perf_counter() - t_start, "scoring_seconds": score_seconds,
                   "requests": len(ll_requests) + len(gen_requests), "tokens_scored": runner.tokens_scored,
                   "tokens_forwarded": runner.tokens_forwarded, "tokens_generated": runner.tokens_generated,
                   "tokens_per_second": runner.tokens_forwarded / score_seconds if score_seconds else None},
    }
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    (out_dir / "summary.md").write_text(summary_markdown(out))
    return out


def summary_markdown(res: dict) -> str:
    lines = [f"Model: {res['model']['source']} ({(res['model']['fingerprint_sha256'] or '')[:12]}, "
             f"backend {res['model']['backend']})", "",
             "| task | metric | value | ± stderr | items | shots | notes |", "|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        for m, s in t["metrics"].items():
            mark = " (primary)" if m == t["primary"] else ""
            lines.append(f"| {name} | {m}{mark} | {100 * s['value']:.2f} | {100 * s['stderr']:.2f} | "
                         f"{t['num_items']} | {t['num_fewshot']} | {'; '.join(t['deviations'])} |")
    for name, why in res.get("skipped_tasks", {}).items():
        lines.append(f"| {name} | not run | | | | | {why} |")
    tm = res["timing"]
    lines += ["", f"{tm['requests']} requests, {tm['tokens_forwarded']} tokens forwarded and "
                  f"{tm.get('tokens_generated', 0)} generated in {tm['scoring_seconds']:.1f}s "
                  f"({tm['tokens_per_second'] or 0:.0f} tokens forwarded/s); wall {tm['wall_seconds']:.1f}s"]
    return "\n".join(lines) + "\n"
