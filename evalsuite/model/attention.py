"""How attention is planned for a batch: which tokens are real (`Tokens`), which keys each query
may see, as blocks of queries over the keys they can see (`AttentionMask`, our default path) or as
a FlexAttention mask (`FlexMask`, compiled to one fused kernel on CUDA)."""

from __future__ import annotations

import torch

from .config import GLOBAL, SLIDING


class Tokens:
    """The real tokens of a padded (b, t) batch. Per-token layers run on them packed, (n, ...), so
    padding costs nothing there (a batch of rows of unequal length can be half padding); attention
    alone needs the (b, t) layout, where padding is masked. Without padding both are views."""

    def __init__(self, valid: torch.Tensor):
        self.b, self.t = valid.shape
        self.valid = valid
        self.index = None if bool(valid.all()) else valid.flatten().nonzero().squeeze(1)
        self.padding = None  # the complement of index, made when first needed

    @classmethod
    def dense(cls, b: int, t: int, device) -> "Tokens":
        """A batch without padding, known as such without reading `valid` back (decode_step)."""
        tokens = cls.__new__(cls)
        tokens.b, tokens.t, tokens.index, tokens.padding = b, t, None, None
        tokens.valid = torch.ones(b, t, dtype=torch.bool, device=device)
        return tokens

    def subset(self, keep: torch.Tensor) -> "Tokens":
        """The same (b, t) layout with only some of these tokens real: keep indexes the packed ones."""
        flat = keep if self.index is None else self.index[keep]
        valid = torch.zeros(self.b * self.t, dtype=torch.bool, device=keep.device).index_fill_(0, flat, True)
        return Tokens(valid.view(self.b, self.t))

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, ...) -> (n, ...)
        x = x.flatten(0, 1)
        return x if self.index is None else x.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (b, t, ...), zeros at padding
        if self.index is not None:
            if self.padding is None:
                self.padding = (~self.valid).flatten().nonzero().squeeze(1)
            full = x.new_empty(self.b * self.t, *x.shape[1:])
            x = full.index_copy_(0, self.index, x).index_fill_(0, self.padding, 0)
        return x.view(self.b, self.t, *x.shape[1:])


class AttentionMask:
    """Which keys (b, s) each query (b, t) may see, cut into blocks: a run of rows by a run of
    queries, over the span of key slots that any of its queries sees. Attention runs block by block
    over that span only: keys outside it are masked for every query of the block, so their softmax
    weight would be exactly 0. On a long sequence this skips the causal upper triangle and, on
    sliding layers, all keys outside the window (a 2,400-token few-shot block under a 512-token
    window: 4 times fewer scores). Rows are split into runs where their spans differ much: in a
    batch whose rows continue few-shot blocks of different lengths (left-padded in a stacked cache),
    a row of a 1,400-token block would otherwise score all 2,400 slots of its longest neighbour.
    Queries that see nothing (padding) are left out where a run ends in them."""

    # Small enough that a block's span wastes little (the causal triangle of a block, and on sliding
    # layers a band of window + block - 1 keys); large enough for efficient matmuls. On 2 cores
    # (Gemma 3 270M, MMLU 300 items) 64 ran 88 s against 93 s for 128 and 94 s for 256 queries.
    QUERIES_PER_BLOCK = 64
    # Rows join a run while that wastes at most this share of its scores, or while the run is small
    # (a decode step's few hundred scores: one matmul beats one per row).
    RUN_SLACK, SMALL_RUN = 1.25, 1 << 16

    def __init__(self, allowed: torch.Tensor, dtype: torch.dtype):
        b, t, s = allowed.shape
        step = self.QUERIES_PER_BLOCK
        starts = list(range(0, t, step))
        # Per (query block, row): the first and last key slot seen and the last query that sees any,
        # -1 where the row's queries in the block see nothing; moved to the host in one transfer.
        keys_seen = torch.stack([allowed[:, q0:q0 + step].any(1) for q0 in starts])  # (blocks, b, s)
        queries_seeing = torch.zeros(len(starts), b, step, dtype=torch.bool, device=allowed.device)
        for i, q0 in enumerate(starts):
            queries_seeing[i, :, :min(step, t - q0)] = allowed[:, q0:q0 + step].any(2)
        slots = torch.arange(s, device=allowed.device)
        qidx = torch.arange(step, device=allowed.device)
        bounds = torch.stack([torch.where(keys_seen, slots, s).amin(2), torch.where(keys_seen, slots, -1).amax(2),
                              torch.where(queries_seeing, qidx, -1).amax(2)], dim=2).tolist()  # (blocks, b, 3)
        # Additive, with the dtype's finite minimum as HF: a fully masked (padding) query inside a
        # block gets a uniform softmax instead of NaN, and NaN cannot leak into real rows through P @ V.
        neg = torch.finfo(dtype).min
        self.blocks = []  # (r0, r1, q0, q1, k0, k1, additive mask (r1 - r0, q1 - q0, k1 - k0))
        for q0, rows in zip(starts, bounds):
            runs = []  # [r0, r1, k0, k1, last query + 1, scores if its rows ran alone]
            extend = False  # whether the next row may join runs[-1] (it is its neighbour)
            for r, (k0, k_last, q_last) in enumerate(rows):
                if q_last < 0:  # nothing seen: padding only
                    extend = False
                    continue
                k1, m = k_last + 1, q_last + 1
                if extend:
                    run = runs[-1]
                    merged = (r + 1 - run[0]) * max(run[4], m) * (max(run[3], k1) - min(run[2], k0))
                    if merged <= self.SMALL_RUN or merged <= self.RUN_SLACK * (run[5] + m * (k1 - k0)):
                        runs[-1] = [run[0], r + 1, min(run[2], k0), max(run[3], k1), max(run[4], m),
                                    run[5] + m * (k1 - k0)]
                        continue
                runs.append([r, r + 1, k0, k1, m, m * (k1 - k0)])
                extend = True
            for r0, r1, k0, k1, m, _ in runs:
                part = allowed[r0:r1, q0:q0 + m, k0:k1]
                additive = torch.zeros(part.shape, dtype=dtype, device=part.device).masked_fill_(~part, neg)
                self.blocks.append((r0, r1, q0, q0 + m, k0, k1, additive))

    @classmethod
    def whole(cls, allowed: torch.Tensor, dtype: torch.dtype) -> "AttentionMask":
        """One block over every row, query and key slot: fixed shapes, and nothing read back to the
        host (decode_step)."""
        b, t, s = allowed.shape
        mask = cls.__new__(cls)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.blocks = [(0, b, 0, t, 0, s, additive.masked_fill_(~allowed, torch.finfo(dtype).min))]
        return mask


