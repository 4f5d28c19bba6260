"""The Gemma 1 / 2 / 3 text network in plain PyTorch, written to match transformers' eager path.

Numerics follow transformers `modeling_gemma2.py` / `modeling_gemma3.py` (eager attention) op for
op, so fp32 logits agree to float rounding. Differences from that code are deliberate and noted:
  * norm weights hold the full scale (1 + w), precomputed in fp32 at load time. HF computes
    `1.0 + w.float()` at run time; the result is the same fp32 number, and GGUF files store it.
  * the attention mask is built from token *positions*, not slots in the padded tensor, so a
    padded or prefix-shared row attends exactly as the unpadded sequence would.
  * grouped-query attention reshapes queries to (kv_head, group) instead of copying K/V per head.
  * per-token layers (projections, MLP, norms) run on the real tokens of a padded batch only
    (`Tokens`); attention alone sees the padded (b, t) layout.
  * attention runs in blocks of queries over the keys they can see (`AttentionMask`), not over the
    full masked (t, s) square. `Gemma.attention = "flex"` runs it with FlexAttention instead
    (`FlexMask`; compiled to one fused kernel on CUDA), for GPUs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GLOBAL, SLIDING, GemmaConfig


class RMSNorm(nn.Module):
    """x / rms(x) * scale, in fp32, cast back at the end (HF Gemma3RMSNorm; transformers PR #29402)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))  # = 1 + w of the HF checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.mul_(self.weight.float()).type_as(x)  # in place: `out` is a new tensor


def rope_inv_freq(head_dim: int, base: float, scaling_factor: float = 1.0) -> torch.Tensor:
    # HF _compute_default_rope_parameters; linear scaling divides the frequencies (global layers of Gemma 3 4B+).
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv_freq / scaling_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, half by half: dimension j pairs with j + d/2 (HF layout;
    GGUF Gemma tensors are not permuted). cos and sin hold each angle twice, so their first half
    serves both halves; x1 * c - x2 * s rounds as x1 * c + (-x2) * s does, so this is exact."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether x holds no NaN/inf, as a device-side bool: any NaN or inf in x makes its sum NaN or
    inf, and a sum of finite activations does not reach float32's 3.4e38. One reduction pass, not
    the four passes of isfinite(x).all()."""
    return torch.isfinite(x.sum())


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


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.cfg, self.layer_type = cfg, layer_type
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q = nn.Linear(cfg.hidden_size, nh * hd, bias=False)
        self.k = nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
        self.v = nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
        self.o = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        # A Python float, as HF uses it: query_pre_attn_scalar ** -0.5 multiplies the scores.
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        # Where it is a power of two (1/16 for query_pre_attn_scalar 256: Gemma 2 2B/9B, Gemma 3 up to
        # 12B) scaling the queries instead gives the same scores bit for bit (only the exponent moves)
        # and costs a pass over (tokens, heads, head_dim) instead of one over the larger scores.
        self.prescale = math.frexp(self.scaling)[0] == 0.5

    def forward(self, x, cos, sin, mask: "AttentionMask", cache: "KVCache | None", layer: int,
                tokens: Tokens, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (n, hidden), the real tokens of the batch described by `tokens`; returns (n, hidden).
        keep: optional indices into those tokens; only they query (keys and values are made for all),
        and the result is (len(keep), hidden)."""
        b, t = tokens.b, tokens.t
        hd, nh, nkv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        n = x.shape[0]
        queries, q_x, q_cos, q_sin = tokens, x, cos, sin
        if keep is not None:
            queries, q_x, q_cos, q_sin = tokens.subset(keep), x[keep], cos[keep], sin[keep]
        q, k = self.q(q_x).view(-1, nh, hd), self.k(x).view(n, nkv, hd)
        if self.cfg.qk_norm:  # Gemma 3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)  # cos, sin: (n, 1, hd)
        k = tokens.unpack(k).transpose(1, 2)  # (b, nkv, t, hd)
        v = tokens.unpack(self.v(x).view(n, nkv, hd)).transpose(1, 2)
        shared_k = shared_v = None
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (b, nkv, s, hd): earlier keys followed by these
            if cache.shared is not None:  # a prefix every row starts with, kept once: (1, nkv, P, hd)
                shared_k, shared_v = cache.shared.k[layer], cache.shared.v[layer]
        if q.shape[0] == 0:  # nothing queries (a prefix whose keys and values are all that is needed)
            return x.new_zeros(0, x.shape[1])
        prescaled = self.prescale and not isinstance(mask, FlexMask)
        if prescaled:
            q = q.mul_(self.scaling)
        q = queries.unpack(q).transpose(1, 2)  # (b, nh, t, hd)
        if isinstance(mask, FlexMask):
            if shared_k is not None:  # FlexAttention takes one key tensor per row: copy the prefix in
                k, v = cache.full(layer)
            out = flex_attention(q, k, v, mask, self.scaling, self.cfg.attn_logit_softcap)
            return self.o(queries.pack(out.transpose(1, 2).reshape(b, t, nh * hd)))
        # Query head h uses kv head h // group (HF repeat_kv); group the queries instead of copying K/V.
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
                scores = scores.mul_(self.scaling)
            cap = self.cfg.attn_logit_softcap
            if cap is not None:  # Gemma 2: divide, tanh, multiply, BEFORE the mask (a masked -inf would become -cap)
                scores = scores.div_(cap).tanh_().mul_(cap)
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
        return self.o(queries.pack(out.view(b, t, nh * hd)))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # GeGLU with the tanh GELU ("gelu_pytorch_tanh" = F.gelu(approximate="tanh"), not a hand formula).
        # The product in place, into the GELU's output: one large intermediate fewer per layer.
        return self.down(F.gelu(self.gate(x), approximate="tanh").mul_(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_type)
        self.pre_ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.post_norms:  # Gemma 2/3 normalise each branch output before the residual add
            self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, layer, tokens: Tokens, keep: torch.Tensor | None = None):
        x = self.attn(self.attn_norm(h), cos, sin, mask, cache, layer, tokens, keep)
        if keep is not None:  # the rest of the block only for the tokens whose output is needed
            h = h[keep]
        if self.cfg.post_norms:
            x = self.post_attn_norm(x)
        h = h + x
        x = self.mlp(self.pre_ffn_norm(h))
        if self.cfg.post_norms:
            x = self.post_ffn_norm(x)
        return h + x


class KVCache:
    """Keys/values of earlier tokens, per layer, with their positions and validity.

    Keys are stored after RoPE, as in transformers. `append` is called once per layer per forward;
    positions and validity are extended once per forward by `extend`. A cache built for one
    sequence can be shared by many continuations with `expand`.

    An expanded cache keeps that sequence once, as `shared` (a one-row cache whose keys precede
    every row's), and `k`/`v` hold only what each row appended after it; `positions` and `valid`
    cover both. Attention scores the shared keys once for the queries of all rows. Copying the
    prefix into every row instead (as concatenating would) costs, for a 5-shot GSM8K prompt and
    Gemma 3 270M, about 30 MB per row and a copy of it at every append.

    Short appends (decoding) write into spare slots: `k[layer]` is then a view of the first slots
    of a larger buffer that this cache owns, grown by HEADROOM slots at a time. Appending by
    concatenation would copy the whole cache at every step. Long appends (a prompt, scored
    continuations) get an exact-size tensor: they come once, and spare slots would only hold memory.

    `reserve(n)` fixes the shapes instead, for Gemma.decode_step: n zeroed slots, invalid until a
    step writes them, and every step writes one slot in place at a device-side index (`slot`), so
    that a step reads nothing back to the host and can be captured in a CUDA graph and replayed.
    """

    HEADROOM = 64  # spare slots per reallocation for appends of up to SHORT tokens
    SHORT = 16

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        # Per layer, the (k, v) buffers this cache allocated and whose first slots k[layer] and
        # v[layer] view; None where they are tensors it does not own (a prompt's keys), which are
        # never written to.
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.shared: KVCache | None = None  # see expand
        self.positions: torch.Tensor | None = None  # (b, s) long, shared prefix included
        self.valid: torch.Tensor | None = None  # (b, s) bool
        self.slot: torch.Tensor | None = None  # after reserve: (1,) the slot the next step writes

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def extend(self, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:
            self.positions, self.valid = positions, valid
        else:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.positions, self.valid

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one forward's keys and values (b, nkv, t, hd); returns the rows' own keys and values
        so far (without the shared prefix)."""
        if self.slot is not None:  # reserved: one step, written in place (own slots follow the shared ones)
            own = self.slot - (self.positions.shape[1] - self.k[layer].shape[2])
            self.k[layer].index_copy_(2, own, k)
            self.v[layer].index_copy_(2, own, v)
            return self.k[layer], self.v[layer]
        old_k, old_v, t = self.k[layer], self.v[layer], k.shape[2]
        if old_k is None:
            self.k[layer], self.v[layer] = k, v
            return k, v
        s, buffers = old_k.shape[2], self._buffers[layer]
        if buffers is None or buffers[0].shape[2] < s + t or buffers[0].shape[0] != k.shape[0]:
            spare = self.HEADROOM if t <= self.SHORT else 0
            shape = (k.shape[0], k.shape[1], s + t + spare, k.shape[3])
            buffers = (k.new_empty(shape), v.new_empty(shape))
            buffers[0][:, :, :s], buffers[1][:, :, :s] = old_k, old_v
            self._buffers[layer] = buffers if spare else None
        buffers[0][:, :, s:s + t], buffers[1][:, :, s:s + t] = k, v
        self.k[layer], self.v[layer] = buffers[0][:, :, :s + t], buffers[1][:, :, :s + t]
        return self.k[layer], self.v[layer]

    def reserve(self, n: int) -> None:
        """Fixed shapes for n more one-token steps (see the class docstring); the cache must hold
        each row's own keys (a prompt was run)."""
        if self.k[0] is None or self.slot is not None:
            raise ValueError("reserve needs a cache holding a prompt, reserved once")
        b = self.positions.shape[0]
        self.slot = torch.tensor([self.positions.shape[1]], device=self.positions.device)
        self.positions = torch.cat([self.positions, self.positions.new_zeros(b, n)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(b, n)], dim=1)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            # Zeros, not empty memory: a masked slot still enters q @ k, and NaN there would spread.
            self.k[i], self.v[i] = (torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], dim=2) for t in (k, v))
            self._buffers[i] = None

    def write_step(self, positions: torch.Tensor) -> None:
        """A reserved cache: the step's positions (b,) at `slot`, now valid."""
        self.positions.index_copy_(1, self.slot, positions[:, None])
        self.valid.index_fill_(1, self.slot, True)

    def full(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values (b, nkv, s, hd), the shared prefix copied in."""
        if self.shared is None:
            return self.k[layer], self.v[layer]
        b = self.positions.shape[0]
        pre = [t.expand(b, -1, -1, -1) for t in (self.shared.k[layer], self.shared.v[layer])]
        if self.k[layer] is None:
            return pre[0], pre[1]
        return torch.cat([pre[0], self.k[layer]], dim=2), torch.cat([pre[1], self.v[layer]], dim=2)

    def expand(self, batch: int) -> "KVCache":
        """A cache of `batch` rows that all start with this one-row cache, which it shares (no copy)."""
        if self.positions is None or self.positions.shape[0] != 1 or self.shared is not None:
            raise ValueError("expand needs a non-empty cache of batch size 1 without a shared prefix")
        out = KVCache(len(self.k))
        out.shared = self
        out.positions = self.positions.expand(batch, -1)
        out.valid = self.valid.expand(batch, -1)
        return out

    @staticmethod
    def stack(caches: list["KVCache"]) -> "KVCache":
        """One row per one-row cache, left-padded to the longest (padding is marked invalid, so it is
        never attended to); lets requests with different few-shot prefixes share a batch."""
        width = max(len(c) for c in caches)
        out = KVCache(len(caches[0].k))

        def pad(t: torch.Tensor, n: int, dim: int, value=0) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)

        gaps = [width - len(c) for c in caches]
        for i in range(len(out.k)):
            kv = [c.full(i) for c in caches]
            out.k[i] = torch.cat([pad(k, g, 2) for (k, _), g in zip(kv, gaps)])
            out.v[i] = torch.cat([pad(v, g, 2) for (_, v), g in zip(kv, gaps)])
        out.positions = torch.cat([pad(c.positions, g, 1) for c, g in zip(caches, gaps)])
        out.valid = torch.cat([pad(c.valid, g, 1, False) for c, g in zip(caches, gaps)])
        return out

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep only the given batch rows (e.g. drop finished sequences during decoding)."""
        out = KVCache(len(self.k))
        out.shared = self.shared
        out.slot = None if self.slot is None else self.slot.clone()
        for i, (k, v, buffers) in enumerate(zip(self.k, self.v, self._buffers)):
            if k is None:
                continue
            if buffers is None:
                out.k[i], out.v[i] = k.index_select(0, rows), v.index_select(0, rows)
            else:  # keep the spare slots, so that decoding the remaining rows goes on without a copy
                out._buffers[i] = (buffers[0].index_select(0, rows), buffers[1].index_select(0, rows))
                out.k[i], out.v[i] = out._buffers[i][0][:, :, :k.shape[2]], out._buffers[i][1][:, :, :k.shape[2]]
        out.positions, out.valid = self.positions.index_select(0, rows), self.valid.index_select(0, rows)
        return out


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq_global", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
                             persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg.head_dim, cfg.rope_local_theta), persistent=False)
        self.last_finite: torch.Tensor | None = None  # see hidden() and nonfinite_origin()
        # "blocks": AttentionMask, exact eager numerics, fastest on CPU. "flex": FlexMask, for GPUs.
        self.attention = "blocks"

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)

    def _rope(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        # fp32 angles, cast to the activation dtype at the end (HF Gemma3RotaryEmbedding.forward).
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (n, 1, hd) for n positions

    def _visible(self, q_pos, k_pos, real, attend=None) -> dict:
        """{layer kind: (b, t, s) bool}, which keys each query sees; real: both tokens are real."""
        # Query i sees key j iff both are real tokens and j is at a position <= i (causal by
        # position), and on sliding layers also i - j < sliding_window: the token itself plus W-1
        # earlier ones (HF masking_utils.sliding_window_overlay: kv_idx > q_idx - W). Padding queries
        # see nothing, so attention skips them (their outputs are never read).
        dist = q_pos[:, :, None] - k_pos[:, None, :]
        allowed = {GLOBAL: real & (dist >= 0)}
        if attend is not None:
            allowed[GLOBAL] &= attend
        if SLIDING in self.cfg.layer_types:
            allowed[SLIDING] = allowed[GLOBAL] & (dist < self.cfg.sliding_window)
        return allowed

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        # sqrt(hidden) as an fp32 tensor cast to the weight dtype (HF Gemma3TextScaledWordEmbedding):
        # in bf16 the constant itself is rounded, e.g. 59.87 -> 59.75 for Gemma 2 9B.
        return self.embed(ids) * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=torch.float32).to(self.dtype)

    def _ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{layer kind: (cos, sin)} for positions (n,)."""
        rope = {GLOBAL: self._rope(positions, self.inv_freq_global, dtype)}
        if SLIDING in self.cfg.layer_types:
            rope[SLIDING] = self._rope(positions, self.inv_freq_local, dtype)
        return rope

    def _masks(self, q_pos, q_valid, k_pos, k_valid, attend, needed, dtype):
        """{layer kind: mask} and the last layer's mask, which has only the `needed` queries; masks
        are AttentionMask or FlexMask as `self.attention` says."""
        allowed = self._visible(q_pos, k_pos, k_valid[:, None, :] & q_valid[:, :, None], attend)
        if self.attention not in ("blocks", "flex"):
            raise ValueError(f"Gemma.attention={self.attention!r}: expected 'blocks' or 'flex'")
        make = (lambda a: FlexMask(a)) if self.attention == "flex" else (lambda a: AttentionMask(a, dtype))
        masks = {kind: make(a) for kind, a in allowed.items()}
        kind = self.cfg.layer_types[-1]
        last = masks[kind] if needed is None else make(allowed[kind] & needed[:, :, None])
        return masks, last

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attend: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` (b, t); see `hidden` for the arguments.

        logits_at: optional (b, t) bool; when given, the output head runs only at those positions and
            the result is (n, vocab) in row-major order. Otherwise (b, t, vocab).
        Logits are in the model dtype, soft-capped where the config says so.
        """
        h = self.hidden(input_ids, positions, valid, cache, attend, needed=logits_at)
        if logits_at is not None:
            h = h[logits_at]  # (n, hidden): the vocab-sized head is most of a small model's cost
        return self.head(h)

    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attend: torch.Tensor | None = None,
        needed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (b, t, hidden) before the output norm and head (zeros at padding).

        positions: (b, t) absolute positions; default continues after `cache` (or starts at 0).
        valid: (b, t) bool, False for padding; padding is never attended to.
        cache: earlier keys/values; this call's keys are appended to it.
        attend: optional (b, t, len(cache) + t) bool restricting which keys each query may see
            beyond the causal rule (e.g. several continuations packed after one shared context).
        needed: optional (b, t) bool, the positions whose hidden state is wanted (the rest come back
            as zeros): the last layer then runs its queries, output projection and MLP for those only,
            its keys and values for all (a layer's worth of work saved on a prefix, whose cache is
            all that is needed, and on scored rows, where few positions are read).
        """
        b, t = input_ids.shape
        dev = input_ids.device
        if positions is None:
            start = 0 if cache is None or cache.positions is None else int(cache.positions.max()) + 1
            positions = torch.arange(start, start + t, device=dev).expand(b, t)
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=dev)
        if cache is not None:
            k_pos, k_valid = cache.extend(positions, valid)
        else:
            k_pos, k_valid = positions, valid

        tokens = Tokens(valid)
        h = self._embed(tokens.pack(input_ids))  # (n, hidden): real tokens only, see Tokens
        masks, last_mask = self._masks(positions, valid, k_pos, k_valid, attend, needed, h.dtype)
        rope = self._ropes(tokens.pack(positions), h.dtype)
        # Whether the embeddings and each layer's output are finite, kept on the device (no sync): read
        # only when the logits turn out non-finite, to say where NaN/inf first appeared.
        keep, out = None, tokens
        if needed is not None:
            keep = tokens.pack(needed).nonzero().squeeze(1)
            out = tokens.subset(keep)
        finite = [all_finite(h)]
        last = len(self.layers) - 1
        for i, (block, kind) in enumerate(zip(self.layers, self.cfg.layer_types)):
            cos, sin = rope[kind]
            if i == last:
                h = block(h, cos, sin, last_mask, cache, i, tokens, keep)
            else:
                h = block(h, cos, sin, masks[kind], cache, i, tokens)
            finite.append(all_finite(h))
        self.last_finite = torch.stack(finite)
        return out.unpack(h)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, ids and positions (b,), after a cache reserved with KVCache.reserve;
        returns the final hidden states (b, hidden) and moves the cache's slot on.

        The same network as `hidden` with fixed shapes and nothing read back to the host: each row's
        query sees every slot of the cache, masked where invalid, later or outside the window (one
        AttentionMask block), so a step can be captured once and replayed as a CUDA graph. Masked
        slots get softmax weight exactly 0, as in `hidden`; only the summation order may differ.
        """
        b = ids.shape[0]
        cache.write_step(positions)
        h = self._embed(ids)
        allowed = self._visible(positions[:, None], cache.positions, cache.valid[:, None, :])
        masks = {kind: AttentionMask.whole(a, h.dtype) for kind, a in allowed.items()}
        rope = self._ropes(positions, h.dtype)
        tokens = Tokens.dense(b, 1, ids.device)
        finite = [all_finite(h)]
        for i, (block, kind) in enumerate(zip(self.layers, self.cfg.layer_types)):
            h = block(h, *rope[kind], masks[kind], cache, i, tokens)
            finite.append(all_finite(h))
        self.last_finite = torch.stack(finite)
        cache.slot += 1
        return h

    def nonfinite_origin(self) -> str | None:
        """Where the last `hidden` call first produced NaN/inf: 'the embeddings', 'layer i (kind)', or None."""
        flags = self.last_finite
        if flags is None or bool(flags.all()):
            return None
        first = int((~flags.cpu()).nonzero()[0])
        return "the embeddings" if first == 0 else f"layer {first - 1} ({self.cfg.layer_types[first - 1]})"

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output norm, tied head and final soft-cap for hidden states of any leading shape.

        `out`: a (n, vocab) tensor to write the logits into, for (n, hidden) states.
        """
        normed = self.final_norm(h)
        if out is None:
            logits = F.linear(normed, self.embed.weight)  # tied output head
        else:
            logits = torch.mm(normed, self.embed.weight.t(), out=out)
        cap = self.cfg.final_logit_softcap
        if cap is not None:  # Gemma 2: 30.0; in place, the logits being ours
            logits.div_(cap).tanh_().mul_(cap)
        return logits
