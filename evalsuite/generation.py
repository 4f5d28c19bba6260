"""Decoding one batch of prompts with a KV cache: greedy or sampled, stopping on stop tokens, stop
strings or max_tokens; finished rows leave the batch (their cache rows are dropped)."""

from __future__ import annotations

import torch

from .requests import Generation, GenerationResult


def decode_batch(be, prompts, reqs, cache, offsets: list[int], check_finite) -> tuple[list[GenerationResult], int, int]:
    """Decodes one batch: (results, tokens forwarded, tokens generated).

    cache: the rows' prefixes (offsets[r] tokens each) or None; prompts continue after them, left-
    padded (positions count real tokens only). check_finite(logits) raises on NaN or inf."""
    dev = be.device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), be.tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    pos = torch.zeros(b, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], valid[r, width - len(p):] = torch.tensor(p), True
        pos[r, width - len(p):] = torch.arange(offsets[r], offsets[r] + len(p))
    next_pos = torch.tensor([o + len(p) for o, p in zip(offsets, prompts)])
    gens = [torch.Generator().manual_seed(q.seed) for q in reqs]
    cache = cache if cache is not None else be.new_cache()
    last = torch.zeros(b, width, dtype=torch.bool)
    last[:, -1] = True  # prompts are left-padded: every row ends in the last column
    h = be.hidden(ids.to(dev), pos.to(dev), valid.to(dev), cache=cache, needed=last.to(dev))[:, -1]
    forwarded, generated = int(valid.sum()), 0
    # The prompt's logits give the first token; every later one takes a decoding step.
    cache = be.start_decoding(cache, max(q.max_tokens for q in reqs) - 1)
    active = list(range(b))  # original row of each live batch row
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    done: list[GenerationResult | None] = [None] * b
    while active:
        logits = be.head(h).float().cpu()
        check_finite(logits)
        nxt = []
        for j, r in enumerate(active):
            tok = pick(logits[j], reqs[r], gens[r])
            out_tokens[r].append(tok)
            nxt.append(tok)
            res = finished(be, out_tokens[r], reqs[r])
            if res is not None:
                done[r] = res
        generated += len(active)
        keep = [j for j, r in enumerate(active) if done[r] is None]
        if not keep:
            break
        if len(keep) < len(active):
            rows_t = torch.tensor(keep, device=dev)
            cache = be.select_cache(cache, rows_t)
            nxt = [nxt[j] for j in keep]
            active = [active[j] for j in keep]
        step_pos = next_pos[active]
        next_pos[active] += 1
        h = be.decode(cache, torch.tensor(nxt, device=dev), step_pos.to(dev))
    return done, forwarded, generated  # type: ignore[return-value]


def finished(be, toks: list[int], req: Generation) -> GenerationResult | None:
    """The result once the last token ends the generation (a stop token, a stop string, max_tokens)."""
    if toks[-1] in be.stop_ids:
        return GenerationResult(be.tokenizer.decode(toks[:-1]), toks[:-1], "eos")
    if req.stop:
        text = be.tokenizer.decode(toks)
        # Decoded in full: a stop string may span several tokens, and pieces can merge on decode.
        hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if hits:
            return GenerationResult(text[:min(hits)], toks, "stop")
    if len(toks) >= req.max_tokens:
        return GenerationResult(be.tokenizer.decode(toks), toks, "length")
    return None


def pick(logits: torch.Tensor, req: Generation, gen: torch.Generator) -> int:
    """The next token: greedy at temperature 0, else sampled (top-k, then top-p) with the request's generator."""
    if req.temperature <= 0:
        return int(logits.argmax())
    logits = logits / req.temperature
    if req.top_k > 0:
        kth = torch.topk(logits, min(req.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1.0:
        srt, order = torch.sort(logits, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > req.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
