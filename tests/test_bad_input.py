"""Bad checkpoints and references give errors that name the file, the tensor or the option."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from evalsuite.model import ConfigError, WeightsError, load_model
from evalsuite.model.weights import load_gguf, load_hf_folder, resolve_source
from helpers import random_hf_model, tiny_config, write_gguf, write_hf_checkpoint


@pytest.fixture
def folder(tmp_path):
    write_hf_checkpoint(tiny_config("gemma2"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_truncated_safetensors(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: truncated"):
        load_hf_folder(folder)


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_hf_folder(folder)


def test_unused_missing_and_misshaped_tensors(folder):
    f = folder / "model.safetensors"
    sd = load_file(f)
    save_file({**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(WeightsError, match=r"model.safetensors: unused tensor 'model.layers.9.mlp.up_proj.weight'"):
        load_hf_folder(folder)
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"}, f)
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) model.layers.1.self_attn.k_proj.weight"):
        load_hf_folder(folder)
    save_file({**sd, "model.norm.weight": torch.zeros(3)}, f)
    with pytest.raises(WeightsError, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        load_hf_folder(folder)


def test_untied_head_refused(folder):
    f = folder / "model.safetensors"
    sd = load_file(f)
    save_file({**sd, "lm_head.weight": torch.ones_like(sd["model.embed_tokens.weight"])}, f)
    with pytest.raises(WeightsError, match="lm_head.weight' differs from the token embedding"):
        load_hf_folder(folder)


def test_missing_config_field(folder):
    import json
    p = folder / "config.json"
    d = json.loads(p.read_text())
    del d["intermediate_size"]
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json: missing required field 'intermediate_size'"):
        load_hf_folder(folder)


def test_corrupt_and_truncated_gguf(tmp_path):
    cfg = tiny_config("gemma3")
    good = tmp_path / "good.gguf"
    write_gguf(random_hf_model(cfg), cfg, good)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"NOPE" + good.read_bytes()[4:])
    with pytest.raises(WeightsError, match="corrupt.gguf: not a readable GGUF file"):
        load_gguf(corrupt)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(WeightsError, match="cut.gguf"):
        load_gguf(cut)


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConfigError, match="llama.gguf: general.architecture='llama' is not supported"):
        load_gguf(p)


def test_gguf_quant_type_we_cannot_decode(tmp_path, monkeypatch):
    from evalsuite.model import weights
    cfg = tiny_config("gemma3")
    p = tmp_path / "q.gguf"
    write_gguf(random_hf_model(cfg), cfg, p, quant="Q8_0")
    # Which types are decodable is one list; take Q8_0 off it to see the message a user of, say, an
    # IQ2 file gets.
    monkeypatch.setattr(weights, "SUPPORTED_GGUF_TYPES", tuple(t for t in weights.SUPPORTED_GGUF_TYPES if t != "Q8_0"))
    with pytest.raises(WeightsError, match=r"q.gguf: tensor '.*' has type Q8_0, which is not supported \(supported: F32"):
        load_gguf(p)


def test_missing_path_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere" / "x.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"could not fetch 'google/gemma-2-9b' from the Hugging Face hub.*local folder"):
        resolve_source("google/gemma-2-9b")


def test_preset_mismatch_is_reported(folder):
    with pytest.raises(Exception, match="tokenizer"):
        load_model(str(folder), preset="gemma2_2b")  # this folder has no tokenizer at all
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(Exception, match="tokenizer.json"):
        load_model(str(folder), preset="gemma2_2b")


def test_bad_device_and_dtype():
    from evalsuite.model import resolve_device, resolve_dtype
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="float16 is not offered"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.warns(UserWarning, match="bfloat16 on CPU is much slower"):
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_unknown_attention_path_is_named():
    with pytest.raises(ValueError, match=r"attention='sdpa' is not supported; use one of blocks, flex"):
        load_model("gemma3_270m", attention="sdpa")
