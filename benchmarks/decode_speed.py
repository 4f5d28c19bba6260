"""Greedy decoding speed on real task prompts: our runner at several batch sizes against transformers'
generate, one prompt at a time and as one left-padded batch of all prompts; same prompts and weights.

    python benchmarks/decode_speed.py --task gsm8k --n 16 --batch-sizes 1 4 16 [--scheduler continuous static]
        [--max-tokens 128] [--hf]

Prints one JSON line per configuration: generated tokens, seconds, tokens/s, and whether the token
sequences equal the first configuration's. transformers is asked for as many tokens per prompt as
ours produced (ours stops on stop strings, generate does not), so both do the same useful work; its
batched run decodes every row to the longest, and counts only the useful tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def task_requests(task: str, n: int, max_tokens: int | None = None) -> list:
    from dataclasses import replace

    from evalsuite import tasks
    items, _ = tasks.build_items(tasks.load_spec(task), limit=n)
    reqs = [it.requests[0] for it in items]
    return [replace(r, max_tokens=max_tokens) for r in reqs] if max_tokens else reqs


def gsm8k_requests(n: int) -> list:
    return task_requests("gsm8k", n)


def ours_greedy(lm, reqs, batch_size: int, scheduler: str = "continuous") -> tuple[dict, list]:
    """Our runner's greedy decoding of the prompts: (the JSON row, every prompt's tokens)."""
    from evalsuite.runner import Runner
    runner = Runner(lm, generate_batch_size=batch_size, progress=False, scheduler=scheduler)
    t0 = time.perf_counter()
    out = runner.generate_until(reqs)
    dt = time.perf_counter() - t0
    return ({"engine": "ours", "scheduler": scheduler, "batch_size": batch_size, "prompts": len(reqs),
             "generated": runner.tokens_generated, "prompt_tokens": runner.tokens_forwarded, "seconds": round(dt, 2),
             "generated_per_s": round(runner.tokens_generated / dt, 2)}, [r.tokens for r in out])


def hf_model(model: str):
    import transformers

    from evalsuite.model import PRESET_SOURCES
    from evalsuite.model.weights import resolve_source
    path = resolve_source(PRESET_SOURCES.get(model, model))
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent if kw else path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def _prompts(lm, reqs) -> list[list[int]]:
    from evalsuite.runner import Runner
    runner = Runner(lm, progress=False)
    return [list(sum(runner.encode_context(r.context, r.shared_prefix), ())) for r in reqs]


def hf_one_by_one(hf, lm, reqs, ref_tokens) -> dict:
    """transformers' generate, one prompt at a time, as many tokens per prompt as ours produced."""
    n_gen, same = 0, 0
    t0 = time.perf_counter()
    for ids, ref in zip(_prompts(lm, reqs), ref_tokens):
        with torch.no_grad():
            got = hf.generate(torch.tensor([ids]), max_new_tokens=len(ref), do_sample=False)[0, len(ids):].tolist()
        n_gen += len(got)
        same += got == ref
    dt = time.perf_counter() - t0
    return {"engine": "transformers.generate", "batch_size": 1, "prompts": len(reqs), "generated": n_gen,
            "seconds": round(dt, 2), "generated_per_s": round(n_gen / dt, 2), "same_as_ours": same}


def hf_batched(hf, lm, reqs, ref_tokens) -> dict:
    """transformers' generate on one left-padded batch of all prompts, decoded to the longest; only
    the useful tokens (as many as ours produced per prompt) are counted."""
    prompts = _prompts(lm, reqs)
    width, pad = max(map(len, prompts)), lm.tokenizer.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        got = hf.generate(ids, attention_mask=mask, max_new_tokens=max(map(len, ref_tokens)), do_sample=False,
                          pad_token_id=pad)[:, width:].tolist()
    dt = time.perf_counter() - t0
    n_gen = sum(map(len, ref_tokens))
    return {"engine": "transformers.generate", "batch_size": len(reqs), "prompts": len(reqs), "generated": n_gen,
            "seconds": round(dt, 2), "generated_per_s": round(n_gen / dt, 2),
            "same_as_ours": sum(g[:len(ref)] == ref for g, ref in zip(got, ref_tokens))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--scheduler", nargs="+", default=["continuous"], choices=["continuous", "static"])
    ap.add_argument("--max-tokens", type=int, default=None, help="override the task's max_tokens")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from evalsuite.model import load_model
    lm = load_model(args.model)
    reqs = task_requests(args.task, args.n, args.max_tokens)
    first = None
    for scheduler in args.scheduler:
        for bs in args.batch_sizes:
            row, toks = ours_greedy(lm, reqs, bs, scheduler)
            first = first or toks
            print(json.dumps({**row, "same_as_first": toks == first}), flush=True)
    if args.hf:
        hf = hf_model(args.model)
        print(json.dumps(hf_one_by_one(hf, lm, reqs, first)), flush=True)
        print(json.dumps(hf_batched(hf, lm, reqs, first)), flush=True)


if __name__ == "__main__":
    main()
