"""Gemma 4 beyond the shared parity tests (test_model_parity runs those on helpers.GEMMA4_VARIANTS):
bit-exact logits, the released sizes' shapes against transformers' own modules, the hub checkpoint
layout, the config.json forms, the two ways the experts run, the chat markers and system turn, a
tiny checkpoint end to end against the hf backend, golden logits, and the GGUF refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evalsuite.model import config as C
from evalsuite.model.gemma import Gemma, MoE
from evalsuite.model.weights import WeightsError, hf_names, load_hf_folder, unused_hf_names
from helpers import GEMMA4_VARIANTS, tiny_config, write_hf_checkpoint

SIZES = ["gemma4_e2b", "gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b"]
# Text-model parameters the model card gives (google/gemma-4-* README): 31B "30.7B", 26B-A4B "25.2B"
# total; E2B / E4B "2.3B" / "4.5B effective" (without the per-layer embedding table), which the card
# rounds loosely (the E4B config gives 4.64B), hence the tolerance.
CARD_BILLIONS = {"gemma4_31b": (30.7, 0.05), "gemma4_26b_a4b": (25.2, 0.05), "gemma4_e2b": (2.3, 0.05),
                 "gemma4_e4b": (4.5, 0.15)}


@pytest.mark.parametrize("variant", list(GEMMA4_VARIANTS))
def test_logits_equal_transformers_bit_for_bit(tmp_path, variant):
    """Same operations as transformers' eager path (its experts as the plain loop): the logits of a
    batch longer than the window are equal bit for bit; a right-padded batch against each sequence
    alone (other shapes, so other rounding) within 1e-5 in log-probs."""
    cfg = tiny_config(variant)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, cfg.vocab_size, (2, 40), generator=g)
    ids[:, 0] = 2
    lengths = [40, 23]
    valid = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)
        padded = ours(ids, valid=valid).log_softmax(-1)
        for i, n in enumerate(lengths):
            ref = hf(ids[i:i + 1, :n]).logits[0].log_softmax(-1)
            assert (padded[i, :n] - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", SIZES)
def test_presets_have_the_shapes_of_transformers_modules(name):
    """Every preset built on the meta device: each of our parameters has the shape of the checkpoint
    tensor it is loaded from, in transformers' Gemma4ForCausalLM built from the same config; the
    tensors transformers has and we do not load are exactly the unused ones (none: HF builds no
    k/v for KV-sharing layers) and its buffers."""
    import transformers
    cfg = C.preset(name)
    hf_cfg = transformers.AutoConfig.for_model(**C.to_hf_dict(cfg))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        ours = Gemma(cfg)
    theirs = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    names = hf_names(cfg)
    for ours_name, p in ours.named_parameters():
        assert theirs[names[ours_name]] == tuple(p.shape), ours_name
    extra = set(theirs) - set(names.values()) - {"lm_head.weight"}
    assert not extra, sorted(extra)[:5]
    assert C.from_hf_dict(hf_cfg.to_dict()) == cfg
    total = sum(p.numel() for p in ours.parameters())
    if cfg.ple_size:
        total -= ours.ple_embed.weight.numel()
    card, tolerance = CARD_BILLIONS[name]
    assert abs(total / 1e9 - card) < tolerance, total


def test_kv_sharing_reads_the_last_earlier_layer_of_each_type():
    """E2B (4:1, 20 shared of 35) reads layers 13 (sliding) and 14 (global); E4B 22 and 23."""
    for name, sliding, full in [("gemma4_e2b", 13, 14), ("gemma4_e4b", 22, 23)]:
        cfg = C.preset(name)
        sources = {cfg.kv_source(i) for i in range(cfg.kv_layers, cfg.num_layers)}
        assert sources == {sliding, full}
        assert cfg.layer_types[sliding] == C.SLIDING and cfg.layer_types[full] == C.GLOBAL
        assert all(cfg.layer_types[cfg.kv_source(i)] == cfg.layer_types[i] for i in range(cfg.num_layers))
    e2b = C.preset("gemma4_e2b")
    assert [i for i, t in enumerate(e2b.layer_types) if t == C.GLOBAL] == list(range(4, 35, 5))
    assert e2b.mlp_size(14) == 6144 and e2b.mlp_size(15) == 12288


def _hub_layout(folder, cfg):
    """The folder rewritten as a hub Gemma4ForConditionalGeneration checkpoint: text tensors under
    model.language_model., the config nested as text_config, a vision tensor, and the unused keys
    and values that hub checkpoints carry for KV-sharing layers."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    out = {"model.language_model." + k[len("model."):]: v for k, v in tensors.items()}
    out["model.vision_tower.patch_embedder.weight"] = torch.zeros(3, 4)
    for name in unused_hf_names(cfg):
        if not name.endswith("v_norm.weight"):
            out[name.replace("model.", "model.language_model.", 1)] = torch.randn(4, 4)
    save_file(out, folder / "model.safetensors")
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text,
                                                    "architectures": ["Gemma4ForConditionalGeneration"]}))
    return out


