"""Decoding with a KV cache: greedy or sampled, stopping on stop tokens, stop strings or max_tokens.

Two schedulers, with the same results token for token:
  * `decode_batch` (static): one batch of prompts decoded together; finished rows leave it (their
    cache rows are dropped), so its last steps run with a few rows. Used where the continuous one
    cannot run: the transformers backend, and CUDA graphs (fixed shapes per batch).
  * `ContinuousDecoder` (continuous batching): a fixed number of slots; a finished row frees its
    slot and the next waiting prompt is prefilled into it, so the batch stays full while prompts
    wait. The cache keeps every row's keys right-aligned (`KVCache.place`): all rows append at the
    same slot, however long their prompts.
A row's result depends on its own tokens only (its own generator when sampling), never on the
other rows of its batch or on when it entered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .model.kvcache import KVCache
from .requests import Generation, GenerationResult


class StopCheck:
    """Whether a row's tokens end its generation, checking stop strings on the new text only.

    A stop string that first appears after token n ends inside the text token n added, so it lies
    within the last `len(stop) + len(that text)` characters. The tail decoded (`window` tokens)
    covers that with room to spare: at least 4 * longest stop + 16 tokens, as one character can
    take 4 byte-fallback tokens and a tail that starts inside a character decodes its first bytes
    as replacement characters. Where the tail holds a stop string, the whole text is decoded and
    searched, exactly as a full decode at every step would; at the end, one full decode checks
    that no stop string was missed (`final`).
    """

    def __init__(self, be, req: Generation):
        self.be, self.req = be, req
        self.tokens: list[int] = []
        self.window = 4 * max((len(s) for s in req.stop), default=0) + 16

    def add(self, tok: int) -> GenerationResult | None:
        """The result once `tok` ends the generation (a stop token, a stop string, max_tokens), else None."""
        toks, decode = self.tokens, self.be.tokenizer.decode
        toks.append(tok)
        if tok in self.be.stop_ids:
            return GenerationResult(decode(toks[:-1]), toks[:-1], "eos")
        if self.req.stop:
            tail = decode(toks[-self.window:])
            if any(s in tail for s in self.req.stop):
                text = decode(toks)
                hits = [i for i in (text.find(s) for s in self.req.stop) if i >= 0]
                if hits:
                    return GenerationResult(text[:min(hits)], toks, "stop")
        if len(toks) >= self.req.max_tokens:
            return self.final()
        return None

    def final(self) -> GenerationResult:
        """The result at max_tokens. A stop string in the full text that the tails missed (none is
        known to exist) is found at the first token whose full decode holds it, as a full decode
        at every step would have stopped there."""
        toks, decode = self.tokens, self.be.tokenizer.decode
        text = decode(toks)
        if self.req.stop and any(s in text for s in self.req.stop):
            for n in range(1, len(toks) + 1):
                part = decode(toks[:n])
                hits = [i for i in (part.find(s) for s in self.req.stop) if i >= 0]
                if hits:
                    return GenerationResult(part[:min(hits)], toks[:n], "stop")
        return GenerationResult(text, list(toks), "length")


def pick(be, h: torch.Tensor, reqs: list[Generation], gens: list[torch.Generator], check_finite) -> list[int]:
    """The next token of every row of hidden states h (b, hidden). The head runs in vocabulary
    chunks (backend.head_chunks) with a running argmax: greedy rows never need a whole row of
    logits (Gemma 3: 262144 floats), and the finite check is one sum per chunk. The argmax is the
    first maximum, as over the whole row. Sampled rows gather their full row and draw with their
    own generator (what a row draws never depends on the other rows)."""
    sampled = [j for j, q in enumerate(reqs) if q.temperature > 0]
    best = best_at = total = None
    kept = []
    for start, logits in be.head_chunks(h):
        logits = logits.float()
        part = logits.sum()
        total = part if total is None else total + part
        value, at = logits.max(-1)
        at += start
        if best is None:
            best, best_at = value, at
        else:
            better = value > best  # a tie keeps the earlier token, as argmax does
            best, best_at = torch.where(better, value, best), torch.where(better, at, best_at)
        if sampled:
            kept.append(logits[sampled].cpu())  # the generators are CPU ones
    check_finite(total)  # NaN or inf anywhere makes the sum so; finite logits cannot overflow it
    out = best_at.tolist()
    if sampled:
        full = torch.cat(kept, dim=1)
        for row, j in zip(full, sampled):
            out[j] = sample(row, reqs[j], gens[j])
    return out


def sample(logits: torch.Tensor, req: Generation, gen: torch.Generator) -> int:
    """One token sampled at the request's temperature, top-k, then top-p, with its generator."""
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


