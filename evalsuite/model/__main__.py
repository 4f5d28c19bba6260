"""Try a model: `python -m evalsuite.model gemma3_270m --prompt "The capital of France is"`.

Prints the greedy continuation and the log-probability of each prompt token given the ones before it.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import PRESETS, load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalsuite.model", description=__doc__.splitlines()[0])
    ap.add_argument("model", help=f"preset ({', '.join(sorted(PRESETS))}), checkpoint folder, .gguf file or hub id")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"loaded {args.model} ({lm.config.family}, {lm.config.num_layers} layers, tokenizer {lm.tokenizer.kind}) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    ids = lm.tokenizer.encode(args.prompt, bos=True)
    logprobs = lm.token_logprobs([ids])[0]
    print(f"{'pos':>4} {'id':>7} {'logprob':>9}  token")
    print(f"{0:>4} {ids[0]:>7} {'':>9}  {lm.tokenizer.piece(ids[0])!r}")
    for j, (tid, lp) in enumerate(zip(ids[1:], logprobs.tolist()), start=1):
        print(f"{j:>4} {tid:>7} {lp:>9.4f}  {lm.tokenizer.piece(tid)!r}")
    print(f"total logprob {float(logprobs.sum()):.4f}")
    new = lm.greedy(ids, args.max_new_tokens, stop_ids=(lm.config.eos_token_id,))
    print(f"greedy: {args.prompt}\033[1m{lm.tokenizer.decode(new)}\033[0m" if sys.stdout.isatty()
          else f"greedy: {args.prompt}|{lm.tokenizer.decode(new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
