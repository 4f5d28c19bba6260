"""The Gemma 1 / 2 / 3 / 4 text network in plain PyTorch, written to match transformers' eager path.

Numerics follow transformers `modeling_gemma2.py` / `modeling_gemma3.py` / `modeling_gemma4.py`
(eager attention) op for op, so fp32 logits agree to float rounding. Gemma 4's additions switch on
config fields (see GemmaConfig): per-type head widths, K=V global layers, value norms, layer scalars,
KV sharing, per-layer embeddings (`ple_*`) and routed experts (`MoE`). Differences from that code are
deliberate and noted:
  * norm weights hold the full scale (1 + w), precomputed in fp32 at load time. HF computes
    `1.0 + w.float()` at run time; the result is the same fp32 number, and GGUF files store it.
    (Gemma 4 checkpoints store the scale itself.)
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
    """x / rms(x) * scale, in fp32, cast back at the end (HF Gemma3RMSNorm; transformers PR #29402).

    Gemma 4 (HF Gemma4RMSNorm) takes the inverse RMS as pow(ms, -0.5), which may differ from rsqrt
    in the last bit, and has norms without a scale (values, router input)."""

    def __init__(self, dim: int, eps: float, pow_inverse: bool = False, scaled: bool = True):
        super().__init__()
        self.eps, self.pow_inverse = eps, pow_inverse
        # = 1 + w of a Gemma 1-3 HF checkpoint, w of a Gemma 4 one
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = xf.pow(2).mean(-1, keepdim=True) + self.eps
        out = xf * (torch.pow(ms, -0.5) if self.pow_inverse else torch.rsqrt(ms))
        if self.weight is not None:
            out.mul_(self.weight.float())  # in place: `out` is a new tensor
        return out.type_as(x)


def norm(cfg: GemmaConfig, dim: int, scaled: bool = True) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, pow_inverse=cfg.gemma4, scaled=scaled)


def rope_inv_freq(head_dim: int, base: float, scaling_factor: float = 1.0, partial: float = 1.0) -> torch.Tensor:
    # HF _compute_default_rope_parameters; linear scaling divides the frequencies (global layers of Gemma 3 4B+).
    # Proportional RoPE (Gemma 4 global layers, HF _compute_proportional_rope_parameters): the first
    # int(partial * head_dim // 2) frequencies as above (exponent over the whole head), the rest 0,
    # so that those dimensions pass unrotated (cos 1, sin 0).
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if partial < 1.0:
        inv_freq[int(partial * head_dim // 2):] = 0.0
    return inv_freq / scaling_factor


def rope_frequencies(cfg: GemmaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, sliding) inverse frequencies, each over its layers' head width."""
    return (rope_inv_freq(cfg.layer_head_dim(GLOBAL), cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_partial_factor),
            rope_inv_freq(cfg.layer_head_dim(SLIDING), cfg.rope_local_theta))


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
    def __init__(self, cfg: GemmaConfig, layer_type: str, layer: int):
        super().__init__()
        self.cfg, self.layer_type = cfg, layer_type
        self.hd, self.nkv = hd, nkv = cfg.layer_head_dim(layer_type), cfg.layer_kv_heads(layer_type)
        nh = cfg.num_heads
        # KV sharing (Gemma 4 E2B/E4B): a reader computes no keys or values and attends to those of
        # the last earlier layer of its type, which passes them on (`shared_kv`, one dict per forward).
        self.reads_kv = cfg.shares_kv(layer)
        self.passes_kv = not self.reads_kv and any(
            cfg.kv_source(j) == layer for j in range(cfg.kv_layers, cfg.num_layers))
        self.q = nn.Linear(cfg.hidden_size, nh * hd, bias=False)
        self.o = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = norm(cfg, hd)
        if not self.reads_kv:
            self.k = nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
            # K=V: the values are the key projection, normed without RoPE.
            self.v = None if cfg.kv_tied(layer_type) else nn.Linear(cfg.hidden_size, nkv * hd, bias=False)
            if cfg.qk_norm:
                self.k_norm = norm(cfg, hd)
            self.v_norm = norm(cfg, hd, scaled=False) if cfg.gemma4 else None
        # A Python float, as HF uses it: query_pre_attn_scalar ** -0.5 multiplies the scores.
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        # Where it is a power of two (1/16 for query_pre_attn_scalar 256: Gemma 2 2B/9B, Gemma 3 up to
        # 12B) scaling the queries instead gives the same scores bit for bit (only the exponent moves)
        # and costs a pass over (tokens, heads, head_dim) instead of one over the larger scores.
        self.prescale = math.frexp(self.scaling)[0] == 0.5

    def forward(self, x, cos, sin, mask: "AttentionMask", cache: "KVCache | None", layer: int,
                tokens: Tokens, keep: torch.Tensor | None = None, shared_kv: dict | None = None) -> torch.Tensor:
        """x: (n, hidden), the real tokens of the batch described by `tokens`; returns (n, hidden).
        keep: optional indices into those tokens; only they query (keys and values are made for all),
        and the result is (len(keep), hidden). shared_kv: this forward's keys and values by layer
        type, written by the layers that pass theirs on and read by KV-sharing layers."""
        b, t = tokens.b, tokens.t
        hd, nh, nkv = self.hd, self.cfg.num_heads, self.nkv
        n = x.shape[0]
        queries, q_x, q_cos, q_sin = tokens, x, cos, sin
        if keep is not None:
            queries, q_x, q_cos, q_sin = tokens.subset(keep), x[keep], cos[keep], sin[keep]
        q = self.q(q_x).view(-1, nh, hd)
        if self.cfg.qk_norm:  # Gemma 3/4: per-head RMSNorm before RoPE
            q = self.q_norm(q)
        q = apply_rope(q, q_cos, q_sin)  # cos, sin: (n, 1, hd)
        if self.reads_kv:
            k, v, shared_k, shared_v, kv_layer = shared_kv[self.layer_type]
        else:
            kv_layer = layer
            k = self.k(x).view(n, nkv, hd)
            v = k if self.v is None else self.v(x).view(n, nkv, hd)
            if self.cfg.qk_norm:
                k = self.k_norm(k)
            if self.v_norm is not None:  # Gemma 4: values RMS-normed per head, no scale, no RoPE
                v = self.v_norm(v)
            k = tokens.unpack(apply_rope(k, cos, sin)).transpose(1, 2)  # (b, nkv, t, hd)
            v = tokens.unpack(v).transpose(1, 2)
            shared_k = shared_v = None
            if cache is not None:
                k, v = cache.append(layer, k, v)  # (b, nkv, s, hd): earlier keys followed by these
                if cache.shared is not None:  # a prefix every row starts with, kept once: (1, nkv, P, hd)
                    shared_k, shared_v = cache.shared.k[layer], cache.shared.v[layer]
            if self.passes_kv:
                shared_kv[self.layer_type] = (k, v, shared_k, shared_v, layer)
        if q.shape[0] == 0:  # nothing queries (a prefix whose keys and values are all that is needed)
            return x.new_zeros(0, x.shape[1])
        prescaled = self.prescale and not isinstance(mask, FlexMask)
        if prescaled:
            q = q.mul_(self.scaling)
        q = queries.unpack(q).transpose(1, 2)  # (b, nh, t, hd)
        if isinstance(mask, FlexMask):
            if shared_k is not None:  # FlexAttention takes one key tensor per row: copy the prefix in
                k, v = cache.full(kv_layer)
            out = flex_attention(q, k, v, mask, self.scaling, self.cfg.attn_logit_softcap)
            return self.o(queries.pack(out.transpose(1, 2).reshape(b, t, nh * hd)))
        out = block_attention(q, k, v, shared_k, shared_v, mask, self.scaling, self.cfg.attn_logit_softcap, prescaled)
        return self.o(queries.pack(out.view(b, t, nh * hd)))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig, width: int):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x):
        # GeGLU with the tanh GELU ("gelu_pytorch_tanh" = F.gelu(approximate="tanh"), not a hand formula).
        # The product in place, into the GELU's output: one large intermediate fewer per layer.
        return self.down(F.gelu(self.gate(x), approximate="tanh").mul_(self.up(x)))


