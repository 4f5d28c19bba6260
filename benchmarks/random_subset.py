"""Score a seeded random subset of a multiple-choice task, an unbiased estimate of the full-split score
when the full split is too slow to run (`limit=N` takes the first N items, which are not a random
sample when a split is ordered by source, as HellaSwag's is).

    python benchmarks/random_subset.py --task hellaswag --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--task", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from evalsuite import metrics, tasks
    from evalsuite.model import load_model
    from evalsuite.runner import Runner

    spec = tasks.load_spec(args.task)
    if spec.kind == "generate":
        raise SystemExit(f"{args.task} is a generation task; this script scores multiple-choice tasks")
    items, _ = tasks.build_items(spec)
    subset = sorted(random.Random(args.seed).sample(items, min(args.n, len(items))), key=lambda it: it.index)
    lm = load_model(args.model)
    runner = Runner(lm, progress=False)
    t0 = time.perf_counter()
    res = runner.loglikelihood([r for it in subset for r in it.requests])
    dt = time.perf_counter() - t0
    hits: dict[str, list[float]] = {m: [] for m in spec.metrics}
    k = 0
    for it in subset:
        lps = [r.logprob for r in res[k:k + len(it.requests)]]
        k += len(it.requests)
        preds = metrics.choice_predictions(lps, it.choices)
        for m in hits:
            hits[m].append(float(preds[m] == it.gold))
    out = {"task": args.task, "items": len(subset), "of": len(items), "seed": args.seed, "seconds": round(dt, 1),
           "tokens_forwarded": runner.tokens_forwarded}
    for m, v in hits.items():
        mean, se = metrics.mean_stderr(v)
        out[m] = {"value": round(100 * mean, 2), "stderr": round(100 * se, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
