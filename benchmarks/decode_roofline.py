"""Decode steps against the machine's roofline: how far our decoding is from what memory bandwidth
and matmul throughput allow.

    python benchmarks/decode_roofline.py [--model gemma3_270m] [--batches 1 8 32 64] [--contexts 256 1024] [--hf]

Measured first: memory bandwidth (the best of several copies of a 1 GiB tensor: bytes read plus
written per second) and the matmul peak (the best (n, n) @ (n, n) product, gpu_throughput.py's).
Then per batch and context, the lower bound of one decode step: every weight matrix read once
(the embedding is a lookup, but the tied head reads all of it), each row's keys and values read
once (sliding layers: the window), against the step's FLOPs (2 per weight per row, head included,
and 4 * heads * head_dim per query-key pair); the bound is the larger of bytes / bandwidth and
FLOPs / peak. The step is timed as the decoder runs it (backend.decode on a cache holding the
context, then generation.pick: the head in vocabulary chunks with its argmax), after two warm-up
steps. --hf adds greedy tokens/s of our
runner against transformers' generate at batch 1 and 16 on GSM8K prompts (decode_speed.py).
Prints one JSON line per measurement; --out also saves them as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import matmul_peak, sync  # noqa: E402


def bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of a `gib` GiB tensor (read + written)."""
    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def step_bound(model, batch: int, context: int, bw: float, peak: float) -> dict:
    """The lower bound of one decode step of `batch` rows after `context` tokens each."""
    from evalsuite.model.config import SLIDING
    cfg, item = model.cfg, model.dtype.itemsize
    lookups = ("embed", "ple_embed")  # rows read per token, not the whole table
    body = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not name.startswith(lookups))
    head = model.embed.weight.numel()
    seen = [min(context + 1, cfg.sliding_window) if kind == SLIDING else context + 1 for kind in cfg.layer_types]
    # Per layer: the keys each query reads (Gemma 4: per-type head widths; KV-sharing layers read
    # an earlier layer's keys, counted again as they are read again).
    kv_bytes = batch * sum(n * 2 * cfg.layer_kv_heads(k) * cfg.layer_head_dim(k)
                           for n, k in zip(seen, cfg.layer_types)) * item
    weight_bytes = (body + head) * item
    flops = 2 * batch * (body + head) + batch * sum(n * 4 * cfg.num_heads * cfg.layer_head_dim(k)
                                                    for n, k in zip(seen, cfg.layer_types))
    t_mem, t_flop = (weight_bytes + kv_bytes) / bw, flops / peak
    return {"weights_gb": round(weight_bytes / 1e9, 3), "kv_gb": round(kv_bytes / 1e9, 3),
            "gflop": round(flops / 1e9, 2), "bound_s": max(t_mem, t_flop),
            "bound_by": "memory" if t_mem >= t_flop else "matmul"}


@torch.inference_mode()
def time_step(backend, batch: int, context: int, steps: int = 6) -> float:
    """Seconds per decode step (decode, head, argmax) of `batch` rows after `context` random tokens."""
    from evalsuite.generation import pick
    from evalsuite.model.kvcache import KVCache
    from evalsuite.requests import Generation
    dev = backend.device
    one = backend.new_cache()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, context), generator=g).to(dev)
    backend.hidden(ids, torch.arange(context, device=dev)[None], torch.ones_like(ids, dtype=torch.bool), cache=one,
                   needed=torch.zeros_like(ids, dtype=torch.bool))
    cache = KVCache.stack([one] * batch) if batch > 1 else one
    tok = torch.full((batch,), 5, device=dev)
    greedy, gens = [Generation("")] * batch, [None] * batch
    times = []
    for i in range(steps + 2):
        sync(dev)
        t0 = time.perf_counter()
        h = backend.decode(cache, tok, torch.full((batch,), context + i, device=dev))
        tok = torch.tensor(pick(backend, h, greedy, gens, lambda total: None), device=dev)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]  # the median of the timed steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--hf", action="store_true", help="also greedy tokens/s against transformers' generate")
    ap.add_argument("--n", type=int, default=16, help="--hf: GSM8K prompts")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from evalsuite.backends import OursBackend
    from evalsuite.model import load_model
    lm = load_model(args.model, device=args.device)
    backend = OursBackend(lm)
    dev = lm.device
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    bw, peak = bandwidth(dev), matmul_peak(dev, lm.model.dtype, args.peak_size)
    emit({"measure": "machine", "bandwidth_gb_s": round(bw / 1e9, 2), "matmul_peak_gflop_s": round(peak / 1e9, 1),
          "threads": torch.get_num_threads(), "device": str(dev), "dtype": str(lm.model.dtype)})
    for context in args.contexts:
        for batch in args.batches:
            bound = step_bound(lm.model, batch, context, bw, peak)
            step = time_step(backend, batch, context)
            emit({"measure": "decode_step", "batch": batch, "context": context, **bound,
                  "bound_s": round(bound["bound_s"], 4), "step_s": round(step, 4),
                  "tokens_per_s": round(batch / step, 1), "bound_tokens_per_s": round(batch / bound["bound_s"], 1),
                  "of_roofline": round(bound["bound_s"] / step, 3)})
    if args.hf:
        from decode_speed import gsm8k_requests, hf_batched, hf_model, hf_one_by_one, ours_greedy
        reqs = gsm8k_requests(args.n)
        first = None
        for bs in (1, 16):
            row, toks = ours_greedy(lm, reqs, bs)
            first = first or toks
            emit({"measure": "greedy", **row})
        hf = hf_model(args.model)
        emit({"measure": "greedy", **hf_one_by_one(hf, lm, reqs, first)})
        emit({"measure": "greedy", **hf_batched(hf, lm, reqs, first)})
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