def prompt_batch(be, prompts, offsets):
    """Left-padded ids, positions (counting real tokens from each row's offset) and validity."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), be.tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    pos = torch.zeros(b, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], valid[r, width - len(p):] = torch.tensor(p), True
        pos[r, width - len(p):] = torch.arange(offsets[r], offsets[r] + len(p))
    return ids, pos, valid


def prefill(be, prompts, offsets, cache):
    """Runs left-padded prompts after their prefixes in `cache`: the last position's hidden states (b, hidden)."""
    dev = be.device
    ids, pos, valid = prompt_batch(be, prompts, offsets)
    last = torch.zeros_like(valid)
    last[:, -1] = True  # prompts are left-padded: every row ends in the last column
    return be.hidden(ids.to(dev), pos.to(dev), valid.to(dev), cache=cache, needed=last.to(dev))[:, -1]


def decode_batch(be, prompts, reqs, cache, offsets: list[int], check_finite) -> tuple[list[GenerationResult], int, int]:
    """Decodes one batch: (results, tokens forwarded, tokens generated).

    cache: the rows' prefixes (offsets[r] tokens each) or None; prompts continue after them, left-
    padded (positions count real tokens only). check_finite(logits) raises on NaN or inf."""
    dev = be.device
    next_pos = torch.tensor([o + len(p) for o, p in zip(offsets, prompts)])
    gens = [torch.Generator().manual_seed(q.seed) for q in reqs]
    checks = [StopCheck(be, q) for q in reqs]
    cache = cache if cache is not None else be.new_cache()
    h = prefill(be, prompts, offsets, cache)
    forwarded, generated = sum(map(len, prompts)), 0
    # The prompt's logits give the first token; every later one takes a decoding step.
    cache = be.start_decoding(cache, max(q.max_tokens for q in reqs) - 1)
    active = list(range(len(prompts)))  # original row of each live batch row
    done: list[GenerationResult | None] = [None] * len(prompts)
    while active:
        nxt = pick(be, h, [reqs[r] for r in active], [gens[r] for r in active], check_finite)
        for r, tok in zip(active, nxt):
            done[r] = checks[r].add(tok)
        generated += len(active)
        keep = [j for j, r in enumerate(active) if done[r] is None]
        if not keep:
            break
        if len(keep) < len(active):
            cache = be.select_cache(cache, torch.tensor(keep, device=dev))
            nxt = [nxt[j] for j in keep]
            active = [active[j] for j in keep]
        step_pos = next_pos[active]
        next_pos[active] += 1
        h = be.decode(cache, torch.tensor(nxt, device=dev), step_pos.to(dev))
    return done, forwarded, generated  # type: ignore[return-value]


@dataclass
class Row:
    """A prompt waiting for, or decoding in, a slot of a continuous batch."""
    tokens: tuple[int, ...]  # the prompt after its prefix
    prefix: tuple[int, ...]  # a few-shot prefix whose KV the row starts from (() for none)
    req: Generation
    tag: object  # what the caller finds the result by
    check: StopCheck | None = None
    gen: torch.Generator | None = None
    last: int = 0  # the token the next step feeds


