"""Greedy decoding speed on real task prompts: our runner at several batch sizes against transformers'
generate, one prompt at a time and as one left-padded batch of all prompts; same prompts and weights.

    python benchmarks/decode_speed.py --task gsm8k --n 16 --batch-sizes 1 4 16 [--max-tokens 128] [--hf]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=None, help="override the task's max_tokens")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate, one prompt at a time")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dataclasses import replace

    from evalsuite import tasks
    from evalsuite.model import load_model
    from evalsuite.runner import Runner

    lm = load_model(args.model)
    items, _ = tasks.build_items(tasks.load_spec(args.task), limit=args.n)
    reqs = [it.requests[0] for it in items]
    if args.max_tokens:
        reqs = [replace(r, max_tokens=args.max_tokens) for r in reqs]
    first = None
    for bs in args.batch_sizes:
        runner = Runner(lm, generate_batch_size=bs, progress=False)
        t0 = time.perf_counter()
        out = runner.generate_until(reqs)
        dt = time.perf_counter() - t0
        toks = [r.tokens for r in out]
        first = first or toks
        print(json.dumps({"engine": "ours", "batch_size": bs, "prompts": len(reqs), "generated": runner.tokens_generated,
                          "prompt_tokens": runner.tokens_forwarded, "seconds": round(dt, 2),
                          "generated_per_s": round(runner.tokens_generated / dt, 2), "same_as_first": toks == first}),
              flush=True)
    if args.hf:
        import transformers
        from evalsuite.model.weights import resolve_source
        from evalsuite.model import PRESET_SOURCES
        path = resolve_source(PRESET_SOURCES.get(args.model, args.model))
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent if kw else path, dtype=torch.float32, attn_implementation="eager", **kw).eval()
        runner = Runner(lm, progress=False)
        n_gen, same = 0, []
        t0 = time.perf_counter()
        for req, ref in zip(reqs, first):
            pre, body = runner.encode_context(req.context, req.shared_prefix)
            ids = torch.tensor([list(pre + body)])
            with torch.no_grad():  # as many tokens as ours produced, so the work is the same
                got = hf.generate(ids, max_new_tokens=len(ref), do_sample=False)[0, ids.shape[1]:].tolist()
            n_gen += len(got)
            same.append(got == ref)
        dt = time.perf_counter() - t0
        print(json.dumps({"engine": "transformers.generate", "batch_size": 1, "prompts": len(reqs), "generated": n_gen,
                          "seconds": round(dt, 2), "generated_per_s": round(n_gen / dt, 2),
                          "same_as_ours": sum(same)}), flush=True)
        prompts = [list(sum(runner.encode_context(r.context, r.shared_prefix), ())) for r in reqs]
        width = max(map(len, prompts))
        pad = lm.tokenizer.pad_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t0 = time.perf_counter()
        with torch.no_grad():
            got = hf.generate(ids, attention_mask=mask, max_new_tokens=max(map(len, first)), do_sample=False,
                              pad_token_id=pad)[:, width:].tolist()
        dt = time.perf_counter() - t0
        n_gen = sum(map(len, first))
        print(json.dumps({"engine": "transformers.generate", "batch_size": len(reqs), "prompts": len(reqs),
                          "generated": n_gen, "seconds": round(dt, 2), "generated_per_s": round(n_gen / dt, 2),
                          "same_as_ours": sum(g[:len(ref)] == ref for g, ref in zip(got, first))}), flush=True)


if __name__ == "__main__":
    main()
