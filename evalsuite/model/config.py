"""Gemma 1 / 2 / 3 (text) architecture: one dataclass, named presets, readers for config.json and GGUF.

Every preset value is taken from the published Hugging Face `config.json` of the matching
`google/<name>` checkpoint (text part for Gemma 3 4B+), cross-checked with google/gemma_pytorch
`gemma/config.py`. Fields that a file format does not store are derived the way the reference
implementations derive them, with the rule named next to it.
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
    family: str  # "gemma1" | "gemma2" | "gemma3": decides post-norms, qk-norm and the layer pattern
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

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a positive sliding_window")

    @property
    def post_norms(self) -> bool:
        """Gemma 2 and 3 normalise the output of attention and MLP before the residual add."""
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 RMS-normalises q and k per head before RoPE (replacing Gemma 2's soft-cap)."""
        return self.family == "gemma3"

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
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------- Hugging Face config.json

_HF_FAMILIES = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope_settings(d: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """RoPE bases and scaling, and the chat turn ids, of a Gemma 2 or 3 config.json.

    transformers <5 writes rope_theta / rope_local_base_freq / rope_scaling, transformers 5 writes
    rope_parameters keyed by layer type (Gemma 3) or flat (Gemma 2)."""
    rp = d.get("rope_parameters") or {}
    if family == "gemma2":
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        return dict(rope_theta=theta, rope_local_theta=theta, start_of_turn_id=106, end_of_turn_id=107)
    full, local = rp.get("full_attention", {}), rp.get("sliding_attention", {})
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
    if d.get("model_type") == "gemma3" and "text_config" in d:  # multimodal wrapper: take the text part
        d = {"model_type": "gemma3_text", **d["text_config"]}
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
    return GemmaConfig(**kw)


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
    d["rope_parameters"] = {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    return {**d, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


__all__ = ["GemmaConfig", "ConfigError", "PRESETS", "preset", "from_hf_dict", "from_hf_json",
           "from_gguf_metadata", "to_hf_dict", "SLIDING", "GLOBAL"]
