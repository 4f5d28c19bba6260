"""The one place where requests are executed: loglikelihood, loglikelihood_rolling, generate_until.

Tokenization split (stable, stated): trailing spaces of a context move to the front of its
continuation; then each part is encoded alone: the shared few-shot prefix (with BOS), the rest of
the context (with BOS when there is no prefix), and the continuation. Gemma's tokenizer has no
dummy prefix, so " Paris" encodes the same whatever precedes it, every choice of a question
shares exactly the same context tokens, and a few-shot prefix has the same tokens in every
question that uses it. A text is never re-split at a different place between runs or batch sizes.

Execution of log-likelihoods (backends with packing, i.e. ours):
  * choices of one question form one packed row, [context][choice 1]...[choice k], each choice at
    the context's next positions, attending to the context and to itself only (segment mask), so
    the context is computed once for all its choices;
  * a prefix used by several rows (a few-shot block) is run once, batch 1, and every batch of rows
    that starts with it shares its KV cache, held once (KVCache.expand);
  * rows are sorted by length, longest first, and batched under batch_size (generate_batch_size
    when generating) and a token budget (rows x row width; the prefix counts in the width only
    where rows of several prefixes share a batch, which copies each row's prefix into a stacked
    cache);
  * the vocabulary-sized head runs only at positions that predict a continuation token, in chunks.
Backends without packing (transformers) get one plain causal row per request.
Results always come back in input order.

Under torchrun (world.size > 1) every rank encodes all requests, takes its share of the rows (cut in
contiguous runs of equal cost, see distributed.shard: tokens through the network, a scored or
generated token also weighing the vocabulary head's share), looks its share up in the result cache,
computes the rest and all ranks gather every result. The shares depend on the requests only, never on
what the cache holds, so the ranks always agree on who computes what.
"""

from __future__ import annotations

import ctypes
import time
from collections import Counter

import torch
from tqdm import tqdm

from .backends import as_backend
from .distributed import World, shard
from .requests import (Chat, Generation, GenerationResult, Loglikelihood, LoglikelihoodResult,  # noqa: F401
                       TooLong, split_pair)


class NumericsError(RuntimeError):
    pass