class ContinuousDecoder:
    """Continuous batching over one queue of rows, all starting from one shared prefix or none.

    `slots` rows decode together. A row that finishes stays in the batch, fed a pad token, its
    output never read, until a waiting row is prefilled into its slot; once nothing waits, the
    batch is shrunk to its live rows whenever an eighth of it has finished (a shrink copies the
    cache: not at every finish; a finished row costs a row's share of every step it stays).
    Waiting rows are prefilled in batches of one prefix each, rows x widest prompt under the token
    budget.

    shared: a one-row cache of the prefix every row shares (its keys held once, KVCache.expand),
    or None: a row's own prefix (a one-row cache from prefix_cache(tokens, rows)) is then copied in
    front of its own keys (KVCache.place), so rows of many few-shot blocks share a batch.
    """

    def __init__(self, be, slots: int, token_budget: int, check_finite, shared=None, prefix_cache=None):
        self.be, self.slots, self.token_budget, self.check_finite = be, slots, token_budget, check_finite
        self.shared, self.prefix_cache = shared, prefix_cache
        self.forwarded = self.generated = self.oom_splits = 0

    def run(self, rows: list[Row], on_done) -> None:
        """Decodes every row; on_done([(tag, result)]) after every step that ends any."""
        be, dev = self.be, self.be.device
        queue = deque(rows)
        live: list[Row | None] = []  # per batch row: its Row, or None once finished
        next_pos: list[int] = []  # per batch row: the position its next token takes
        cache = None
        while True:
            free = [i for i, r in enumerate(live) if r is None] + list(range(len(live), self.slots))
            if queue and free:
                cache, done = self._admit(queue, free, cache, live, next_pos)
                if done:
                    on_done(done)
            n_live = sum(r is not None for r in live)
            if not n_live:
                if not queue:
                    return
                continue
            if not queue and len(live) - n_live >= max(1, len(live) // 8):
                keep = [i for i, r in enumerate(live) if r is not None]
                cache = cache.select(torch.tensor(keep, device=dev))
                cache.compact()
                live[:], next_pos[:] = [live[i] for i in keep], [next_pos[i] for i in keep]
            ids = torch.tensor([r.last if r is not None else be.tokenizer.pad_id for r in live], device=dev)
            try:
                h = be.decode(cache, ids, torch.tensor(next_pos, device=dev))
            except torch.OutOfMemoryError:
                if len(live) == 1:
                    raise
                cache = self._halve(cache, live, next_pos, queue)
                continue
            next_pos[:] = [p + 1 for p in next_pos]
            at = [i for i, r in enumerate(live) if r is not None]
            done = self._take(live, at, h[torch.tensor(at, device=dev)])
            if done:
                on_done(done)

    def _halve(self, cache, live: list, next_pos: list, queue: deque):
        """After running out of (CUDA) memory: half the slots; the live rows of the other half go back
        to the front of the queue and start again (the same tokens: each row's generator is seeded
        when it is prefilled)."""
        self.oom_splits += 1
        h = len(live) // 2
        queue.extendleft(reversed([r for r in live[h:] if r is not None]))
        del live[h:], next_pos[h:]
        self.slots = h
        if self.be.device.type == "cuda":
            torch.cuda.empty_cache()
        return cache.select(torch.arange(h, device=self.be.device))

    def _take(self, live: list, at: list[int], h: torch.Tensor) -> list:
        """Each row live[i] (i in at) takes its next token from its hidden state h[j]; -> (tag,
        result) of the rows that ends, which leave `live` (set to None)."""
        rows = [live[i] for i in at]
        done = []
        for i, row, tok in zip(at, rows, pick(self.be, h, [r.req for r in rows], [r.gen for r in rows],
                                              self.check_finite)):
            res = row.check.add(tok)
            row.last = tok
            if res is not None:
                done.append((row.tag, res))
                live[i] = None
        self.generated += len(at)
        return done

    def _admit(self, queue: deque, free: list[int], cache, live: list, next_pos: list):
        """Prefills waiting rows into free batch rows (live and next_pos are updated); -> (cache,
        (tag, result) of the rows that ended at their first token)."""
        be = self.be
        taken = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        done, slots = [], iter(free)
        parts = deque((part, None) for part in self._chunks(taken))  # (rows, their prefix's cache once asked for)
        while parts:
            part, carried = parts.popleft()
            pre = part[0].prefix
            if self.shared is None and pre and carried is None:
                carried = self.prefix_cache(pre, len(part))
            base = self.shared if self.shared is not None else carried
            start = base.expand(len(part)) if base is not None else be.new_cache()
            for r in part:
                r.check, r.gen = StopCheck(be, r.req), torch.Generator().manual_seed(r.req.seed)
            try:
                h = prefill(be, [r.tokens for r in part], [len(pre)] * len(part), start)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                self.oom_splits += 1
                if be.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(part) // 2  # both halves keep the prefix's cache: it was asked for once for all
                parts.extendleft([(part[half:], carried), (part[:half], carried)])
                continue
            self.forwarded += sum(len(r.tokens) for r in part)
            rows = list(part)
            done += self._take(rows, list(range(len(rows))), h)  # the prompt's logits give the first token
            keep = [j for j, r in enumerate(rows) if r is not None]
            if not keep:
                continue
            if len(keep) < len(rows):
                start = start.select(torch.tensor(keep, device=be.device))
            where = [next(slots) for _ in keep]
            if cache is None:
                cache = KVCache.slots(len(start.k), self.shared, start.positions.device)
            if max(where) >= len(live):
                cache.grow(max(where) + 1)
                live += [None] * (max(where) + 1 - len(live))
                next_pos += [0] * (max(where) + 1 - len(next_pos))
            cache.place(where, start)
            for i, j in zip(where, keep):
                live[i], next_pos[i] = rows[j], len(pre) + len(rows[j].tokens)
        if cache is not None:
            cache.compact()
        return cache, done

    def _chunks(self, rows: list[Row]) -> list[list[Row]]:
        """Rows cut into prefill batches of one prefix each, rows x widest prompt under the token budget."""
        out: list[list[Row]] = []
        for r in sorted(rows, key=lambda r: (len(r.prefix), r.prefix, -len(r.tokens))):
            part = out[-1] if out else None
            if part and part[0].prefix == r.prefix and (len(part) + 1) * len(part[0].tokens) <= self.token_budget:
                part.append(r)
            else:
                out.append([r])
        return out