class MoE(nn.Module):
    """Routed experts (Gemma 4 26B-A4B; HF Gemma4TextRouter and Gemma4TextExperts): the router reads
    the un-normed residual, softmax over all experts in fp32, top-k, weights renormalised to sum 1
    and scaled per expert; each expert is a GeGLU (gate rows first in gate_up). The experts run as
    batched products, never a Python loop per token."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        e, hidden, width = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k = cfg.top_k_experts
        self.router_norm = norm(cfg, hidden, scaled=False)
        self.router = nn.Linear(hidden, e, bias=False)
        self.router_scale = nn.Parameter(torch.ones(hidden))
        self.expert_scale = nn.Parameter(torch.ones(e))
        self.gate_up = nn.Parameter(torch.empty(e, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(e, hidden, width))

    def route(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each (n, top_k), in top-k order."""
        z = self.router_norm(residual) * self.router_scale * residual.shape[-1] ** -0.5
        probs = torch.softmax(self.router(z), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.expert_scale[experts], experts

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(residual)
        n, k = experts.shape
        if n * k <= self.gate_up.shape[0]:
            # Few tokens (decoding): gather each (token, expert) pair's weights, one batched product.
            pairs = experts.flatten()
            gate, up = torch.bmm(self.gate_up[pairs], x.repeat_interleave(k, 0)[:, :, None]).chunk(2, 1)
            out = torch.bmm(self.down[pairs], F.gelu(gate, approximate="tanh").mul_(up)).view(n, k, x.shape[-1])
        else:
            # Many tokens: one product per expert that has tokens, over its (slot, token) pairs in
            # the order transformers takes them (slot-major), so that each product rounds the same.
            pairs = experts.t().flatten()  # pair j: slot j // n of token j % n
            order = torch.argsort(pairs, stable=True)
            counts = torch.bincount(pairs, minlength=self.gate_up.shape[0]).tolist()
            rows = x[order % n]
            done = x.new_empty(n * k, x.shape[-1])
            start = 0
            for e, c in enumerate(counts):
                if c:
                    gate, up = F.linear(rows[start:start + c], self.gate_up[e]).chunk(2, -1)
                    done[start:start + c] = F.linear(F.gelu(gate, approximate="tanh").mul_(up), self.down[e])
                    start += c
            out = torch.empty_like(done).index_copy_(0, order, done).view(k, n, x.shape[-1]).transpose(0, 1)
        out = (out * weights[:, :, None]).to(x.dtype)
        # Summed from zero in ascending expert order, as transformers' index_add_ over the experts.
        out = out.gather(1, experts.argsort(-1)[:, :, None].expand(-1, -1, out.shape[-1]))
        total = out[:, 0]
        for j in range(1, k):
            total = total + out[:, j]
        return total


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str, layer: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.attn_norm = norm(cfg, hidden)
        self.attn = Attention(cfg, layer_type, layer)
        self.pre_ffn_norm = norm(cfg, hidden)
        self.mlp = MLP(cfg, cfg.mlp_size(layer))
        if cfg.post_norms:  # Gemma 2/3/4 normalise each branch output before the residual add
            self.post_attn_norm = norm(cfg, hidden)
            self.post_ffn_norm = norm(cfg, hidden)
        if cfg.num_experts:  # Gemma 4 MoE: the dense MLP and the experts, each with its own norms, summed
            self.moe = MoE(cfg)
            self.pre_moe_norm, self.post_mlp_norm, self.post_moe_norm = (norm(cfg, hidden) for _ in range(3))
        if cfg.ple_size:  # Gemma 4 per-layer embeddings: gated in after the MLP
            self.ple_gate = nn.Linear(hidden, cfg.ple_size, bias=False)
            self.ple_proj = nn.Linear(cfg.ple_size, hidden, bias=False)
            self.post_ple_norm = norm(cfg, hidden)
        if cfg.gemma4:  # multiplies the whole hidden state at the end of the layer (HF layer_scalar)
            self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, h, cos, sin, mask, cache, layer, tokens: Tokens, keep: torch.Tensor | None = None,
                shared_kv: dict | None = None, ple: torch.Tensor | None = None):
        """ple: this layer's per-layer inputs (n, ple_size), for the tokens of h (or of keep)."""
        x = self.attn(self.attn_norm(h), cos, sin, mask, cache, layer, tokens, keep, shared_kv)
        if keep is not None:  # the rest of the block only for the tokens whose output is needed
            h = h[keep]
        if self.cfg.post_norms:
            x = self.post_attn_norm(x)
        h = h + x
        x = self.mlp(self.pre_ffn_norm(h))
        if self.cfg.num_experts:
            x = self.post_mlp_norm(x) + self.post_moe_norm(self.moe(self.pre_moe_norm(h), h))
        if self.cfg.post_norms:
            x = self.post_ffn_norm(x)
        h = h + x
        if self.cfg.ple_size:
            h = h + self.post_ple_norm(self.ple_proj(F.gelu(self.ple_gate(h), approximate="tanh").mul_(ple)))
        if self.cfg.gemma4:
            h = h * self.layer_scalar
        return h


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t, i) for i, t in enumerate(cfg.layer_types))
        self.final_norm = norm(cfg, cfg.hidden_size)
        if cfg.ple_size:  # Gemma 4 E2B/E4B: row t holds layer 0's ple_size values, then layer 1's, ...
            self.ple_embed = nn.Embedding(cfg.vocab_size, cfg.num_layers * cfg.ple_size)
            self.ple_proj = nn.Linear(cfg.hidden_size, cfg.num_layers * cfg.ple_size, bias=False)
            self.ple_norm = norm(cfg, cfg.ple_size)
        inv_global, inv_local = rope_frequencies(cfg)
        self.register_buffer("inv_freq_global", inv_global, persistent=False)
        self.register_buffer("inv_freq_local", inv_local, persistent=False)
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
        return KVCache(self.cfg.kv_layers)  # KV-sharing layers keep nothing of their own

    def _rope(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        # fp32 angles, cast to the activation dtype at the end (HF Gemma3RotaryEmbedding.forward).
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (n, 1, hd) for n positions

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        # sqrt(hidden) as an fp32 tensor cast to the weight dtype (HF Gemma3TextScaledWordEmbedding):
        # in bf16 the constant itself is rounded, e.g. 59.87 -> 59.75 for Gemma 2 9B.
        return self.embed(ids) * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=torch.float32).to(self.dtype)

    def _per_layer_inputs(self, ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Gemma 4 PLE (HF get_per_layer_inputs, project_per_layer_inputs): (n, layers, ple_size) from
        the token's row of the table (x sqrt(ple_size)) and a normed projection of its embedding x0."""
        n, L, P = ids.shape[0], self.cfg.num_layers, self.cfg.ple_size
        token = self.ple_embed(ids) * torch.tensor(math.sqrt(P), dtype=torch.float32).to(self.dtype)
        context = self.ple_norm((self.ple_proj(x0) * self.cfg.hidden_size ** -0.5).view(n, L, P))
        return (context + token.view(n, L, P)) * 2.0 ** -0.5

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
        ids = tokens.pack(input_ids)
        h = self._embed(ids)  # (n, hidden): real tokens only, see Tokens
        ple = self._per_layer_inputs(ids, h) if self.cfg.ple_size else None
        # From layer `first_kept` on, only the `needed` tokens go on: the last layer's other outputs
        # are never read, and KV-sharing layers (Gemma 4) make no keys that later tokens could need.
        last = len(self.layers) - 1
        first_kept = min(self.cfg.kv_layers, last)
        masks, kept_masks = plan_masks(self.cfg, self.attention, positions, valid, k_pos, k_valid, attend, needed,
                                       h.dtype, set(self.cfg.layer_types[first_kept:]))
        rope = self._ropes(tokens.pack(positions), h.dtype)
        keep, out = None, tokens
        if needed is not None:
            keep = tokens.pack(needed).nonzero().squeeze(1)
            out = tokens.subset(keep)
        # Whether the embeddings and each layer's output are finite, kept on the device (no sync): read
        # only when the logits turn out non-finite, to say where NaN/inf first appeared.
        finite = [all_finite(h)]
        shared_kv: dict = {}
        for i, (block, kind) in enumerate(zip(self.layers, self.cfg.layer_types)):
            cos, sin = rope[kind]
            layer_ple = None if ple is None else ple[:, i]
            if keep is None or i < first_kept:
                h = block(h, cos, sin, masks[kind], cache, i, tokens, shared_kv=shared_kv, ple=layer_ple)
            elif i == first_kept:  # these tokens' keys are made (if the layer makes any), their queries kept
                h = block(h, cos, sin, kept_masks[kind], cache, i, tokens, keep, shared_kv,
                          None if ple is None else layer_ple[keep])
            else:  # a KV-sharing layer on the kept tokens only
                h = block(h, cos[keep], sin[keep], kept_masks[kind], cache, i, out, shared_kv=shared_kv,
                          ple=None if ple is None else layer_ple[keep])
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
        ple = self._per_layer_inputs(ids, h) if self.cfg.ple_size else None
        allowed = visible(self.cfg, positions[:, None], cache.positions, cache.valid[:, None, :])
        masks = {kind: AttentionMask.whole(a, h.dtype) for kind, a in allowed.items()}
        rope = self._ropes(positions, h.dtype)
        tokens = Tokens.dense(b, 1, ids.device)
        finite = [all_finite(h)]
        shared_kv: dict = {}
        for i, (block, kind) in enumerate(zip(self.layers, self.cfg.layer_types)):
            h = block(h, *rope[kind], masks[kind], cache, i, tokens, shared_kv=shared_kv,
                      ple=None if ple is None else ple[:, i])
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
