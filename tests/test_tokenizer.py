"""The GGUF-rebuilt SentencePiece tokenizer against the real Gemma 3 tokenizer.json."""

from __future__ import annotations

import pytest

from evalsuite.model.tokenizer import Tokenizer, TokenizerError
from evalsuite.model.weights import read_gguf_metadata

STRINGS = [
    "The capital of France is",
    "  leading spaces and   runs\tof\ttabs  ",
    "numbers 1234567 3.14159 -42 1e10 0x1F",
    "naïve café résumé – “quotes” — dash",
    "日本語のテキストと中文字符",
    "emoji 🤖🎉 👍🏽",
    "def f(x):\n    return x**2\n\n\nprint(f(3))",
    "<table><tr><td>cell</td></tr></table>",
    "Question: What is 2+2?\nAnswer: 4\n\n",
    "a\n\n\n\nb",
    "   ",
    "\n",
    "",
    "Ünïcödé ΑΒΓ привет мир",
    "literal <bos> and <start_of_turn> stay text",
]


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_270m):
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf_270m), source=str(gguf_270m))


@pytest.fixture(scope="module")
def json_tokenizer(gemma3_tokenizer_json):
    return Tokenizer.from_tokenizer_json(gemma3_tokenizer_json)


@pytest.mark.parametrize("text", STRINGS)
def test_gguf_tokenizer_equals_real_tokenizer_json(gguf_tokenizer, json_tokenizer, text):
    assert gguf_tokenizer.encode(text) == json_tokenizer.encode(text)
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text)) == text


def test_bos_exactly_once(gguf_tokenizer):
    ids = gguf_tokenizer.encode("<bos>Hello", bos=True)
    assert ids[0] == 2 and ids.count(2) == 1  # the literal text "<bos>" is not the control token
    assert 2 not in gguf_tokenizer.encode("Hello")


def test_sentencepiece_model_file_roundtrip(tmp_path, gguf_tokenizer, json_tokenizer):
    """The same vocabulary written as tokenizer.model loads through the SentencePiece path."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(gguf_tokenizer.model_proto.SerializeToString())
    sp = Tokenizer.from_folder(tmp_path)
    assert sp.kind == "sentencepiece"
    for text in STRINGS:
        assert sp.encode(text) == json_tokenizer.encode(text)


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_sentencepiece(bad)
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
