"""Prefill and decode throughput of our network on random weights at real Gemma shapes, with MFU
against the device's own measured matmul peak.

    # on a GPU (bf16; both attention paths; Gemma 2 2B and 9B shapes)
    python benchmarks/gpu_throughput.py --device cuda --dtype bfloat16 --presets gemma2_2b gemma2_9b
    # the same code on CPU at a toy size (checks that it runs; the numbers mean little)
    python benchmarks/gpu_throughput.py --device cpu --dtype float32 --presets gemma2_2b --layers 2 \
        --batch 2 --prompt 256 --decode 4

Weights are random (normal, std 0.02; norm scales 1), so no checkpoint is needed: speed does not
depend on the values. Per preset and attention path ("blocks": AttentionMask, the default;
"flex": FlexAttention, compiled on CUDA), it times one batched prefill of --batch prompts of
--prompt tokens (the output head on the last position only, as when scoring or before decoding),
then --decode greedy steps of one token per row on the KV cache, as the runner decodes
(Gemma.decode_step; on CUDA replayed as a CUDA graph, captured at the first step of each batch,
timed apart as first_decode_step_s). The first prefill and two steps are a warm-up (FlexAttention
compiles there) and are not timed.

MFU counts the model's useful FLOPs: 2 per weight per token for the layers' matmuls, the output
head where it runs, and attention over the keys each query may see (causal; sliding layers: the
window), 4 * heads * head_dim FLOPs per query-key pair. The peak is the best of several square
matmuls of the same dtype on the same device (--peak-size), not the vendor's datasheet figure.
Prints one JSON line per configuration; --out also saves them as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evalsuite.backends import DecodeGraph
from evalsuite.model.config import SLIDING


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` (n, n) @ (n, n) products."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def random_model(cfg, device: torch.device, dtype: torch.dtype):
    from evalsuite.model.gemma import Gemma
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: a 9B model never exists in fp32
    try:
        with torch.device(device):
            model = Gemma(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def layer_matmul_params(cfg) -> int:
    hd, nh, nkv, h, f = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (h * hd * (2 * nh + 2 * nkv) + 3 * h * f)


def attention_pairs(cfg, first: int, last: int) -> int:
    """Query-key pairs summed over layers for queries at positions first..last-1 of one sequence."""
    total = 0
    for kind in cfg.layer_types:
        window = cfg.sliding_window if kind == SLIDING else None
        total += sum(p + 1 if window is None else min(p + 1, window) for p in range(first, last))
    return total


def run_one(cfg, name: str, attention: str, args, device, dtype, peak: float) -> dict:
    model = random_model(cfg, device, dtype)
    model.attention = attention
    b, t, steps = args.batch, args.prompt, args.decode
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (b, t), generator=g).to(device)
    last = torch.zeros(b, t, dtype=torch.bool, device=device)
    last[:, -1] = True
    w, head = layer_matmul_params(cfg), cfg.hidden_size * cfg.vocab_size
    per_pair = 4 * cfg.num_heads * cfg.head_dim

    def prefill():
        cache = model.new_cache()
        logits = model(prompts, cache=cache, logits_at=last)
        cache.reserve(steps + 1)
        return cache, logits.argmax(-1)

    def decode(cache, nxt, first: int, n: int):
        """n greedy steps as the runner decodes: Gemma.decode_step, replayed as a CUDA graph on CUDA
        (unless --no-graphs): the first step of a cache runs eagerly and captures the graph."""
        graph = None
        for j in range(first, first + n):
            pos = torch.full((b,), t + j, device=device)
            if graph is not None:
                h = graph.replay(nxt, pos)
            elif device.type == "cuda" and args.graphs:
                h, graph = DecodeGraph.capture(model, cache, nxt, pos)
            else:
                h = model.decode_step(nxt, pos, cache)
            nxt = model.head(h).argmax(-1)
        return nxt

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        cache, nxt = prefill()  # warm-up (and compilation)
        decode(cache, nxt, 0, 2)
        del cache
        sync(device)
        t0 = time.perf_counter()
        cache, nxt = prefill()
        sync(device)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nxt = decode(cache, nxt, 0, 1)  # the capture, on CUDA
        sync(device)
        first_step_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decode(cache, nxt, 1, steps)
        sync(device)
        decode_s = time.perf_counter() - t0
    prefill_flops = b * (2 * w * t + 2 * head + per_pair * attention_pairs(cfg, 0, t))
    decode_flops = b * (steps * (2 * w + 2 * head) + per_pair * attention_pairs(cfg, t + 1, t + 1 + steps))
    row = {"preset": name, "layers": cfg.num_layers, "attention": attention, "device": str(device),
           "dtype": str(dtype).replace("torch.", ""), "batch": b, "prompt_tokens": t, "decode_steps": steps,
           "prefill_s": round(prefill_s, 4), "prefill_tokens_per_s": round(b * t / prefill_s, 1),
           "prefill_mfu": round(prefill_flops / prefill_s / peak, 4),
           "first_decode_step_s": round(first_step_s, 4), "cuda_graphs": device.type == "cuda" and args.graphs,
           "decode_s": round(decode_s, 4), "decode_tokens_per_s": round(b * steps / decode_s, 1),
           "decode_mfu": round(decode_flops / decode_s / peak, 4), "matmul_peak_tflops": round(peak / 1e12, 2)}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return row


def main() -> None:
    from evalsuite.model import DTYPES
    from evalsuite.model.config import preset

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["gemma2_2b", "gemma2_9b"])
    ap.add_argument("--attention", nargs="+", default=["blocks", "flex"], choices=["blocks", "flex"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="decode eagerly on CUDA too (default: replay each step as a CUDA graph, as the runner does)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (a quick check)")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 8192 GPU, 2048 CPU)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu for a quick check)")
    peak = matmul_peak(device, dtype, args.peak_size or (8192 if device.type == "cuda" else 2048))
    rows = []
    for name in args.presets:
        cfg = preset(name)
        if args.layers:
            cfg = cfg.replace(num_layers=args.layers, layer_types=cfg.layer_types[:args.layers])
        for attention in args.attention:
            rows.append(run_one(cfg, name, attention, args, device, dtype, peak))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last model is gone with run_one's frame
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
