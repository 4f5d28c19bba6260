"""Gemma 1 / 2 / 3 / 4 (text) architecture: one dataclass, named presets, readers for config.json and GGUF.

Every Gemma 1-3 preset value is taken from the published Hugging Face `config.json` of the matching
`google/<name>` checkpoint (text part for Gemma 3 4B+), cross-checked with google/gemma_pytorch
`gemma/config.py`. Gemma 4 values come from transformers' Gemma 4 weight converter
(`convert_gemma4_weights.py`, table `_VARIANTS`: the text config of every released size), which
google-deepmind/gemma `gm/nn/gemma4/_gemma4.py` gives independently. Fields that a file format does
not store are derived the way the reference implementations derive them, with the rule named next
to it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLIDING = "sliding"
GLOBAL = "global"


class ConfigError(ValueError):
    """A config file or preset is missing a field or holds a value we cannot use."""


@dataclass(frozen=True)
class GemmaConfig:
    family: str  # "gemma1" | "gemma2" | "gemma3" | "gemma4": decides norms, qk-norm, v-norm, layer scalars
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # not always hidden/heads: Gemma 2 9B has 3584/16 = 224 but head_dim 256
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (HF Gemma2/3Attention.scaling).
    query_pre_attn_scalar: float
    # One entry per layer, SLIDING or GLOBAL. Gemma 1 has no sliding layers.
    layer_types: tuple[str, ...]
    sliding_window: int | None  # query i sees key j iff 0 <= i - j < sliding_window (HF masking_utils)
    rope_theta: float  # base of the global layers (all layers for Gemma 1/2)
    rope_local_theta: float  # base of the sliding layers (Gemma 3: 10k; Gemma 2: same as global)
    rope_scaling_factor: float = 1.0  # linear position scaling, global layers only (Gemma 3 4B+)
    attn_logit_softcap: float | None = None  # Gemma 2: 50.0
    final_logit_softcap: float | None = None  # Gemma 2: 30.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    # Turn markers of the chat format (ids differ between the Gemma 2 and Gemma 3 vocabularies).
    start_of_turn_id: int | None = None
    end_of_turn_id: int | None = None
    # ---- Gemma 4 (HF Gemma4TextConfig); the defaults leave Gemma 1-3 as they were.
    # Global layers' heads: 512 wide on Gemma 4 (`global_head_dim`), and on the K=V sizes their own
    # KV head count (`num_global_key_value_heads`, applied only with attention_k_eq_v, as HF does).
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False  # global layers have no v_proj: V = v_norm(k_proj(x))
    # Proportional RoPE on global layers: the first `rope_partial_factor * hd / 2` frequencies are
    # theta^(-2k/hd) over the whole head, the rest 0 (HF _compute_proportional_rope_parameters).
    rope_partial_factor: float = 1.0
    # The last num_kv_shared_layers layers compute no keys or values: each reads those of the last
    # earlier layer of its own type (HF Gemma4TextConfig.kv_sharing_modes).
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False  # KV-shared layers' MLP is twice intermediate_size (E2B)
    # Per-layer embeddings (E2B/E4B): a (vocab, layers * ple_size) table plus a projection of the
    # embeddings, one ple_size vector per layer added after its MLP; 0 = none.
    ple_size: int = 0
    # Mixture of experts (26B-A4B): every layer's dense MLP plus top_k of num_experts routed ones.
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a positive sliding_window")
        if self.num_kv_shared_layers:
            first = self.num_layers - self.num_kv_shared_layers
            if not 0 < first <= self.num_layers or set(self.layer_types[:first]) != set(self.layer_types):
                raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers}: every layer type must have a "
                                  f"layer before layer {first} to share keys and values from")
        if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k_experts} must be in 1..num_experts={self.num_experts}")

    @property
    def post_norms(self) -> bool:
        """Gemma 2, 3 and 4 normalise the output of attention and MLP before the residual add."""
        return self.family in ("gemma2", "gemma3", "gemma4")

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 and 4 RMS-normalise q and k per head before RoPE (replacing Gemma 2's soft-cap)."""
        return self.family in ("gemma3", "gemma4")

    @property
    def gemma4(self) -> bool:
        """Gemma 4: norms scale by w (not 1 + w) with pow(-0.5), v is RMS-normed without a weight,
        and every layer ends by multiplying the hidden state by a learned scalar."""
        return self.family == "gemma4"

    def layer_head_dim(self, kind: str) -> int:
        return (self.global_head_dim or self.head_dim) if kind == GLOBAL else self.head_dim

    def layer_kv_heads(self, kind: str) -> int:
        return (self.num_global_kv_heads or self.num_kv_heads) if kind == GLOBAL else self.num_kv_heads

    @property
    def kv_layers(self) -> int:
        """Layers that compute keys and values (the first ones; the rest share theirs)."""
        return self.num_layers - self.num_kv_shared_layers

    def shares_kv(self, layer: int) -> bool:
        """Whether `layer` computes no keys or values of its own (see kv_source)."""
        return layer >= self.kv_layers

    def kv_tied(self, kind: str) -> bool:
        """K=V layers (Gemma 4 26B/31B global layers): no v_proj, the values come from k_proj."""
        return self.attention_k_eq_v and kind == GLOBAL

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends to: itself, or for a KV-shared layer the
        last layer of its type before the shared ones (E2B: 13 for sliding, 14 for global)."""
        if not self.shares_kv(layer):
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.kv_layers) if self.layer_types[i] == kind)

    def mlp_size(self, layer: int) -> int:
        return self.intermediate_size * (2 if self.double_wide_mlp and self.shares_kv(layer) else 1)

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)


def gemma2_layer_types(n: int) -> tuple[str, ...]:
    # Layer i slides iff i is even (HF Gemma2Config: (i + 1) % 2; llama.cpp swa pattern 2).
    return tuple(SLIDING if (i + 1) % 2 else GLOBAL for i in range(n))


def gemma3_layer_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    # Five sliding layers then one global (HF Gemma3TextConfig: (i + 1) % sliding_window_pattern).
    return tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(n))


def _gemma1(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    return GemmaConfig(
        family="gemma1", vocab_size=256000, head_dim=256, query_pre_attn_scalar=256,
        layer_types=(GLOBAL,) * n, sliding_window=None, rope_theta=10000.0, rope_local_theta=10000.0,
        start_of_turn_id=106, end_of_turn_id=107, **kw,
    )


def _gemma2(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256)
    return GemmaConfig(
        family="gemma2", vocab_size=256000, layer_types=gemma2_layer_types(n), sliding_window=4096,
        rope_theta=10000.0, rope_local_theta=10000.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        start_of_turn_id=106, end_of_turn_id=107, **kw,
    )


def _gemma3(**kw) -> GemmaConfig:
    n = kw["num_layers"]
    kw.setdefault("head_dim", 256)
    kw.setdefault("query_pre_attn_scalar", 256)
    kw.setdefault("vocab_size", 262208)  # 4B+ carry 64 extra rows for the image soft token
    kw.setdefault("sliding_window", 1024)
    kw.setdefault("max_position_embeddings", 131072)
    kw.setdefault("rope_scaling_factor", 8.0)
    return GemmaConfig(
        family="gemma3", layer_types=gemma3_layer_types(n), rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        start_of_turn_id=105, end_of_turn_id=106, **kw,
    )


def _gemma4(pattern: int = 6, **kw) -> GemmaConfig:
    # No attention scaling (HF Gemma4TextAttention.scaling = 1.0): q and k are RMS-normed per head.
    # Global layers: 512-wide heads, proportional RoPE over a quarter of them, theta 1e6.
    n = kw["num_layers"]
    kw.setdefault("sliding_window", 512)
    kw.setdefault("max_position_embeddings", 131072)
    return GemmaConfig(
        family="gemma4", vocab_size=262144, head_dim=256, global_head_dim=512, query_pre_attn_scalar=1.0,
        layer_types=gemma3_layer_types(n, pattern), rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        rope_partial_factor=0.25, final_logit_softcap=30.0, start_of_turn_id=105, end_of_turn_id=106, **kw,
    )


# Sources: config.json of google/gemma-2b, gemma-7b, gemma-2-{2b,9b,27b}, gemma-3-{270m,1b}-pt and the
# text_config of gemma-3-{4b,12b,27b}-pt. 9B's query_pre_attn_scalar is 256, not 224 (transformers
# #31891, llama.cpp #8444); 27B uses hidden/heads (144 for Gemma 2, 168 for Gemma 3).
PRESETS: dict[str, GemmaConfig] = {
    "gemma1_2b": _gemma1(hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8, num_kv_heads=1),
    "gemma1_7b": _gemma1(hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16, num_kv_heads=16),
    "gemma2_2b": _gemma2(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4),
    "gemma2_9b": _gemma2(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8),
    "gemma2_27b": _gemma2(hidden_size=4608, intermediate_size=36864, num_layers=46, num_heads=32, num_kv_heads=16,
                          head_dim=128, query_pre_attn_scalar=144),
    "gemma3_270m": _gemma3(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                           num_kv_heads=1, sliding_window=512, max_position_embeddings=32768, rope_scaling_factor=1.0),
    "gemma3_1b": _gemma3(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                         num_kv_heads=1, sliding_window=512, max_position_embeddings=32768, rope_scaling_factor=1.0),
    "gemma3_4b": _gemma3(hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4),
    "gemma3_12b": _gemma3(hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16, num_kv_heads=8),
    "gemma3_27b": _gemma3(hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32, num_kv_heads=16,
                          head_dim=128, query_pre_attn_scalar=168),
    # Gemma 4 (transformers convert_gemma4_weights.py _VARIANTS). E2B is 4 sliding : 1 global.
    "gemma4_e2b": _gemma4(pattern=5, hidden_size=1536, intermediate_size=6144, num_layers=35, num_heads=8,
                          num_kv_heads=1, num_kv_shared_layers=20, double_wide_mlp=True, ple_size=256),
    "gemma4_e4b": _gemma4(hidden_size=2560, intermediate_size=10240, num_layers=42, num_heads=8, num_kv_heads=2,
                          num_kv_shared_layers=18, ple_size=256),
    "gemma4_26b_a4b": _gemma4(hidden_size=2816, intermediate_size=2112, num_layers=30, num_heads=16, num_kv_heads=8,
                              num_global_kv_heads=2, attention_k_eq_v=True, sliding_window=1024,
                              max_position_embeddings=262144, num_experts=128, top_k_experts=8,
                              moe_intermediate_size=704),
    "gemma4_31b": _gemma4(hidden_size=5376, intermediate_size=21504, num_layers=60, num_heads=32, num_kv_heads=16,
                          num_global_kv_heads=4, attention_k_eq_v=True, sliding_window=1024,
                          max_position_embeddings=262144),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------- Hugging Face config.json

_HF_FAMILIES = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
                "gemma4_text": "gemma4", "gemma4": "gemma4"}


def _rope_settings(d: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """RoPE bases and scaling, and the chat turn ids, of a Gemma 2 or 3 config.json.

    transformers <5 writes rope_theta / rope_local_base_freq / rope_scaling, transformers 5 writes
    rope_parameters keyed by layer type (Gemma 3) or flat (Gemma 2)."""
    rp = d.get("rope_parameters") or {}
    if family == "gemma2":
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        return dict(rope_theta=theta, rope_local_theta=theta, start_of_turn_id=106, end_of_turn_id=107)
    full, local = rp.get("full_attention", {}), rp.get("sliding_attention", {})
    if family == "gemma4":
        if full.get("rope_type", "default") not in ("default", "proportional") or full.get("factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: full_attention rope {full!r} is not supported "
                              "(default, or proportional without a factor)")
        return dict(rope_theta=float(full.get("rope_theta", 1_000_000.0)),
                    rope_local_theta=float(local.get("rope_theta", 10_000.0)),
                    rope_partial_factor=float(full.get("partial_rotary_factor", 1.0))
                    if full.get("rope_type") == "proportional" else 1.0,
                    start_of_turn_id=105, end_of_turn_id=106)
    scaling = d.get("rope_scaling") or full
    if scaling.get("rope_type", "default") not in ("default", "linear"):
        raise ConfigError(f"{source}: rope type {scaling.get('rope_type')!r} is not supported (default, linear)")
    return dict(
        rope_theta=float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
        rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
        rope_scaling_factor=float(scaling.get("factor", 1.0)) if scaling.get("rope_type") == "linear" else 1.0,
        start_of_turn_id=105, end_of_turn_id=106,
    )


def from_hf_dict(d: dict[str, Any], source: str = "config.json") -> GemmaConfig:
    """Build a config from a Hugging Face config.json dict (Gemma, Gemma2, Gemma3 text or multimodal)."""
    if d.get("model_type") in ("gemma3", "gemma4") and "text_config" in d:  # multimodal wrapper: the text part
        d = {**d["text_config"], "model_type": d["model_type"] + "_text"}
    model_type = d.get("model_type")
    if model_type not in _HF_FAMILIES:
        raise ConfigError(f"{source}: model_type={model_type!r} is not a Gemma text model "
                          f"(expected one of {sorted(_HF_FAMILIES)})")
    family = _HF_FAMILIES[model_type]

    def need(key):
        if key not in d:
            raise ConfigError(f"{source}: missing required field {key!r} for model_type={model_type!r}")
        return d[key]

    n = int(need("num_hidden_layers"))
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(d.get("head_dim") or hidden // heads)
    kw: dict[str, Any] = dict(
        family=family, vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")), num_layers=n, num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
        bos_token_id=int(d.get("bos_token_id", 2)), pad_token_id=int(d.get("pad_token_id", 0) or 0),
    )
    eos = d.get("eos_token_id", 1)
    kw["eos_token_id"] = int(eos[0] if isinstance(eos, list) else eos)
    if family == "gemma1":
        kw.update(query_pre_attn_scalar=head_dim, layer_types=(GLOBAL,) * n, sliding_window=None,
                  rope_theta=float(d.get("rope_theta", 10000.0)), start_of_turn_id=106, end_of_turn_id=107)
        kw["rope_local_theta"] = kw["rope_theta"]
        return GemmaConfig(**kw)

    if family != "gemma4":  # Gemma 4 has no attention scaling (1.0) and no such key
        kw["query_pre_attn_scalar"] = float(need("query_pre_attn_scalar"))
    kw["sliding_window"] = int(need("sliding_window"))
    kw["attn_logit_softcap"] = d.get("attn_logit_softcapping")
    kw["final_logit_softcap"] = d.get("final_logit_softcapping")
    types = d.get("layer_types")
    if types is not None:
        if len(types) != n:
            raise ConfigError(f"{source}: layer_types has {len(types)} entries but num_hidden_layers={n}")
        kw["layer_types"] = tuple(SLIDING if t == "sliding_attention" else GLOBAL for t in types)
    elif family == "gemma2":
        kw["layer_types"] = gemma2_layer_types(n)
    else:
        kw["layer_types"] = gemma3_layer_types(n, int(d.get("sliding_window_pattern", 6)))

    kw.update(_rope_settings(d, family, source))
    if family == "gemma4":
        kw["layer_types"] = kw["layer_types"][:-1] + (GLOBAL,)  # HF Gemma4TextConfig forces the last layer global
        kw.update(_gemma4_settings(d, kw, source))
    return GemmaConfig(**kw)


def _gemma4_settings(d: dict[str, Any], kw: dict[str, Any], source: str) -> dict[str, Any]:
    """The Gemma 4 fields of a gemma4_text config. Global layers' head width and KV heads are either
    top-level keys (global_head_dim, num_global_key_value_heads: hub files) or what transformers 5
    writes after reading those, per_layer_config {layer index: overrides}."""
    if d.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{source}: use_bidirectional_attention='all' is not a causal language model")
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    head_dim, kv_heads = d.get("global_head_dim", 512), d.get("num_global_key_value_heads") if k_eq_v else None
    overrides = [o for i, o in (d.get("per_layer_config") or {}).items() if kw["layer_types"][int(i)] == GLOBAL]
    if overrides:
        head_dim = overrides[0].get("head_dim", kw["head_dim"])
        kv_heads = overrides[0].get("num_key_value_heads")
        if any(o != overrides[0] for o in overrides):
            raise ConfigError(f"{source}: per_layer_config gives global layers different overrides")
    ple = int(d.get("hidden_size_per_layer_input", 256) or 0)
    if ple and int(d.get("vocab_size_per_layer_input", kw["vocab_size"])) != kw["vocab_size"]:
        raise ConfigError(f"{source}: vocab_size_per_layer_input={d['vocab_size_per_layer_input']} differs from "
                          f"vocab_size={kw['vocab_size']} (every released Gemma 4 has them equal)")
    moe = bool(d.get("enable_moe_block", False))
    return dict(
        query_pre_attn_scalar=1.0, global_head_dim=int(head_dim), num_global_kv_heads=kv_heads and int(kv_heads),
        attention_k_eq_v=k_eq_v, num_kv_shared_layers=int(d.get("num_kv_shared_layers", 0) or 0),
        double_wide_mlp=bool(d.get("use_double_wide_mlp", False)), ple_size=ple,
        num_experts=int(d["num_experts"]) if moe else 0, top_k_experts=int(d["top_k_experts"]) if moe else 0,
        moe_intermediate_size=int(d["moe_intermediate_size"]) if moe else 0,
    )


def from_hf_json(path: str | Path) -> GemmaConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (a Hugging Face checkpoint folder needs one)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(d, source=str(path))


# ---------------------------------------------------------------- GGUF metadata

def from_gguf_metadata(meta: dict[str, Any], source: str = "GGUF") -> GemmaConfig:
    """Build a config from GGUF key/values (as decoded by weights.read_gguf_metadata).

    GGUF does not store Gemma's local rope base, the sliding/global layer pattern, the attention
    scale or the embedding scale; llama.cpp hard-codes them (src/llama-model.cpp,
    llama_load_hparams for GEMMA2/GEMMA3) and so do we:
      * local rope base 10000 (rope_freq_base_train_swa);
      * sliding pattern 2 for Gemma 2, 6 for Gemma 3 (set_swa_pattern);
      * attention scale 1/sqrt(hidden/heads) for the 27B models (46 layers Gemma 2, 62 layers
        Gemma 3) and 1/sqrt(head_dim) for every other size;
      * Gemma 2 writes no rope.freq_base, so 10000.
    """
    arch = meta.get("general.architecture")
    if arch == "gemma4":
        # llama.cpp's Gemma 4 GGUFs store a merge-based BPE (tokenizer.ggml.model="gemma4") with a
        # pre-tokenizer of llama.cpp's own, which no real file here lets us check a rebuild against.
        raise ConfigError(f"{source}: Gemma 4 GGUF files are not supported (their tokenizer, "
                          "tokenizer.ggml.model='gemma4', cannot be rebuilt and checked faithfully here); "
                          "use the Hugging Face checkpoint folder (model.path=DIR or a hub id)")
    families = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3": "gemma3"}
    if arch not in families:
        raise ConfigError(f"{source}: general.architecture={arch!r} is not supported "
                          f"(expected one of {sorted(families)})")
    family = families[arch]

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ConfigError(f"{source}: missing GGUF metadata key {full!r}")
        return meta[full]

    n = int(need("block_count"))
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    is_27b = (family == "gemma2" and n == 46) or (family == "gemma3" and n == 62)
    tokens = meta.get("tokenizer.ggml.tokens")
    kw: dict[str, Any] = dict(
        family=family, vocab_size=len(tokens) if tokens is not None else int(need("vocab_size")),
        hidden_size=hidden, intermediate_size=int(need("feed_forward_length")), num_layers=n, num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)), head_dim=head_dim,
        query_pre_attn_scalar=float(hidden // heads if is_27b else head_dim),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 8192)),
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping"),
    )
    if family == "gemma1":
        kw.update(layer_types=(GLOBAL,) * n, sliding_window=None, rope_theta=10000.0, rope_local_theta=10000.0,
                  start_of_turn_id=106, end_of_turn_id=107)
    elif family == "gemma2":
        theta = float(meta.get("gemma2.rope.freq_base", 10000.0))
        kw.update(layer_types=gemma2_layer_types(n), sliding_window=int(need("attention.sliding_window")),
                  rope_theta=theta, rope_local_theta=theta, start_of_turn_id=106, end_of_turn_id=107)
    else:
        factor = 1.0
        if meta.get("gemma3.rope.scaling.type") == "linear":
            factor = float(meta["gemma3.rope.scaling.factor"])
        kw.update(layer_types=gemma3_layer_types(n), sliding_window=int(need("attention.sliding_window")),
                  rope_theta=float(meta.get("gemma3.rope.freq_base", 1_000_000.0)), rope_local_theta=10_000.0,
                  rope_scaling_factor=factor, start_of_turn_id=105, end_of_turn_id=106)
    return GemmaConfig(**kw)


def to_hf_dict(cfg: GemmaConfig) -> dict[str, Any]:
    """The config.json transformers needs to build the same network (used by tests and the hf backend)."""
    d: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    )
    if cfg.family == "gemma1":
        return {**d, "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "rope_theta": cfg.rope_theta}
    qpas = cfg.query_pre_attn_scalar
    d.update(query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas, sliding_window=cfg.sliding_window,
             attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
             layer_types=["sliding_attention" if t == SLIDING else "full_attention" for t in cfg.layer_types])
    if cfg.family == "gemma2":
        return {**d, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "rope_theta": cfg.rope_theta}
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rope_theta}
    if cfg.rope_partial_factor != 1.0:
        full = {"rope_type": "proportional", "partial_rotary_factor": cfg.rope_partial_factor,
                "rope_theta": cfg.rope_theta}
    d["rope_parameters"] = {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    if not cfg.gemma4:
        return {**d, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    del d["query_pre_attn_scalar"], d["attn_logit_softcapping"]
    d.update(global_head_dim=cfg.layer_head_dim(GLOBAL), num_global_key_value_heads=cfg.num_global_kv_heads,
             attention_k_eq_v=cfg.attention_k_eq_v, num_kv_shared_layers=cfg.num_kv_shared_layers,
             use_double_wide_mlp=cfg.double_wide_mlp, hidden_size_per_layer_input=cfg.ple_size,
             vocab_size_per_layer_input=cfg.vocab_size, enable_moe_block=cfg.num_experts > 0,
             num_experts=cfg.num_experts or None, top_k_experts=cfg.top_k_experts or None,
             moe_intermediate_size=cfg.moe_intermediate_size or None)
    return {**d, "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"]}


__all__ = ["GemmaConfig", "ConfigError", "PRESETS", "preset", "from_hf_dict", "from_hf_json",
           "from_gguf_metadata", "to_hf_dict", "SLIDING", "GLOBAL"]
