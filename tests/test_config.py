"""Presets against the published configs, read through transformers' own config classes."""

from __future__ import annotations

import pytest

from evalsuite.model import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_preset_roundtrips_through_transformers_config(name):
    transformers = pytest.importorskip("transformers")
    cfg = C.PRESETS[name]
    hf = transformers.AutoConfig.for_model(**C.to_hf_dict(cfg))  # strict type validation there
    assert C.from_hf_dict(hf.to_dict()) == cfg


def test_published_values_that_others_got_wrong():
    p = C.PRESETS
    for name in ("gemma2_2b", "gemma2_9b", "gemma2_27b"):
        assert (p[name].attn_logit_softcap, p[name].final_logit_softcap) == (50.0, 30.0)  # not swapped
        assert p[name].layer_types[:2] == (C.SLIDING, C.GLOBAL) and p[name].sliding_window == 4096
    assert p["gemma2_9b"].query_pre_attn_scalar == 256  # not 224 (transformers #31891)
    assert p["gemma2_27b"].query_pre_attn_scalar == 144 and p["gemma2_27b"].head_dim == 128
    assert p["gemma3_27b"].query_pre_attn_scalar == 168
    for name in ("gemma3_270m", "gemma3_1b", "gemma3_4b"):
        assert p[name].attn_logit_softcap is None and p[name].final_logit_softcap is None
        assert [i for i, t in enumerate(p[name].layer_types) if t == C.GLOBAL][:3] == [5, 11, 17]
    assert p["gemma3_4b"].rope_scaling_factor == 8.0 and p["gemma3_1b"].rope_scaling_factor == 1.0
    assert all(not p[n].post_norms and p[n].sliding_window is None for n in ("gemma1_2b", "gemma1_7b"))


def test_transformers_defaults_agree_with_gemma2_2b():
    transformers = pytest.importorskip("transformers")
    d = transformers.Gemma2Config()  # its defaults are the published 2B values
    p = C.PRESETS["gemma2_2b"]
    assert (d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads,
            d.num_key_value_heads, d.head_dim, d.query_pre_attn_scalar, d.attn_logit_softcapping,
            d.final_logit_softcapping, d.sliding_window) == (
        p.hidden_size, p.intermediate_size, p.num_layers, p.num_heads, p.num_kv_heads, p.head_dim,
        p.query_pre_attn_scalar, p.attn_logit_softcap, p.final_logit_softcap, p.sliding_window)


def test_old_style_hf_config_keys():
    """transformers 4.x configs: rope_theta / rope_local_base_freq / rope_scaling, sliding_window_pattern."""
    d = dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
             num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
             query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0,
             rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
             max_position_embeddings=131072, final_logit_softcapping=None, attn_logit_softcapping=None)
    assert C.from_hf_dict(d) == C.PRESETS["gemma3_4b"]
    wrapped = {"model_type": "gemma3", "text_config": {k: v for k, v in d.items() if k != "model_type"}}
    assert C.from_hf_dict(wrapped) == C.PRESETS["gemma3_4b"]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(C.ConfigError, match="gemma2_9b") as e:
        C.preset("gemma2_9")
    assert "gemma3_270m" in str(e.value)


def test_missing_field_names_field_and_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,'
                 ' "intermediate_size": 16, "query_pre_attn_scalar": 4, "sliding_window": 4}')
    with pytest.raises(C.ConfigError, match=r"config.json: missing required field 'num_hidden_layers'"):
        C.from_hf_json(p)
    p.write_text('{"model_type": "llama"}')
    with pytest.raises(C.ConfigError, match="not a Gemma text model"):
        C.from_hf_json(p)