def keep_freed_memory() -> bool:
    """Lets glibc's malloc reuse freed memory for large blocks instead of returning it to the kernel;
    False where the C library is not glibc (nothing is changed there).

    By default each block above the mmap threshold (128 kB, raised as blocks are freed, up to 32 MB)
    is mapped fresh from the kernel and unmapped when freed, so a forward's every large intermediate
    (a norm's output, a GELU's) is page-faulted and zeroed anew: on 2 cores an RMSNorm over 8192 x
    640 took 11.9 ms that way and 2.8 ms from reused memory, a GELU over 8192 x 2048 27.8 ms and
    14.5 ms, and scoring 30 MMLU items 18.6 s and 15.0 s. The cost: the process holds on to its peak
    heap until it exits.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class Runner:
    def __init__(self, model, batch_size: int = 16, token_budget: int = 16384, head_chunk: int = 256,
                 progress: bool = True, share_prefix: bool = True, max_length: int = 8192, cache=None,
                 world: World = World(), generate_batch_size: int = 64):
        self.backend = as_backend(model)
        if self.backend.device.type == "cpu":
            keep_freed_memory()
        self.world = world
        self.cache = cache  # a ResultCache, or None
        self.from_cache = 0  # requests answered by the cache
        self.computed = 0  # requests computed here
        self.oom_splits = 0  # batches split in halves after running out of memory
        self.batch_size, self.token_budget, self.head_chunk = batch_size, token_budget, head_chunk
        # Decoding reads every weight once per step whatever the number of rows, so it gains from far
        # more rows than scoring, whose forwards are bound by arithmetic.
        self.generate_batch_size = generate_batch_size
        for name, value in (("batch_size", batch_size), ("generate_batch_size", generate_batch_size),
                            ("token_budget", token_budget)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        self.progress, self.share_prefix = progress, share_prefix
        self.max_length = min(max_length, self.backend.max_length)
        self.tokens_scored = 0  # continuation tokens scored
        self.tokens_forwarded = 0  # real (non-padding) tokens through the network
        self.tokens_generated = 0
        self.gather_seconds = 0.0  # torchrun: time spent waiting for the other ranks' results
        self._enc: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._logits_block: torch.Tensor | None = None  # see _head_logits

    def describe(self) -> dict:
        return self.backend.describe()

    def version_key(self) -> dict:
        return self.backend.version_key()

    # ---- tokenization -------------------------------------------------------------------------
    def _encode(self, text: str, bos: bool = False) -> tuple[int, ...]:
        key = (text, bos)
        if key not in self._enc:
            self._enc[key] = tuple(self.backend.tokenizer.encode(text, bos=bos)) if text else (
                (self.backend.tokenizer.bos_id,) if bos else ())
        return self._enc[key]

    def _turn(self, role: str, text: str, close: bool = True) -> tuple[int, ...]:
        if self.backend.turn_ids is None:
            raise ValueError("chat format requested but the model's vocabulary has no <start_of_turn>/<end_of_turn>")
        sot, eot = self.backend.turn_ids
        out = (sot, *self._encode(f"{role}\n{text}"))
        return out + (eot, *self._encode("\n")) if close else out

    def encode_context(self, context: str | Chat, shared_prefix: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix tokens, rest of the context) as the runner scores them; prefix is () when not shared."""
        if isinstance(context, Chat):
            pre = (self.backend.tokenizer.bos_id,)
            for user, model in context.examples:
                pre += self._turn("user", user) + self._turn("model", model)
            body = self._turn("user", context.user) + self._turn("model", "", close=False)
            return (pre, body) if context.examples else ((), pre + body)
        shared_prefix = min(shared_prefix, len(context))
        if shared_prefix:
            return self._encode(context[:shared_prefix], bos=True), self._encode(context[shared_prefix:])
        return (), self._encode(context, bos=True)

    # ---- log-likelihood -----------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[LoglikelihoodResult]:
        """requests: Loglikelihood objects or (context, continuation) pairs; results in input order."""
        encoded = []
        for idx, req in enumerate(requests):
            if not isinstance(req, Loglikelihood):
                req = Loglikelihood(*req)
            context, continuation = req.context, req.continuation
            if isinstance(context, Chat):
                continuation = continuation.lstrip(" ")  # the model turn starts right after "model\n"
            else:
                context, continuation = split_pair(context, continuation)
            pre, body = self.encode_context(context, req.shared_prefix)
            cont = self._encode(continuation)
            if not cont:
                raise ValueError(f"request {idx}: empty continuation {req.continuation!r}")
            if len(pre) + len(body) + len(cont) > self.max_length:
                raise TooLong(idx, f"needs {len(pre) + len(body) + len(cont)} tokens, more than the maximum "
                                   f"length {self.max_length}")
            encoded.append((pre, body, cont))
        keys = [self._cache_key("loglikelihood", pre + body, cont) for pre, body, cont in encoded]
        rows: dict[tuple, list] = {}
        for idx, (pre, body, cont) in enumerate(encoded):
            key = (pre, body) if self.backend.packing else (pre, body, idx)
            rows.setdefault(key, []).append((idx, cont))
        uses = Counter(k[0] for k in rows)
        mine = self._share(list(rows.items()), lambda row: self._cost(
            len(row[0][0]) / uses[row[0][0]], len(row[0][1]), sum(len(c) for _, c in row[1])))
        scored = self._cached({i: keys[i] for _, conts in mine for i, _ in conts})
        todo = [(k[0], k[1], [(i, c) for i, c in conts if i not in scored]) for k, conts in mine]
        scored.update(self._score([row for row in todo if row[2]], "loglikelihood",
                                  lambda out: self._store("loglikelihood", keys, out)))
        scored = self._gather(scored)
        return [LoglikelihoodResult(*scored[i]) for i in range(len(requests))]

    def loglikelihood_rolling(self, texts: list[str]) -> list[LoglikelihoodResult]:
        """log p(text) token by token after BOS, in windows of at most max_length tokens; each window
        after the first is conditioned on the max_length - (its length) tokens before it."""
        win = self.max_length
        windows = []
        for idx, text in enumerate(texts):
            seq = (self.backend.tokenizer.bos_id, *self._encode(text))
            for a in range(1, len(seq), win - 1):
                b = min(a + win - 1, len(seq))
                windows.append(((idx, a), seq[max(0, b - win):a], seq[a:b]))
        windows = self._share(windows, lambda w: self._cost(0, len(w[1]), len(w[2])))
        keys = {w: self._cache_key("rolling", ctx, target) for w, ctx, target in windows}
        scored = self._cached(keys)
        rows = [((), ctx, [(w, list(target))]) for w, ctx, target in windows if w not in scored]
        scored.update(self._score(rows, "loglikelihood_rolling", lambda out: self._store("rolling", keys, out)))
        scored = self._gather(scored)
        out = []
        for idx in range(len(texts)):
            parts = [v for (i, _), v in scored.items() if i == idx]
            out.append(LoglikelihoodResult(sum(p[0] for p in parts), all(p[1] for p in parts),
                                           sum(p[2] for p in parts)))
        return out

    def _check_finite(self, logits: torch.Tensor) -> None:
        if bool(torch.isfinite(logits).all()):
            return
        where = self.backend.nonfinite_origin()
        raise NumericsError(
            "NaN or inf in the model's logits" + (f"; the first non-finite values came out of {where}" if where
                                                  else "") +
            f" (dtype {self.backend.describe()['dtype']}). The weights may be "
            "corrupt, or the dtype may overflow: try dtype=float32. Stopped: no score is computed from NaN.")

    # ---- result cache -------------------------------------------------------------------------
    def _cache_key(self, kind: str, *request) -> str | None:
        return self.cache.key(kind, request) if self.cache is not None else None

    def _cached(self, keys: dict) -> dict:
        """{request: cached value} for the requests (keys: request -> cache key) the cache holds."""
        if self.cache is None:
            return {}
        found = self.cache.get_many(list(dict.fromkeys(keys.values())))
        hits = {r: tuple(found[k]) for r, k in keys.items() if k in found}
        self.from_cache += len(hits)
        return hits

    # ---- ranks (torchrun) ----------------------------------------------------------------------
    def _share(self, units: list, cost) -> list:
        """The units this rank computes: all of them in a single process."""
        if self.world.size == 1:
            return units
        ranks = shard([cost(u) for u in units], self.world.size)
        return [u for u, r in zip(units, ranks) if r == self.world.rank]

    def _cost(self, prefix_share: float, context: int, scored: int) -> float:
        """A unit's cost for sharding: its share of a few-shot prefix and its other tokens through the
        network, plus the vocabulary head at each scored (or generated) token."""
        return prefix_share + context + (1 + self.backend.head_cost) * scored

    def _gather(self, done: dict) -> dict:
        """Every rank's results merged (each request was computed by exactly one rank)."""
        if self.world.size == 1:
            return done
        t0 = time.perf_counter()
        merged: dict = {}
        for part in self.world.all_gather(done):
            merged.update(part)
        self.gather_seconds += time.perf_counter() - t0
        return merged

    def _desc(self, what: str) -> str:
        return what if self.world.size == 1 else f"{what} [rank {self.world.rank}/{self.world.size}]"

    def _store(self, kind: str, keys, out: dict) -> None:
        """Commit one batch's results (out: {request: value}; keys: request -> cache key)."""
        self.computed += len(out)
        if self.cache is not None:
            self.cache.put_many(kind, {keys[r]: list(v) for r, v in out.items()})

    @torch.inference_mode()
    def _score(self, rows, desc: str, store=None) -> dict:
        """rows: (prefix, context, [(key, continuation tokens)]) -> {key: (logprob, is_greedy, n)};
        store(batch results) is called after every batch."""
        groups = self._group([(pre, body, sum(len(c) - 1 for _, c in conts), conts) for pre, body, conts in rows])
        out: dict = {}
        bar = tqdm(total=sum(len(c) for _, _, c in rows), desc=self._desc(desc), unit="req", disable=not self.progress)
        for batch, done in self._execute(groups, self._run_batch, self.batch_size):
            if store is not None:
                store(done)
            out.update(done)
            bar.update(sum(len(c) for _, c in batch))
        bar.close()
        return out

    # ---- batching ------------------------------------------------------------------------------
    def _group(self, rows) -> dict:
        """rows: [(prefix, rest, tokens to follow, tag)] -> {prefix: [(span, (tokens to run, tag))]}.

        A prefix used by several rows (with a non-empty rest) is shared: its rows run only their rest,
        and their span (what counts against the token budget) leaves the prefix out, since its keys
        are held once for the whole batch. Other rows go to the plain group () with their prefix as
        ordinary tokens.
        """
        uses = Counter(pre for pre, rest, _, _ in rows if pre and rest)
        groups: dict[tuple[int, ...], list] = {(): []}
        for pre, rest, follow, tag in rows:
            if pre and rest and uses[pre] > 1 and self.backend.packing and self.share_prefix:
                groups.setdefault(pre, []).append((len(rest) + follow, (rest, tag)))
            else:
                groups[()].append((len(pre) + len(rest) + follow, (pre + rest, tag)))
        return groups

    def _room(self, rows: int, widest: int, most: int) -> bool:
        """Whether a batch of `rows` rows (at most `most`), the widest spanning `widest` tokens, may
        take one more row."""
        return rows < most and (rows + 1) * widest <= self.token_budget

    def _fill(self, rows, most: int) -> list[list]:
        """rows: [(prefix, (span, item))] in order -> batches of at most `most` rows under the token budget."""
        batches, batch, widest = [], [], 0
        for row in rows:
            if batch and not self._room(len(batch), max(widest, row[1][0]), most):
                batches.append(batch)
                batch, widest = [], 0
            batch.append(row)
            widest = max(widest, row[1][0])
        return batches + [batch] if batch else batches

    def _plan(self, groups: dict, most: int) -> list[list]:
        """groups: {prefix: [(span, item)]}, span = tokens the item needs (see _group).

        Each group is batched on its own, longest first, so that its batches share one prefix's KV.
        The last, partly filled batch of every prefix group then goes to a pool that is batched
        across prefixes (their caches are stacked): a task made of many small few-shot groups, such as
        BBH's 27 subtasks at a small limit, still runs in full batches. The pool is ordered by prefix
        length, since a stacked cache is as wide as its longest prefix (MMLU's 5-shot blocks run from
        200 to 2,400 tokens), and keeps each prefix's rows together, so a prefix is needed by a few
        consecutive batches only.
        """
        plan, pool = [], []
        for pre, members in groups.items():
            batches = self._fill([(pre, m) for m in sorted(members, key=lambda m: -m[0])], most)
            if pre and batches and self._room(len(batches[-1]), max(m[0] for _, m in batches[-1]), most):
                pool.append(batches.pop())
            plan += batches
        pool.sort(key=lambda rows: len(rows[0][0]))  # stable: equal lengths keep group order
        # Rows of several prefixes get them copied into a stacked cache: there the prefix counts.
        return plan + self._fill([(pre, (len(pre) + span, item)) for rows in pool for pre, (span, item) in rows], most)

    def _execute(self, groups: dict, run, most: int):
        """Runs every planned batch (at most `most` rows), yielding (items, run(items, cache, offsets)) per batch.

        cache holds the rows' prefixes (None for the plain group), offsets their lengths. Each prefix
        is run once, batch 1, before its first batch and dropped after its last one. A batch that
        runs out of (CUDA) memory is split in halves and each half retried (counted in oom_splits).
        """
        plan = self._plan(groups, most)
        last = {pre: i for i, batch in enumerate(plan) for pre, _ in batch}
        caches: dict[tuple[int, ...], object] = {}
        for i, batch in enumerate(plan):
            prefixes = [pre for pre, _ in batch]
            if prefixes[0]:  # rows of the plain group carry their prefix in their tokens
                for pre in prefixes:
                    if pre not in caches:
                        caches[pre] = self._prefix_cache(pre)
            yield from self._run_halving(run, prefixes, [item for _, (_, item) in batch], caches)
            for pre in set(prefixes):
                if last[pre] == i:
                    caches.pop(pre, None)

    def _run_halving(self, run, prefixes, items, caches):
        try:
            cache = self.backend.batch_cache([caches[p] for p in prefixes]) if prefixes[0] else None
            out = run(items, cache, [len(p) for p in prefixes])
        except torch.OutOfMemoryError:
            if len(items) == 1:
                raise
            out = None  # retried below, once the failed attempt's tensors are released
        if out is not None:
            yield items, out
            return
        self.oom_splits += 1
        if self.backend.device.type == "cuda":
            torch.cuda.empty_cache()
        h = len(items) // 2
        yield from self._run_halving(run, prefixes[:h], items[:h], caches)
        yield from self._run_halving(run, prefixes[h:], items[h:], caches)

    def _prefix_cache(self, pre):
        dev = self.backend.device
        cache = self.backend.new_cache()
        n = len(pre)
        self.backend.hidden(torch.tensor([pre], device=dev), torch.arange(n, device=dev)[None],
                            torch.ones(1, n, dtype=torch.bool, device=dev), cache=cache,
                            needed=torch.zeros(1, n, dtype=torch.bool, device=dev))  # only the cache
        self.tokens_forwarded += n
        return cache

    def _run_batch(self, batch, cache, offsets: list[int]) -> dict:
        """offsets: each row's prefix length (its tokens in `cache`); positions continue from it.

        A continuation's last token is not run: its output predicts nothing that is scored and its key
        is seen by no later token (nothing follows it in its segment). MMLU's one-token answers thus
        add no tokens at all; the context's last position scores every choice's first token."""
        dev, packing = self.backend.device, self.backend.packing
        P = max(offsets)  # the cache's width (shorter prefixes are left-padded in it)
        width = max(len(ctx) + sum(len(c) - 1 for _, c in conts) for ctx, conts in batch)
        b = len(batch)
        ids = torch.full((b, width), self.backend.tokenizer.pad_id, dtype=torch.long)
        pos = torch.zeros(b, width, dtype=torch.long)
        seg = torch.full((b, width), -1, dtype=torch.long)  # -1 padding, 0 context, k choice k
        at = torch.zeros(b, width, dtype=torch.bool)  # positions whose logits are needed
        targets = []  # per request: (key, row, [(position predicting it, token)])
        for r, (ctx, conts) in enumerate(batch):
            n, o = len(ctx), offsets[r]
            ids[r, :n], pos[r, :n], seg[r, :n] = torch.tensor(ctx), torch.arange(o, o + n), 0
            at[r, n - 1] = True
            off = n
            for k, (key, cont) in enumerate(conts, start=1):
                m = len(cont) - 1  # tokens run: all but the last
                ids[r, off:off + m], seg[r, off:off + m] = torch.tensor(cont[:-1], dtype=torch.long), k
                pos[r, off:off + m] = torch.arange(o + n, o + n + m)
                at[r, off:off + m] = True
                preds = [n - 1] + list(range(off, off + m))
                targets.append((key, r, list(zip(preds, cont))))
                off += m
        valid = seg >= 0
        attend = None
        if packing:
            attend = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
            if P:
                attend = torch.cat([torch.ones(b, width, P, dtype=torch.bool), attend], dim=2)
            attend = attend.to(dev)
        ids, pos, valid, at = (t.to(dev) for t in (ids, pos, valid, at))
        hidden = self.backend.hidden(ids, pos, valid, cache=cache, attend=attend, needed=at)
        sel = hidden[at]  # (n, hidden), row-major order of `at`; each needed position once
        where = {(r, p): i for i, (r, p) in enumerate(at.nonzero().tolist())}
        rows_idx, toks = [], []  # for every scored token: its row in `sel` and the token
        for key, r, pairs in targets:
            for p, t in pairs:
                rows_idx.append(where[(r, p)])
                toks.append(t)
        rows_idx_t = torch.tensor(rows_idx, device=dev)
        toks_t = torch.tensor(toks, device=dev)
        lp_all = torch.empty(len(toks), dtype=torch.float32, device=dev)
        greedy_all = torch.empty(len(toks), dtype=torch.bool, device=dev)
        # The head runs once per selected position (the context's last position is shared by all
        # choices), in chunks to bound the (chunk, vocab) fp32 logits. log p(token) = logit -
        # logsumexp, greedy = logit equals the max; the logsumexp is computed in place (as
        # torch.logsumexp does it, without its two chunk-sized temporaries).
        for start in range(0, sel.shape[0], self.head_chunk):
            logits = self._head_logits(sel[start:start + self.head_chunk])
            mine = (rows_idx_t >= start) & (rows_idx_t < start + self.head_chunk)
            local, tk = rows_idx_t[mine] - start, toks_t[mine]
            picked = logits[local, tk]
            top = logits.amax(dim=-1)
            lse = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            self._check_finite(lse)  # NaN or inf anywhere in a row makes its logsumexp non-finite
            lp_all[mine] = picked - lse[local]
            greedy_all[mine] = picked >= top[local]
        lp_all, greedy_all = lp_all.cpu(), greedy_all.cpu()
        self.tokens_forwarded += int(valid.sum())
        self.tokens_scored += len(toks)
        out, k = {}, 0
        for key, r, pairs in targets:
            m = len(pairs)
            out[key] = (float(lp_all[k:k + m].sum()), bool(greedy_all[k:k + m].all()), m)
            k += m
        return out

    def _head_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of `rows` (at most head_chunk hidden states) that the caller may overwrite.

        They go into one (head_chunk, vocab) block kept for the runner's life: allocated afresh for
        every chunk, Gemma 3's 268 MB blocks of varying row counts fragmented malloc's heap, whose
        peak then varied from run to run by up to 1 GB.
        """
        buf = self._logits_block  # head_chunk rows, the most a chunk has
        logits = self.backend.head(rows, out=None if buf is None else buf[:rows.shape[0]])
        if buf is None and rows.shape[0] == self.head_chunk:
            self._logits_block = logits
        return logits.float()  # bf16 models: a fp32 copy

    # ---- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_until(self, requests: list[Generation]) -> list[GenerationResult]:
        """Batched KV-cached decoding. Prompts are left-padded (positions count real tokens only); a
        few-shot prefix shared by several prompts is run once and its KV expanded under each batch;
        finished rows leave the batch; stop strings are matched on the decoded text."""
        encoded = []
        for idx, req in enumerate(requests):
            pre, body = self.encode_context(req.context, req.shared_prefix)
            if len(pre) + len(body) + req.max_tokens > self.max_length:
                raise TooLong(idx, f"{len(pre) + len(body)} prompt tokens + max_tokens={req.max_tokens} exceed the "
                                   f"maximum length {self.max_length}")
            encoded.append((pre, body))
        keys = [self._cache_key("generate", pre + body, req.stop, req.max_tokens, req.temperature, req.top_k,
                                req.top_p, req.seed) for (pre, body), req in zip(encoded, requests)]
        uses = Counter(pre for pre, _ in encoded)
        mine = self._share(list(range(len(requests))), lambda i: self._cost(
            len(encoded[i][0]) / uses[encoded[i][0]], len(encoded[i][1]), requests[i].max_tokens))
        results: dict[int, GenerationResult] = {i: GenerationResult(*v)
                                                for i, v in self._cached({i: keys[i] for i in mine}).items()}
        groups = self._group([(*encoded[idx], requests[idx].max_tokens, idx) for idx in mine if idx not in results])
        bar = tqdm(total=len(mine), initial=len(results), desc=self._desc("generate_until"), unit="req",
                   disable=not self.progress)

        def run(batch, cache, offsets):
            return self._generate_batch([p for p, _ in batch], [requests[i] for _, i in batch], cache, offsets)

        for batch, outs in self._execute(groups, run, self.generate_batch_size):
            done = {i: res for (_, i), res in zip(batch, outs)}
            self._store("generate", keys, {i: (r.text, r.tokens, r.finish) for i, r in done.items()})
            results.update(done)
            bar.update(len(batch))
        bar.close()
        results = self._gather(results)
        return [results[i] for i in range(len(requests))]

    def _generate_batch(self, prompts, reqs, cache, offsets: list[int]) -> list[GenerationResult]:
        """cache: the rows' prefixes (offsets[r] tokens each) or None; prompts continue after them."""
        be, dev = self.backend, self.backend.device
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
        self.tokens_forwarded += int(valid.sum())
        # The prompt's logits give the first token; every later one takes a decoding step.
        cache = be.start_decoding(cache, max(q.max_tokens for q in reqs) - 1)
        active = list(range(b))  # original row of each live batch row
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        done: list[GenerationResult | None] = [None] * b
        while active:
            logits = be.head(h).float().cpu()
            self._check_finite(logits)
            nxt = []
            for j, r in enumerate(active):
                tok = _pick(logits[j], reqs[r], gens[r])
                out_tokens[r].append(tok)
                nxt.append(tok)
                res = self._finished(out_tokens[r], reqs[r])
                if res is not None:
                    done[r] = res
            self.tokens_generated += len(active)
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
        return done  # type: ignore[return-value]

    def _finished(self, toks: list[int], req: Generation) -> GenerationResult | None:
        if toks[-1] in self.backend.stop_ids:
            return GenerationResult(self.backend.tokenizer.decode(toks[:-1]), toks[:-1], "eos")
        if req.stop:
            text = self.backend.tokenizer.decode(toks)
            # Decoded in full: a stop string may span several tokens, and pieces can merge on decode.
            hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if hits:
                return GenerationResult(text[:min(hits)], toks, "stop")
        if len(toks) >= req.max_tokens:
            return GenerationResult(self.backend.tokenizer.decode(toks), toks, "length")
        return None


def _pick(logits: torch.Tensor, req: Generation, gen: torch.Generator) -> int:
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