def test_hub_layout_loads_the_same_network_and_skips_only_unused_tensors(tmp_path):
    cfg = tiny_config("gemma4_ple")
    write_hf_checkpoint(cfg, tmp_path / "flat")
    flat, _ = load_hf_folder(tmp_path / "flat")
    write_hf_checkpoint(cfg, tmp_path / "hub")
    tensors = _hub_layout(tmp_path / "hub", cfg)
    hub, _ = load_hf_folder(tmp_path / "hub")
    ids = torch.randint(4, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(flat(ids), hub(ids))
    # Any other tensor the network has no use for is still an error.
    from safetensors.torch import save_file
    tensors["model.language_model.layers.0.self_attn.v_bias"] = torch.zeros(4)
    save_file(tensors, tmp_path / "hub" / "model.safetensors")
    with pytest.raises(WeightsError, match="unused tensor 'model.layers.0.self_attn.v_bias'"):
        load_hf_folder(tmp_path / "hub")


def test_config_json_forms_agree():
    """Hub files give the global layers' width and KV heads as top-level keys; transformers 5
    writes per_layer_config instead. Both read to the same config; a K=V-off config ignores
    num_global_key_value_heads, as transformers does."""
    cfg = tiny_config("gemma4")
    written = C.to_hf_dict(cfg)
    hub = {k: v for k, v in written.items()}
    per_layer = {k: v for k, v in written.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    per_layer["per_layer_config"] = {str(i): {"head_dim": 32, "num_key_value_heads": 1}
                                     for i, t in enumerate(cfg.layer_types) if t == C.GLOBAL}
    assert C.from_hf_dict(hub) == C.from_hf_dict(per_layer) == cfg
    off = C.from_hf_dict({**hub, "attention_k_eq_v": False})
    assert off.layer_kv_heads(C.GLOBAL) == cfg.num_kv_heads
    with pytest.raises(C.ConfigError, match="vocab_size_per_layer_input"):
        C.from_hf_dict({**C.to_hf_dict(tiny_config("gemma4_ple")), "vocab_size_per_layer_input": 50})


def test_experts_run_the_same_gathered_or_grouped():
    """Few tokens gather each (token, expert) pair's weights into one batched product; many tokens
    run one product per expert: the same outputs (and the same as a plain loop over tokens)."""
    cfg = tiny_config("gemma4_moe", num_experts=16, top_k_experts=4)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        x, residual = torch.randn(9, cfg.hidden_size), torch.randn(9, cfg.hidden_size)
        grouped = moe(x, residual)  # 9 x 4 pairs > 16 experts
        gathered = torch.cat([moe(x[i:i + 2], residual[i:i + 2]) for i in range(0, 9, 2)])  # 2 x 4 <= 16
        weights, experts = moe.route(residual)
        plain = torch.zeros_like(x)
        for t in range(9):
            for w, e in zip(weights[t], experts[t]):
                gate, up = (moe.gate_up[e] @ x[t]).chunk(2)
                plain[t] += w * (moe.down[e] @ (torch.nn.functional.gelu(gate, approximate="tanh") * up))
    assert (grouped - gathered).abs().max().item() <= 1e-6
    assert (grouped - plain).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- chat format, end to end

def _module(name: str, *args: str, cwd: Path) -> None:
    """python -m NAME ARGS from this checkout; it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", name, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def gemma4_tokenizer_json(gemma3_tokenizer_json, tmp_path_factory):
    """Gemma 3's real tokenizer.json with ids 105 and 106 renamed <|turn> and <turn|>: Gemma 4's
    ordinary pieces have Gemma 3's ids (spot-checked in ../shared GEMMA4_NOTES §9), its turn markers
    those names at those ids. Derived: no Gemma 4 tokenizer is reachable here."""
    d = json.loads(gemma3_tokenizer_json.read_text())
    names = {105: "<|turn>", 106: "<turn|>"}
    for t in d["added_tokens"]:
        t["content"] = names.get(t["id"], t["content"])
    d["model"]["vocab"] = {names.get(i, p): i for p, i in d["model"]["vocab"].items()}
    # Gemma 3's <image_soft_token> (id 262144) is past Gemma 4's 262144-piece vocabulary.
    d["added_tokens"] = [t for t in d["added_tokens"] if t["id"] < 262144]
    out = tmp_path_factory.mktemp("gemma4_tok") / "tokenizer.json"
    out.write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def tiny_gemma4_folder(gemma4_tokenizer_json, tmp_path_factory):
    """Every Gemma 4 feature at once (K=V global layers, per-layer embeddings, KV sharing, the
    double-wide MLP, experts) with the real-size vocabulary, window 7."""
    cfg = tiny_config("gemma4_ple", vocab_size=262144, hidden_size=32, intermediate_size=48, num_heads=2,
                      num_kv_heads=1, head_dim=16, global_head_dim=32, attention_k_eq_v=True, num_global_kv_heads=1,
                      num_experts=4, top_k_experts=2, moe_intermediate_size=16, max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp("tiny_gemma4")
    write_hf_checkpoint(cfg, folder, seed=5, tokenizer_json=gemma4_tokenizer_json)
    # What transformers reads the special tokens from (google/gemma-4-E2B-it's tokenizer_config.json
    # names these); our tokenizer takes the ids from config.json.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "padding_side": "left"}))
    return folder


def test_chat_markers_and_system_role(tiny_gemma4_folder, gemma3_tokenizer_json):
    """Gemma 4's markers are ids 105/106 (<|turn>, <turn|>) and its system instruction a first
    system turn; our id-inserted encoding equals the tokenizer's own reading of the text the
    server backend sends. Gemma 3 has no system role: the instruction opens the first user turn."""
    from tokenizers import Tokenizer as HFTokenizer

    from evalsuite.backends import OursBackend
    from evalsuite.model import load_model
    from evalsuite.requests import Chat
    from evalsuite.scoring import Encoder
    from evalsuite.server import chat_text
    chat = Chat((("What is 2+2?", "4"),), "And 3+3?", system="Answer with a number.")
    lm = load_model(str(tiny_gemma4_folder))
    assert (lm.config.start_of_turn_id, lm.config.end_of_turn_id) == (105, 106)
    assert [lm.tokenizer.piece(i) for i in (105, 106)] == ["<|turn>", "<turn|>"]
    pre, body = Encoder(OursBackend(lm)).context(chat)
    text = chat_text(chat, "gemma4")
    assert text.startswith("<|turn>system\nAnswer with a number.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n")
    reader = HFTokenizer.from_file(str(tiny_gemma4_folder / "tokenizer.json"))
    assert list(pre + body) == [2, *reader.encode(text, add_special_tokens=False).ids]
    opening = len(lm.tokenizer.encode("model\n"))  # the prompt ends <|turn> model\n
    assert pre[:2] == (2, 105) and body[-1 - opening] == 105
    folded = chat_text(chat, "gemma3")
    assert folded.startswith("<start_of_turn>user\nAnswer with a number.\n\nWhat is 2+2?<end_of_turn>\n")
    assert "system" not in folded
    no_role = OursBackend(lm)
    no_role.system_role = False
    plain = Chat((("Answer with a number.\n\nWhat is 2+2?", "4"),), "And 3+3?")
    assert Encoder(no_role).context(chat) == Encoder(no_role).context(plain)


def test_tiny_checkpoint_end_to_end_and_the_hf_backend_agrees(tiny_gemma4_folder, tmp_path):
    """`+tasks=[arc_e,gsm8k] limit=3` on the folder, with our network and with transformers: the
    same predictions item by item (ARC-Easy's chosen answers, GSM8K's generated texts)."""
    preds = {}
    for backend in ("ours", "hf"):
        out = tmp_path / backend
        _module("evalsuite", "+tasks=[arc_e,gsm8k]", "limit=3", f"model.path={tiny_gemma4_folder}", "model.preset=null",
                f"model.backend={backend}", f"output_dir={out}", "progress=false", "cache=off", cwd=tmp_path)
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        preds[backend] = {task: [json.loads(line)[key] for line in
                                 (run / f"samples_{task}.jsonl").read_text().splitlines()]
                          for task, key in (("arc_e", "predictions"), ("gsm8k", "generation"))}
        assert all(len(v) == 3 for v in preds[backend].values())
    assert preds["ours"] == preds["hf"]


def test_golden_logits_record_and_check(tiny_gemma4_folder, tmp_path):
    """The golden probes on a Gemma 4 checkpoint: recorded by our network, checked bit-exact by it
    and within the tolerance by transformers."""
    golden = tmp_path / "golden.json"
    model = [f"model.path={tiny_gemma4_folder}", "model.preset=null", f"golden.file={golden}"]
    for command, *extra in (["record"], ["check", "golden.exact=true"], ["check", "model.backend=hf"]):
        _module("evalsuite.golden", command, *model, *extra, cwd=tmp_path)
    assert json.loads(golden.read_text())["probes"]


def test_gemma4_gguf_is_refused_with_the_reason():
    with pytest.raises(C.ConfigError, match="Gemma 4 GGUF files are not supported.*Hugging Face checkpoint"):
        C.from_gguf_metadata({"general.architecture": "gemma4"}, source="model.gguf")
