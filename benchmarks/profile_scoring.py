"""Where log-likelihood scoring spends its time, and its FLOP/s against this machine's matmul peak.

    python benchmarks/profile_scoring.py --task hellaswag --limit 40 [--model gemma3_270m] [--threads N]
    python benchmarks/profile_scoring.py --task mmlu --limit 114   # MMLU: the items vs_lm_eval.py takes

1. Peak: fp32 torch.mm on square matrices (1024..4096) and on the vocabulary head's shape
   (512 x hidden @ hidden x vocab); the best GFLOP/s is the machine's measured peak.
2. The task's requests are scored once without the profiler (the time) and once under
   torch.profiler with FLOP counting (matmul-type ops: mm, addmm, bmm, matmul); achieved FLOP/s =
   counted FLOPs / unprofiled seconds. The counted FLOPs are those executed, padding included.
3. The profile: ops by self CPU time.
Prints one JSON object (and the op table).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_gflops(m: int, k: int, n: int, repeat: int = 3) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from evalsuite.model import load_model
    from evalsuite.runner import Runner

    lm = load_model(args.model)
    cfg = lm.config
    peak = {f"{n}x{n}x{n}": matmul_gflops(n, n, n) for n in (1024, 2048, 4096)}
    peak[f"head 512x{cfg.hidden_size}x{cfg.vocab_size}"] = matmul_gflops(512, cfg.hidden_size, cfg.vocab_size, 2)
    from vs_lm_eval import select  # the same items as the side-by-side benchmark (MMLU: across subjects)
    items = select(args.task, args.limit)
    requests = [r for it in items for r in it.requests]

    runner = Runner(lm, batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()
    runner.loglikelihood(requests)
    seconds = time.perf_counter() - t0

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        Runner(lm, batch_size=args.batch_size, progress=False).loglikelihood(requests)
    events = prof.key_averages()
    flops = sum(e.flops for e in events)
    total_self = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    best = max(peak.values())
    out = {"task": args.task, "items": len(items), "requests": len(requests), "threads": torch.get_num_threads(),
           "seconds": round(seconds, 2), "tokens_forwarded": runner.tokens_forwarded,
           "tokens_scored": runner.tokens_scored, "counted_gflop": round(flops / 1e9, 1),
           "achieved_gflops": round(flops / seconds / 1e9, 1), "peak_gflops": {k: round(v, 1) for k, v in peak.items()},
           "fraction_of_peak": round(flops / seconds / 1e9 / best, 3),
           "self_cpu_share": {e.key: round(e.self_cpu_time_total / total_self, 3) for e in top}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
