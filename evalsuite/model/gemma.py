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

from .attention import AttentionMask, FlexMask, Tokens, block_attention, flex_attention, plan_masks, visible
from .config import GLOBAL, SLIDING, GemmaConfig
from .kvcache import KVCache


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
        out = block_attention(q, k, v, shared_k, shared_v, mask, self.scaling, self.cfg.attn_logit_softcap, prescaled)
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
        masks, last_mask = plan_masks(self.cfg, self.attention, positions, valid, k_pos, k_valid, attend, needed,
                                      h.dtype)
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
        allowed = visible(self.cfg, positions[:, None], cache.positions, cache.valid[:, None, :])
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

    def head_chunks(self, h: torch.Tensor, size: int):
        """The head's logits (n, size) for (n, hidden) states, one vocabulary chunk at a time, as
        (first token id, logits): each equals the same columns of `head` bit for bit (a column is
        one dot product, whatever the chunk). A chunk's weights stay in cache while every row uses
        them: on 2 cores the head at 8 to 32 rows took 30-45% less time in chunks of 2048 tokens."""
        normed = self.final_norm(h)
        weight, cap = self.embed.weight, self.cfg.final_logit_softcap
        for start in range(0, weight.shape[0], size):
            logits = F.linear(normed, weight[start:start + size])
            if cap is not None:
                logits.div_(cap).tanh_().mul_(cap)
            yield start, logits

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
