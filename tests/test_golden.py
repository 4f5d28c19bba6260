"""Golden log-probs: record, check, a planted change caught with a per-token diff, bit-exact mode, and
the CLI's exit statuses; on tiny random Gemma 1, 2 and 3 checkpoints with the real tokenizers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evalsuite import golden
from evalsuite.model import load_model
from helpers import tiny_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["gemma1", "gemma2", "gemma3"])
def tiny(request, tmp_path_factory, gemma2_tokenizer_json, gemma3_tokenizer_json):
    family = request.param
    # 262208 rows as the released Gemma 3 checkpoints (the tokenizer.json has 262145 pieces).
    tok, vocab = (gemma3_tokenizer_json, 262208) if family == "gemma3" else (gemma2_tokenizer_json, 256000)
    cfg = tiny_config(family, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                      head_dim=16, query_pre_attn_scalar=16, num_layers=2, max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp(f"tiny_{family}")
    write_hf_checkpoint(cfg, folder, seed=5, tokenizer_json=tok)
    return folder


def test_record_then_check_and_a_planted_change_fails(tiny, tmp_path):
    lm = load_model(str(tiny))
    path = tmp_path / "golden.json.gz"
    rec = golden.record(lm, path)
    long_ids = rec["probes"][-1]["ids"]
    assert len(long_ids) > max(600, lm.config.sliding_window or 0)  # crosses the sliding window
    assert golden.check(lm, golden.load(path), exact=True) == {"comparable": None, "max_abs_delta": 0.0, "failures": []}
    # A "code change": the (tied) embedding scaled by 10% in memory, so every logit moves (the weight
    # files, hence the fingerprint, are unchanged).
    embed = next(p for n, p in lm.model.named_parameters() if "embed" in n)
    with torch.no_grad():
        embed.mul_(1.1)
    result = golden.check(lm, golden.load(path), tolerance=1e-4)
    assert result["comparable"] is None and result["max_abs_delta"] > 1e-4 and result["failures"]
    table = golden.diff_table(lm, result)
    assert table.startswith("| probe | position | token | golden | now | delta |") and "e-" in table


def test_cli_record_check_exit_statuses(tmp_path, gemma2_tokenizer_json):
    cfg = tiny_config("gemma2", vocab_size=256000, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                      head_dim=16, query_pre_attn_scalar=16, num_layers=2, max_position_embeddings=4096)
    folder = tmp_path / "ckpt"
    write_hf_checkpoint(cfg, folder, seed=1, tokenizer_json=gemma2_tokenizer_json)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(action, *args, model=folder):
        return subprocess.run([sys.executable, "-m", "evalsuite.golden", action, f"model.path={model}",
                               "model.preset=null", f"golden.file={tmp_path / 'g.json'}", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)

    assert cli("check").returncode == 2  # nothing recorded yet
    rec = cli("record")
    assert rec.returncode == 0 and "recorded" in rec.stdout, rec.stderr[-2000:]
    ok = cli("check", "golden.exact=true")
    assert ok.returncode == 0 and "bit-exact" in ok.stdout, ok.stderr[-2000:]
    other = tmp_path / "other"
    write_hf_checkpoint(cfg, other, seed=2, tokenizer_json=gemma2_tokenizer_json)
    proc = cli("check", model=other)
    assert proc.returncode == 2 and "fingerprint_sha256" in proc.stderr
