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
Generation (ours): continuous batching, generate_batch_size slots per batch (fewer where the KV
cache would pass kv_cache_gib); a finished row's slot takes the next waiting prompt. A few-shot
prefix with at least half a batch of prompts gets a batch of its own that holds its KV once; the
other prompts share one batch, each row's prefix copied in (generation.ContinuousDecoder).
`scheduler="static"` (and the transformers backend) decodes planned batches instead.
Results always come back in input order. The parts: batching.py plans batches (lengths only),
scoring.py encodes contexts, packs rows and runs the head, generation.py decodes.

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

from . import batching, generation
from .backends import as_backend
from .model.gemma import all_finite
from .distributed import World, shard
from .requests import (Chat, Generation, GenerationResult, Loglikelihood, LoglikelihoodResult,  # noqa: F401
                       TooLong, split_pair)
from .scoring import Encoder, LogprobHead, pack_rows


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
                 world: World = World(), generate_batch_size: int = 64, scheduler: str = "continuous",
                 kv_cache_gib: float = 8.0):
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
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler={scheduler!r}: expected continuous or static")
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib!r}: expected a number above 0")
        # The most memory the KV cache of one continuous batch may hold: caps its rows where they are long.
        self.scheduler, self.kv_budget = scheduler, int(kv_cache_gib * 2**30)
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
        self.encoder = Encoder(self.backend)
        self.head = LogprobHead(self.backend, head_chunk)

    @property
    def _shares(self) -> bool:
        """Whether rows share a few-shot prefix's KV (the backend packs rows, and sharing is on)."""
        return self.share_prefix and self.backend.packing

    def describe(self) -> dict:
        return self.backend.describe()

    def version_key(self) -> dict:
        return self.backend.version_key()

    def encode_context(self, context: str | Chat, shared_prefix: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix tokens, rest of the context) as the runner scores them; prefix is () when not shared."""
        return self.encoder.context(context, shared_prefix)

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
            cont = self.encoder.encode(continuation)
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
        todo = [(k[0], k[1], run) for k, conts in mine for run in batching.cut(
            len(k[0]) + len(k[1]), [(i, c) for i, c in conts if i not in scored], self.token_budget)]
        scored.update(self._score(todo, "loglikelihood",
                                  lambda out: self._store("loglikelihood", keys, out)))
        scored = self._gather(scored)
        return [LoglikelihoodResult(*scored[i]) for i in range(len(requests))]

    def loglikelihood_rolling(self, texts: list[str]) -> list[LoglikelihoodResult]:
        """log p(text) token by token after BOS, in windows of at most max_length tokens; each window
        after the first is conditioned on the max_length - (its length) tokens before it."""
        win = self.max_length
        windows = []
        for idx, text in enumerate(texts):
            seq = (self.backend.tokenizer.bos_id, *self.encoder.encode(text))
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
        if bool(all_finite(logits)):
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
        groups = batching.group(self._shares, [(pre, body, sum(len(c) - 1 for _, c in conts), conts)
                                               for pre, body, conts in rows])
        out: dict = {}
        bar = tqdm(total=sum(len(c) for _, _, c in rows), desc=self._desc(desc), unit="req", disable=not self.progress)
        for batch, done in self._execute(groups, self._run_batch, self.batch_size):
            if store is not None:
                store(done)
            out.update(done)
            bar.update(sum(len(c) for _, c in batch))
        bar.close()
        return out

    def _execute(self, groups: dict, run, most: int):
        """Runs every planned batch (at most `most` rows), yielding (items, run(items, cache, offsets)) per batch.

        cache holds the rows' prefixes (None for the plain group), offsets their lengths. Each prefix
        is run once, batch 1, before its first batch and dropped after its last one. A batch that
        runs out of (CUDA) memory is split in halves and each half retried (counted in oom_splits).
        """
        plan = batching.plan(groups, most, self.token_budget)
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
        -> {key: (log-prob, is greedy, tokens)} for every continuation of the batch's rows."""
        dev, b = self.backend.device, len(batch)
        ids, pos, seg, at, targets = pack_rows(batch, offsets, self.backend.tokenizer.pad_id)
        width, P = ids.shape[1], max(offsets)  # P: the cache's width (shorter prefixes are left-padded in it)
        valid = seg >= 0
        attend = None
        if self.backend.packing:
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
        lp_all, greedy_all = self.head.logprobs(sel, rows_idx, toks, self._check_finite)
        self.tokens_forwarded += int(valid.sum())
        self.tokens_scored += len(toks)
        out, k = {}, 0
        for key, r, pairs in targets:
            m = len(pairs)
            out[key] = (float(lp_all[k:k + m].sum()), bool(greedy_all[k:k + m].all()), m)
            k += m
        return out

    # ---- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_until(self, requests: list[Generation]) -> list[GenerationResult]:
        """KV-cached decoding, continuous batching (generation.ContinuousDecoder) or static batches
        (`scheduler="static"`, and backends that cannot place rows into a batch being decoded).
        Prompts are left-padded (positions count real tokens only); a few-shot prefix shared by
        several prompts is run once and its KV shared; stop strings are matched on the decoded text."""
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
        todo = [i for i in mine if i not in results]
        bar = tqdm(total=len(mine), initial=len(results), desc=self._desc("generate_until"), unit="req",
                   disable=not self.progress)

        def finished(done: dict[int, GenerationResult]) -> None:
            self._store("generate", keys, {i: (r.text, r.tokens, r.finish) for i, r in done.items()})
            results.update(done)
            bar.update(len(done))

        if self.scheduler == "continuous" and getattr(self.backend, "continuous", False):
            self._decode_continuous(todo, encoded, requests, finished)
        else:
            self._decode_static(todo, encoded, requests, finished)
        bar.close()
        results = self._gather(results)
        return [results[i] for i in range(len(requests))]

    def _decode_static(self, todo, encoded, requests, finished) -> None:
        groups = batching.group(self._shares, [(*encoded[idx], requests[idx].max_tokens, idx) for idx in todo])

        def run(batch, cache, offsets):
            outs, forwarded, generated = generation.decode_batch(
                self.backend, [p for p, _ in batch], [requests[i] for _, i in batch], cache, offsets, self._check_finite)
            self.tokens_forwarded += forwarded
            self.tokens_generated += generated
            return outs

        for batch, outs in self._execute(groups, run, self.generate_batch_size):
            finished({i: res for (_, i), res in zip(batch, outs)})

    def _decode_continuous(self, todo, encoded, requests, finished) -> None:
        """A prefix shared by at least half a batch of prompts gets a continuous batch of its own, its
        KV held once; the other prompts share one, each row with its prefix's KV copied in front of its
        own (computed once per prefix). Streams run longest prefix first; rows longest first."""
        uses = Counter(encoded[i][0] for i in todo if encoded[i][0] and encoded[i][1])
        most = self.generate_batch_size
        streams: dict[tuple[int, ...] | None, list] = {}
        for i in todo:
            pre, body = encoded[i]
            if not (self._shares and pre and body and uses[pre] > 1):
                pre, body = (), pre + body  # the prefix is ordinary tokens of the row
            # Sharing a prefix's KV pays where enough rows read it together (attention over it is one
            # matrix product for all of them, not one small product per row over a copy of it).
            own = pre if uses[pre] >= max(2, most // 2) else None  # None: the stream of rows that carry theirs
            streams.setdefault(own, []).append(generation.Row(body, pre, requests[i], i))
        left = Counter(r.prefix for r in streams.get(None, ()) if r.prefix)
        held: dict[tuple[int, ...], object] = {}

        def prefix_cache(pre, rows: int):
            """A carried prefix's one-row cache, computed at its first rows, dropped after its last."""
            if pre not in held:
                held[pre] = self._prefix_cache(pre)
            left[pre] -= rows
            return held[pre] if left[pre] else held.pop(pre)

        for own in sorted(streams, key=lambda p: -1 if p is None else -len(p)):
            rows = sorted(streams[own], key=lambda r: (-len(r.prefix), r.prefix, -len(r.tokens) - r.req.max_tokens))
            shared = self._prefix_cache(own) if own else None
            widest = max(len(r.tokens) + r.req.max_tokens + (0 if own else len(r.prefix)) for r in rows)
            slots = max(1, min(most, len(rows), self.kv_budget // max(1, widest * self.backend.kv_bytes_per_token)))
            decoder = generation.ContinuousDecoder(self.backend, slots, self.token_budget, self._check_finite,
                                                   shared, prefix_cache)
            decoder.run(rows, lambda done: finished(dict(done)))
            self.tokens_forwarded += decoder.forwarded
            self.tokens_generated += decoder.generated
            self.oom_splits += decoder.oom_splits
