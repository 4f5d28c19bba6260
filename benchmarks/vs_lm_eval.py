"""evalsuite against lm-evaluation-harness: same model, same items, same prompts, one invocation.

    pip install -e ".[bench]"        # lm-eval 0.4.13 and transformers, pinned
    python benchmarks/vs_lm_eval.py  # HellaSwag 10-shot 500, ARC-c 25-shot 300, MMLU 5-shot 300, GSM8K 5-shot 50
    python benchmarks/vs_lm_eval.py --hellaswag 32 --arc-c 20 --mmlu 114 --gsm8k 8 --out /tmp/vs   # ~35 min on 2 cores
    python benchmarks/vs_lm_eval.py ... --reuse-lm-eval   # rerun evalsuite only, against the saved lm-eval side

The items and their prompts are built once, by evalsuite's task specs (the paper's shot counts,
few-shot blocks included). lm-evaluation-harness gets them as its own task definitions (YAML, one
per task) over local JSONL files whose documents are those prompts (num_fewshot 0: the few-shot
block is already in the text; multiple_choice with the choices as continuations; GSM8K as
generate_until with the same stop strings, token limit and lm-eval's GSM8K answer filters), run by
lm_eval.simple_evaluate with its HF backend: transformers loading the same GGUF file, fp32, eager
attention, BOS added. MMLU takes the first items of every subject in turn.

Each engine runs in its own process (so peak RSS is its own), one after the other, with the
machine's threads; model loading is timed apart. Printed and saved in --out: comparison.md and
comparison.json (per task: requests, seconds, requests/s, tokens/s, peak RSS, and the agreement of
per-item predictions and scores), plus each engine's per-item records (ours.json, lm_eval.json).
"tokens" is the work as lm-eval does it: each request's BOS, context and continuation tokens (GSM8K:
prompt plus generated tokens), the same number for both engines (evalsuite computes far fewer:
shared few-shot blocks run once).
Predictions of both engines are taken from their per-choice log-likelihoods with the same rule
(evalsuite.metrics.choice_predictions), GSM8K scores with evalsuite's scorer; lm-eval's own reported
metrics are saved beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = {"hellaswag": "acc_norm", "arc_c": "acc_norm", "mmlu": "acc", "gsm8k": "exact_match_flexible"}
ROOT = Path(__file__).resolve().parents[1]


def select(task: str, n: int) -> list:
    """The first n items (MMLU: the first items of every subject in turn, up to n)."""
    from evalsuite import tasks
    spec = tasks.load_spec(task)
    if task != "mmlu":
        return tasks.build_items(spec, limit=n)[0]
    items = tasks.build_items(spec)[0]
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(it.doc["subject"], []).append(it)
    picked, k = [], 0
    while len(picked) < n and any(k < len(v) for v in by.values()):
        picked += [v[k] for v in by.values() if k < len(v)][:n - len(picked)]
        k += 1
    return sorted(picked, key=lambda it: it.index)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


# ---- engines (each in its own process) ------------------------------------------------------------

def run_ours(args, sizes: dict[str, int]) -> dict:
    from evalsuite import metrics, scorers
    from evalsuite.model import load_model
    from evalsuite.runner import Runner

    t0 = time.perf_counter()
    lm = load_model(args.model)
    out = {"engine": "evalsuite", "load_seconds": time.perf_counter() - t0, "tasks": {}}
    tok = lm.tokenizer
    for task, n in sizes.items():
        items = select(task, n)
        # the work as lm-eval does it: BOS + context (+ continuation) tokens per request, nothing shared
        work = sum(1 + len(tok.encode(r.context)) + len(tok.encode(getattr(r, "continuation", "")))
                   for it in items for r in it.requests)
        runner = Runner(lm, batch_size=args.batch_size, generate_batch_size=args.generate_batch_size,
                        progress=args.progress)
        t0 = time.perf_counter()
        if task == "gsm8k":
            res = runner.generate_until([it.requests[0] for it in items])
            recs = [{"index": it.index, "generation": r.text,
                     "scores": scorers.SCORERS["gsm8k"].score(r.text, it.doc)} for it, r in zip(items, res)]
        else:
            res = iter(runner.loglikelihood([r for it in items for r in it.requests]))
            recs = []
            for it in items:
                lps = [next(res).logprob for _ in it.requests]
                recs.append({"index": it.index, "logprobs": lps, "gold": it.gold,
                             "predictions": metrics.choice_predictions(lps, it.choices)})
        out["tasks"][task] = {"seconds": time.perf_counter() - t0, "items": recs, "workload_tokens": work,
                              "tokens_forwarded": runner.tokens_forwarded, "tokens_generated": runner.tokens_generated}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def write_lm_eval_tasks(folder: Path, sizes: dict[str, int]) -> None:
    """One lm-eval task per benchmark: documents = evalsuite's prompts, continuations and gold."""
    import yaml
    folder.mkdir(parents=True, exist_ok=True)
    for task, n in sizes.items():
        items = select(task, n)
        docs = folder / f"{task}.jsonl"
        with open(docs, "w") as fh:
            for it in items:
                if task == "gsm8k":
                    doc = {"index": it.index, "context": it.requests[0].context, "answer": it.doc["answer"]}
                else:
                    contexts = {r.context for r in it.requests}
                    assert len(contexts) == 1, f"{task} item {it.index}: choices with different contexts"
                    doc = {"index": it.index, "context": it.requests[0].context,
                           "continuations": [r.continuation for r in it.requests], "gold": it.gold}
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        spec = {"task": f"evalsuite_{task}", "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(docs)}}, "test_split": "test",
                "doc_to_text": "context", "num_fewshot": 0}  # a field name: the text as is, no Jinja
        if task == "gsm8k":
            req = items[0].requests[0]
            spec.update(output_type="generate_until", doc_to_target="answer",
                        generation_kwargs={"until": list(req.stop), "do_sample": False, "temperature": 0.0,
                                           "max_gen_toks": req.max_tokens},
                        # lm-eval's own GSM8K metric and answer filters
                        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                      "ignore_case": True, "ignore_punctuation": False,
                                      "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
                        filter_list=[{"name": "strict-match", "filter": [
                                         {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                         {"function": "take_first"}]},
                                     {"name": "flexible-extract", "filter": [
                                         {"function": "regex", "group_select": -1,
                                          "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                         {"function": "take_first"}]}])
        else:  # the continuations carry their leading space
            spec.update(output_type="multiple_choice", doc_to_choice="continuations", doc_to_target="gold",
                        target_delimiter="", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


def run_lm_eval(args, sizes: dict[str, int]) -> dict:
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evalsuite import metrics, scorers
    from evalsuite.model import PRESET_SOURCES
    from evalsuite.model.weights import resolve_source

    t0 = time.perf_counter()
    path = resolve_source(PRESET_SOURCES.get(args.model, args.model))
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kw else path
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                           **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.lm_eval_batch_size, device="cpu", add_bos_token=True)
    out = {"engine": f"lm-eval {__import__('lm_eval').__version__}", "load_seconds": time.perf_counter() - t0,
           "tasks": {}}
    manager = TaskManager(include_path=str(args.out / "lm_eval_tasks"))
    for task in sizes:
        items = {it.index: it for it in select(task, sizes[task])}  # for scoring, outside the timing
        name = f"evalsuite_{task}"
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True)
        seconds = time.perf_counter() - t0
        samples = sorted(res["samples"][name], key=lambda s: s["doc"]["index"])
        if task == "gsm8k":
            recs, seen = [], set()
            for s in samples:
                if s["doc"]["index"] in seen:  # one record per answer filter; the generation is the same
                    continue
                seen.add(s["doc"]["index"])
                text = s["resps"][0][0]
                recs.append({"index": s["doc"]["index"], "generation": text,
                             "scores": scorers.SCORERS["gsm8k"].score(text, items[s["doc"]["index"]].doc)})
        else:
            recs = []
            for s in samples:
                lps = [float(r[0]) for r in s["filtered_resps"]]
                recs.append({"index": s["doc"]["index"], "logprobs": lps, "gold": s["doc"]["gold"],
                             "predictions": metrics.choice_predictions(lps, items[s["doc"]["index"]].choices)})
        out["tasks"][task] = {"seconds": seconds, "items": recs,
                              "reported": {k: v for k, v in res["results"][name].items() if isinstance(v, float)}}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---- comparison -----------------------------------------------------------------------------------

def compare(sizes, ours, theirs) -> dict:
    rows = {}
    for task in sizes:
        a, b = ours["tasks"][task], theirs["tasks"][task]
        ia, ib = {r["index"]: r for r in a["items"]}, {r["index"]: r for r in b["items"]}
        assert ia.keys() == ib.keys(), f"{task}: the engines scored different items"
        metric = TASKS[task]
        # tokens: the requests' tokens as lm-eval runs them (for GSM8K, prompts plus generated tokens)
        w = {"items": len(ia), "requests": len(ia) if task == "gsm8k" else sum(len(r["logprobs"]) for r in ia.values()),
             "tokens": a["workload_tokens"] + a["tokens_generated"]}
        row = {**w, "metric": metric}
        for tag, run in (("ours", a), ("lm_eval", b)):
            row[f"{tag}_seconds"] = run["seconds"]
            row[f"{tag}_requests_per_s"] = w["requests"] / run["seconds"]
            row[f"{tag}_tokens_per_s"] = w["tokens"] / run["seconds"]
        if task == "gsm8k":
            row["ours_score"] = statistics.mean(r["scores"][metric] for r in ia.values())
            row["lm_eval_score"] = statistics.mean(r["scores"][metric] for r in ib.values())
            row["identical_predictions"] = sum(ia[i]["generation"] == ib[i]["generation"] for i in ia) / len(ia)
            row["identical_scores"] = sum(ia[i]["scores"][metric] == ib[i]["scores"][metric] for i in ia) / len(ia)
            row["ours_generated_tokens"] = a["tokens_generated"]
        else:
            row["ours_score"] = statistics.mean(float(r["predictions"][metric] == r["gold"]) for r in ia.values())
            row["lm_eval_score"] = statistics.mean(float(r["predictions"][metric] == r["gold"]) for r in ib.values())
            row["identical_predictions"] = sum(ia[i]["predictions"][metric] == ib[i]["predictions"][metric]
                                               for i in ia) / len(ia)
            row["identical_acc_predictions"] = sum(ia[i]["predictions"]["acc"] == ib[i]["predictions"]["acc"]
                                                   for i in ia) / len(ia)
            deltas = [abs(x - y) for i in ia for x, y in zip(ia[i]["logprobs"], ib[i]["logprobs"])]
            row["max_abs_logprob_delta"] = max(deltas)
            row["median_abs_logprob_delta"] = statistics.median(deltas)
        row["lm_eval_reported"] = b.get("reported")
        row["ours_tokens_forwarded"] = a["tokens_forwarded"]
        row["speedup"] = b["seconds"] / a["seconds"]
        rows[task] = row
    return {"tasks": rows, "ours_peak_rss_mb": ours["peak_rss_mb"], "lm_eval_peak_rss_mb": theirs["peak_rss_mb"],
            "ours_load_seconds": ours["load_seconds"], "lm_eval_load_seconds": theirs["load_seconds"],
            "lm_eval_engine": theirs["engine"]}


def markdown(cmp: dict, args) -> str:
    lines = [f"evalsuite vs {cmp['lm_eval_engine']} (HF backend), model {args.model}, fp32 CPU, "
             f"{os.cpu_count()} cores; evalsuite batch_size {args.batch_size} (generation "
             f"{args.generate_batch_size}), lm-eval batch_size "
             f"{args.lm_eval_batch_size}", "",
             "| task | items | requests | tokens | evalsuite s | lm-eval s | speedup | evalsuite req/s | lm-eval req/s "
             "| evalsuite tok/s | lm-eval tok/s | metric | evalsuite | lm-eval | identical predictions | max abs Δ log-prob |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in cmp["tasks"].items():
        delta = f"{r['max_abs_logprob_delta']:.2e}" if "max_abs_logprob_delta" in r else "(generations)"
        lines.append(f"| {task} | {r['items']} | {r['requests']} | {r['tokens']} | {r['ours_seconds']:.1f} | "
                     f"{r['lm_eval_seconds']:.1f} | {r['speedup']:.1f}x | {r['ours_requests_per_s']:.2f} | "
                     f"{r['lm_eval_requests_per_s']:.2f} | {r['ours_tokens_per_s']:.0f} | {r['lm_eval_tokens_per_s']:.0f} | "
                     f"{r['metric']} | {100 * r['ours_score']:.2f} | {100 * r['lm_eval_score']:.2f} | "
                     f"{100 * r['identical_predictions']:.1f}% | {delta} |")
    lines += ["", f"Peak RSS: evalsuite {cmp['ours_peak_rss_mb']:.0f} MB, lm-eval {cmp['lm_eval_peak_rss_mb']:.0f} MB. "
              f"Model loading: evalsuite {cmp['ours_load_seconds']:.1f} s, lm-eval (transformers) "
              f"{cmp['lm_eval_load_seconds']:.1f} s (not in the task seconds)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3_270m", help="a preset, GGUF file or checkpoint folder")
    ap.add_argument("--hellaswag", type=int, default=500)
    ap.add_argument("--arc-c", type=int, default=300)
    ap.add_argument("--mmlu", type=int, default=300)
    ap.add_argument("--gsm8k", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16, help="evalsuite's batch_size")
    ap.add_argument("--generate-batch-size", type=int, default=64, help="evalsuite's generate_batch_size")
    ap.add_argument("--lm-eval-batch-size", default="1", help="lm-eval's batch_size (a number or auto)")
    ap.add_argument("--out", type=Path, default=Path("outputs/vs_lm_eval"))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--reuse-lm-eval", action="store_true",
                    help="keep lm_eval.json from an earlier run with the same sizes in --out (it takes long)")
    ap.add_argument("--engine", choices=["ours", "lm_eval"], help=argparse.SUPPRESS)  # the child processes
    args = ap.parse_args()
    args.out = args.out.resolve()
    sizes = {t: n for t, n in (("hellaswag", args.hellaswag), ("arc_c", args.arc_c), ("mmlu", args.mmlu),
                                ("gsm8k", args.gsm8k)) if n > 0}
    if args.engine:
        result = (run_ours if args.engine == "ours" else run_lm_eval)(args, sizes)
        (args.out / f"{args.engine}.json").write_text(json.dumps(result))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    write_lm_eval_tasks(args.out / "lm_eval_tasks", sizes)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    engines = ["ours"] if args.reuse_lm_eval and (args.out / "lm_eval.json").exists() else ["ours", "lm_eval"]
    for engine in engines:
        print(f"running {engine} ...", flush=True)
        subprocess.run([sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--reuse-lm-eval"],
                        "--engine", engine], check=True, env=env)
    ours, theirs = (json.loads((args.out / f"{e}.json").read_text()) for e in ("ours", "lm_eval"))
    cmp = compare(sizes, ours, theirs)
    (args.out / "comparison.json").write_text(json.dumps(cmp, indent=2))
    md = markdown(cmp, args)
    (args.out / "comparison.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
