"""Gemma tokenizers: SentencePiece (tokenizer.model), tokenizer.json, or rebuilt from GGUF metadata.

Gemma's tokenizer is SentencePiece BPE with byte fallback, no dummy prefix and an identity
normaliser that only escapes spaces to U+2581. All three backends give the same ids for the
same vocabulary (tested against the real tokenizer.json files).

Text is always text: a literal "<bos>" or "<start_of_turn>" inside a prompt is encoded as
characters, never as the control token (SentencePiece never matches CONTROL pieces in text; the
tokenizer.json backend is told not to either). Control tokens are inserted by id: BOS by
`encode(..., bos=True)`, exactly once, and the chat markers by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenizerError(RuntimeError):
    pass


class Tokenizer:
    def __init__(self, backend: Any, kind: str, bos_id: int, eos_id: int, pad_id: int, source: str):
        self._b, self.kind, self.source = backend, kind, source
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    # ---- constructors

    @classmethod
    def from_sentencepiece(cls, path: str | Path, bos_id=2, eos_id=1, pad_id=0) -> "Tokenizer":
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
        return cls(sp, "sentencepiece", bos_id, eos_id, pad_id, str(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, bos_id=2, eos_id=1, pad_id=0) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        tok.encode_special_tokens = True  # text is text: never turn "<eos>" in a prompt into the control id
        return cls(tok, "tokenizers", bos_id, eos_id, pad_id, str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF") -> "Tokenizer":
        """Rebuild the SentencePiece BPE model from tokenizer.ggml.* (pieces, scores, token types).

        SentencePiece BPE encodes by merging the pair whose merged piece has the highest score and
        matches USER_DEFINED pieces whole, so (piece, score, type) determine the encoding; the GGUF
        token-type enum is SentencePiece's. GGUF keeps whitespace-run pieces with literal spaces;
        SentencePiece matches on escaped text, so spaces become U+2581 again. (transformers built
        this as a Unigram model in older releases, which is wrong: transformers #41494.)
        """
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        if meta.get("tokenizer.ggml.model") != "llama":
            raise TokenizerError(f"{source}: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}, expected "
                                 "'llama' (SentencePiece) for Gemma")
        try:
            tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
        except KeyError as e:
            raise TokenizerError(f"{source}: missing GGUF tokenizer key {e.args[0]!r}") from None
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise TokenizerError(f"{source}: add_space_prefix=true is not Gemma's tokenizer")
        m = pb.ModelProto()
        for tok, score, typ in zip(tokens, scores, types):
            p = m.pieces.add()
            p.piece, p.score, p.type = tok.replace(" ", "\u2581"), score, typ
        ts = m.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size, ts.byte_fallback = len(tokens), True
        bos = int(meta.get("tokenizer.ggml.bos_token_id", 2))
        eos = int(meta.get("tokenizer.ggml.eos_token_id", 1))
        pad = int(meta.get("tokenizer.ggml.padding_token_id", 0))
        ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = int(meta.get("tokenizer.ggml.unknown_token_id", 3)), bos, eos, pad
        ns = m.normalizer_spec
        ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, False, True
        sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        tok = cls(sp, "sentencepiece(gguf)", bos, eos, pad, source)
        tok.model_proto = m  # kept so it can be written out as tokenizer.model
        return tok

    @classmethod
    def from_folder(cls, folder: str | Path, bos_id=2, eos_id=1, pad_id=0) -> "Tokenizer":
        folder = Path(folder)
        if (folder / "tokenizer.model").exists():
            return cls.from_sentencepiece(folder / "tokenizer.model", bos_id, eos_id, pad_id)
        if (folder / "tokenizer.json").exists():
            return cls.from_tokenizer_json(folder / "tokenizer.json", bos_id, eos_id, pad_id)
        raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json")

    # ---- use

    @property
    def vocab_size(self) -> int:
        return self._b.get_piece_size() if self.kind.startswith("sentencepiece") else self._b.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.kind.startswith("sentencepiece"):
            ids = self._b.encode(text)
        else:
            ids = self._b.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else list(ids)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind.startswith("sentencepiece"):
            return self._b.decode(ids)
        return self._b.decode(ids, skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        if self.kind.startswith("sentencepiece"):
            return self._b.id_to_piece(int(token_id))
        return self._b.id_to_token(int(token_id))
