"""Tiny random Gemma checkpoints written in the Hugging Face and GGUF formats, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from evalsuite.model import config as C


# Gemma 4 variants, one per group of features (a tiny_config "family"): K=V global layers with their
# own KV heads; per-layer embeddings with KV sharing and the double-wide MLP (global layers with a
# v_proj); routed experts. All have global heads wider than sliding ones and proportional RoPE.
GEMMA4_VARIANTS = {
    "gemma4": dict(attention_k_eq_v=True, num_global_kv_heads=1),
    "gemma4_ple": dict(ple_size=8, num_kv_shared_layers=2, double_wide_mlp=True),
    "gemma4_moe": dict(attention_k_eq_v=True, num_global_kv_heads=1, num_experts=5, top_k_experts=2,
                       moe_intermediate_size=12),
}


def _gemma4_layer_types(n: int) -> tuple[str, ...]:
    return C.gemma3_layer_types(n, 3)[:-1] + (C.GLOBAL,)  # the last layer is global (HF forces it)


def tiny_config(family: str, **overrides) -> C.GemmaConfig:
    """A small config with awkward settings: head_dim != hidden/heads, query_pre_attn_scalar != head_dim,
    grouped KV heads, a sliding window far shorter than the test sequences."""
    kw = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2,
              head_dim=24, query_pre_attn_scalar=20, rms_norm_eps=1e-6, max_position_embeddings=512)
    if family in GEMMA4_VARIANTS:
        kw.update(num_layers=6, layer_types=_gemma4_layer_types(6), sliding_window=7, query_pre_attn_scalar=1.0,
                  global_head_dim=32, rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_partial_factor=0.25,
                  final_logit_softcap=30.0, start_of_turn_id=105, end_of_turn_id=106, **GEMMA4_VARIANTS[family])
        kw.update(overrides)
        if "num_layers" in overrides and "layer_types" not in overrides:
            kw["layer_types"] = _gemma4_layer_types(overrides["num_layers"])
        return C.GemmaConfig(family="gemma4", **kw)
    if family == "gemma1":
        kw.update(query_pre_attn_scalar=24, layer_types=(C.GLOBAL,) * 4, sliding_window=None,
                  rope_theta=10000.0, rope_local_theta=10000.0)
    elif family == "gemma2":
        kw.update(layer_types=C.gemma2_layer_types(4), sliding_window=7, rope_theta=10000.0,
                  rope_local_theta=10000.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                  start_of_turn_id=106, end_of_turn_id=107)
    else:
        kw.update(layer_types=C.gemma3_layer_types(4, 3), sliding_window=7, rope_theta=1_000_000.0,
                  rope_local_theta=10_000.0, rope_scaling_factor=8.0, start_of_turn_id=105, end_of_turn_id=106)
    kw.update(overrides)
    if "num_layers" in overrides and "layer_types" not in overrides:
        n = overrides["num_layers"]
        kw["layer_types"] = {"gemma1": (C.GLOBAL,) * n, "gemma2": C.gemma2_layer_types(n),
                             "gemma3": C.gemma3_layer_types(n, 3)}[family]
    return C.GemmaConfig(family=family, **kw)


def random_hf_model(cfg: C.GemmaConfig, seed: int = 0):
    """A transformers Gemma*ForCausalLM (eager attention, fp32) with random weights, norms included."""
    import transformers
    hf_cfg = transformers.AutoConfig.for_model(**C.to_hf_dict(cfg))
    torch.manual_seed(seed)
    # Gemma 4's experts as transformers' plain loop ("eager"; its default, grouped_mm, rounds
    # differently): the reference our per-expert products follow bit for bit.
    extra = {"experts_implementation": "eager"} if cfg.num_experts else {}
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32,
                                                          **extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights non-zero so a missing or doubled "+1" cannot hide; larger q/k weights so
            # Gemma 2's attention soft-cap actually bends scores. Gemma 4's router scales too: HF
            # initialises them (and norms) to ones, which would hide a missing scale.
            scale = 0.3 if "norm" in name else (0.25 if ("q_proj" in name or "k_proj" in name) else 0.08)
            if cfg.gemma4 and "norm" in name and "q_norm" not in name and "k_norm" not in name:
                # Gemma 4 norms scale by w itself: around 1 keeps activations in range. q and k
                # stay small: without attention scaling, unit scales make the softmax so peaked
                # that rounding moves logits by 1e-4 (transformers' own cached decoding too).
                scale = 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if "router.scale" in name or "per_expert_scale" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # a buffer, initialised to 1 (a missing scalar would hide)
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model.eval()


def write_hf_checkpoint(cfg: C.GemmaConfig, folder: Path, seed: int = 0, tokenizer_json: Path | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    model = random_hf_model(cfg, seed)
    model.save_pretrained(folder)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return model


def write_gguf(hf_model, cfg: C.GemmaConfig, path: Path, quant: str = "F32") -> dict[str, torch.Tensor]:
    """Write `hf_model` as a GGUF (llama.cpp Gemma conventions: norms + 1, q/k not permuted).

    Returns the HF state dict the GGUF decodes to (quantized weights dequantized, norms - 1), so a
    transformers twin loaded with it is the reference for the GGUF path.
    """
    import gguf
    arch = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}[cfg.family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.family == "gemma3":
        w.add_rope_freq_base(cfg.rope_theta)
    if cfg.attn_logit_softcap:
        w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
    if cfg.final_logit_softcap:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
    # A byte-level vocabulary so the tokenizer keys exist (the tests feed token ids directly).
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(cfg.vocab_size - 4)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [6] * (len(tokens) - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_space_prefix(False)  # as Gemma's GGUFs say; llama.cpp would otherwise prepend a space

    from evalsuite.model.weights import gguf_names, hf_names
    ours_to_hf, ours_to_gguf = hf_names(cfg), gguf_names(cfg)
    sd = hf_model.state_dict()
    decoded: dict[str, torch.Tensor] = {}
    for ours, hf_name in ours_to_hf.items():
        t = sd[hf_name].float().numpy()
        name = ours_to_gguf[ours]
        if ours.endswith("norm.weight"):
            arr = (t + np.float32(1.0)).astype(np.float32)  # llama.cpp adds 1 in fp32
            w.add_tensor(name, arr)
            decoded[hf_name] = torch.from_numpy(arr - np.float32(1.0))
        elif quant == "F32":
            w.add_tensor(name, t)
            decoded[hf_name] = torch.from_numpy(t.copy())
        else:
            qtype = gguf.GGMLQuantizationType[quant]
            q = gguf.quantize(t, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            decoded[hf_name] = torch.from_numpy(gguf.dequantize(q, qtype).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if "lm_head.weight" in sd:
        decoded["lm_head.weight"] = decoded["model.embed_tokens.weight"]
    return decoded


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def cache_rows(cache_dir) -> dict[str, int]:
    """Rows in each rank's result-cache file (0 for a file whose table is not created yet)."""
    import sqlite3
    out = {}
    for f in sorted(Path(cache_dir).glob("rank*.sqlite")):
        try:
            with sqlite3.connect(f) as db:
                out[f.stem] = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:
            out[f.stem] = 0
    return out


def settings(**kw):
    """Run settings for evaluate.run in tests: the result cache off and no progress bars unless given;
    `execution` may be a dict and `sampling` names the generation settings."""
    from evalsuite.settings import ExecutionSettings, Settings
    if isinstance(kw.get("execution"), dict):
        kw["execution"] = ExecutionSettings(**kw["execution"])
    if "sampling" in kw:
        kw["generation"] = kw.pop("sampling")
    return Settings(**{"cache": "off", "progress": False, **kw})