class FlexMask:
    """The same (b, t, s) visibility as a FlexAttention BlockMask, for `Gemma.attention = "flex"`.
    FlexAttention applies Gemma 2's soft-cap as a score modification and skips the key blocks (128
    by 128) that no query sees, in one fused kernel on CUDA (compiled on first use). On CPU it runs unfused (it materialises the scores): there it exists so that tests can
    check the logic against transformers; `AttentionMask` is faster on CPU."""

    def __init__(self, allowed: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask
        b, t, s = allowed.shape

        def visible(row, head, q, k):
            return allowed[row, q, k]

        self.block_mask = create_block_mask(visible, b, None, t, s, device=allowed.device)


_compiled_flex = None


def flex_attention(q, k, v, mask: FlexMask, scale: float, softcap: float | None) -> torch.Tensor:
    """q (b, nh, t, hd), k and v (b, nkv, s, hd) -> (b, nh, t, hd); scores are scaled, then
    soft-capped (Gemma 2), then masked, as in the eager path."""
    global _compiled_flex
    from torch.nn.attention import flex_attention as fa
    run = fa.flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            # Automatic dynamic shapes (a recompile marks the sizes that changed as dynamic), not
            # dynamic=True: that turns the soft-cap float captured by score_mod into a symbol, which
            # inductor cannot lower (torch 2.13: "unbacked_bindings").
            _compiled_flex = torch.compile(fa.flex_attention)
        run = _compiled_flex

    def capped(score, row, head, q_idx, k_idx):
        return torch.tanh(score / softcap) * softcap

    return run(q, k, v, score_mod=None if softcap is None else capped, block_mask=mask.block_mask, scale=scale,
               enable_gqa=q.shape[1] != k.shape[1])


def block_attention(q, k, v, shared_k, shared_v, mask: AttentionMask, scaling: float, softcap: float | None,
                    prescaled: bool) -> torch.Tensor:
    """Attention of q (b, nh, t, hd) over a row's own keys k, v (b, nkv, s, hd) and a prefix shared by
    every row (shared_k, shared_v: (1, nkv, P, hd), or None), block by block as `mask` plans it:
    scaled (unless `prescaled`), soft-capped, masked, softmax in fp32. -> (b, t, nkv, group, hd)."""
    # Query head h uses kv head h // group (HF repeat_kv); group the queries instead of copying K/V.
    b, nh, t, hd = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    # Key slots [0, P) are the shared prefix, [P, s) each row's own keys (slot P + j is own key j).
    P = 0 if shared_k is None else shared_k.shape[2]
    # Every real query sees at least itself, so the blocks cover it; what they leave unwritten is
    # padding, which `pack` never reads (no need to zero a padded layout that can be half padding).
    # Allocated after the first block's scores and probabilities are freed: never live with them.
    out = None
    for r0, r1, q0, q1, k0, k1, additive in mask.blocks:
        rows, m, span = r1 - r0, q1 - q0, k1 - k0
        qg = q[r0:r1, :, q0:q1].reshape(rows, nkv, group * m, hd)
        n_shared = max(0, min(k1, P) - k0)  # slots of the span in the shared prefix
        parts = []
        if n_shared:
            # One matmul for the queries of all rows over the prefix keys, read once (batched
            # per row, every row would read them again, and they would be copied per row).
            q_all = qg.transpose(0, 1).reshape(nkv, rows * group * m, hd)
            parts.append(torch.matmul(q_all, shared_k[0, :, k0:k0 + n_shared].transpose(1, 2))
                         .view(nkv, rows, group * m, n_shared).transpose(0, 1))
        if n_shared < span:
            parts.append(torch.matmul(qg, k[r0:r1, :, k0 + n_shared - P:k1 - P].transpose(2, 3)))
        scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if not prescaled:
            scores = scores.mul_(scaling)
        if softcap is not None:  # Gemma 2: divide, tanh, multiply, BEFORE the mask (a masked -inf would become -cap)
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        scores = scores.view(rows, nkv, group, m, span).add_(additive[:, None, None])
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(rows, nkv, group * m, span)
        part = None
        if n_shared < span:
            part = torch.matmul(probs[..., n_shared:], v[r0:r1, :, k0 + n_shared - P:k1 - P])
        if n_shared:
            p_all = probs[..., :n_shared].transpose(0, 1).reshape(nkv, rows * group * m, n_shared)
            from_shared = torch.matmul(p_all, shared_v[0, :, k0:k0 + n_shared])
            from_shared = from_shared.view(nkv, rows, group * m, hd).transpose(0, 1)
            part = from_shared if part is None else part.add_(from_shared)
        del scores, probs, parts
        if out is None:
            out = q.new_empty(b, t, nkv, group, hd)
        out[r0:r1, q0:q1] = part.reshape(rows, nkv, group, m, hd).permute(0, 3, 1, 2, 4)
    return out


def visible(cfg, q_pos, k_pos, real, attend=None) -> dict:
    """{layer kind: (b, t, s) bool}, which keys each query sees; real: both tokens are real."""
    # Query i sees key j iff both are real tokens and j is at a position <= i (causal by
    # position), and on sliding layers also i - j < sliding_window: the token itself plus W-1
    # earlier ones (HF masking_utils.sliding_window_overlay: kv_idx > q_idx - W). Padding queries
    # see nothing, so attention skips them (their outputs are never read).
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = {GLOBAL: real & (dist >= 0)}
    if attend is not None:
        allowed[GLOBAL] &= attend
    if SLIDING in cfg.layer_types:
        allowed[SLIDING] = allowed[GLOBAL] & (dist < cfg.sliding_window)
    return allowed


def plan_masks(cfg, path: str, q_pos, q_valid, k_pos, k_valid, attend, needed, dtype, kept_kinds):
    """{layer kind: mask}, and {kind: mask with only the `needed` queries} for the kinds in
    kept_kinds (the layers that run for those only; see Gemma.hidden); masks are AttentionMask or
    FlexMask as `path` ("blocks" or "flex", Gemma.attention) says."""
    allowed = visible(cfg, q_pos, k_pos, k_valid[:, None, :] & q_valid[:, :, None], attend)
    if path not in ("blocks", "flex"):
        raise ValueError(f"Gemma.attention={path!r}: expected 'blocks' or 'flex'")
    make = (lambda a: FlexMask(a)) if path == "flex" else (lambda a: AttentionMask(a, dtype))
    masks = {kind: make(a) for kind, a in allowed.items()}
    if needed is None:
        return masks, masks
    return masks, {kind: make(allowed[kind] & needed[:, :, None]) for kind in kept_kinds}
