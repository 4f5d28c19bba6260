"""model.backend=openai against a real engine: llama.cpp's server (llama-cpp-python[server]), started
here on a free loopback port and stopped after.

The models are tiny random Gemma 3 GGUFs with a byte-level vocabulary: llama-cpp-python builds each
prompt token's top log-probs by sorting the whole vocabulary in Python (llama_cpp/llama.py), about
0.5 s per token on Gemma's 262,144 pieces on 2 cores, so the real 270M GGUF runs only where
EVALSUITE_LLAMACPP_270M=1 (test_the_gate_on_the_real_270m)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed "
                                               "(pip install -e '.[llamacpp]' builds it from source)")

from evalsuite import evaluate, server  # noqa: E402
from evalsuite.settings import ModelSettings, ServerSettings  # noqa: E402
from helpers import random_hf_model, settings, tiny_config, write_gguf  # noqa: E402


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1, on a port free when it starts."""

    def __init__(self, model: Path, log: Path, alias: str = "tiny"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base_url, self.alias = f"http://127.0.0.1:{port}/v1", alias
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                      "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1",
                                      "--model_alias", alias], stdout=self.log, stderr=subprocess.STDOUT)
        client, deadline = server.Client(self.base_url, retries=0), time.monotonic() + 120
        while True:
            try:
                assert client.models() == [alias]
                return
            except ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"llama.cpp's server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """Two tiny Gemma 3 GGUFs of the same architecture and tokenizer, different weights; a sliding
    window (16) far shorter than the long golden probe."""
    folder = tmp_path_factory.mktemp("ggufs")
    cfg = tiny_config("gemma3", vocab_size=260, max_position_embeddings=4096, sliding_window=16)
    paths = []
    for seed in (1, 2):
        path = folder / f"tiny{seed}.gguf"
        write_gguf(random_hf_model(cfg, seed=seed), cfg, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(ggufs, tmp_path_factory):
    s = LlamaServer(ggufs[0], tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def _model(path) -> ModelSettings:
    return ModelSettings(preset=None, path=str(path), backend="openai")


def _records(out, task):
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def test_the_gate_passes_and_predictions_agree_with_our_backend(ggufs, served, tmp_path, capsys):
    from evalsuite.model import load_model
    backend = server.open_backend(_model(ggufs[0]), ServerSettings(base_url=served.base_url), progress=False)
    p = backend.parity
    assert p["status"] == "passed" and p["tokens_compared"] > 3000 and 0 < p["max_abs_delta"] <= 1e-2
    t0 = time.perf_counter()
    evaluate.run(backend, ["arc_e"], tmp_path / "srv", settings(limit=100))
    t_server = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate.run(load_model(str(ggufs[0])), ["arc_e"], tmp_path / "ours", settings(limit=100))
    t_ours = time.perf_counter() - t0
    srv, ours = _records(tmp_path / "srv", "arc_e"), _records(tmp_path / "ours", "arc_e")
    same = sum(a["predictions"] == b["predictions"] for a, b in zip(srv, ours, strict=True))
    worst = max(abs(x - y) for a, b in zip(srv, ours) for x, y in zip(a["logprobs"], b["logprobs"]))
    with capsys.disabled():  # the figures, for the README
        print(f"\nllama.cpp parity: max |delta| {p['max_abs_delta']:.2e} over {p['tokens_compared']} probe tokens; "
              f"arc_e 100: {same}/100 same predictions, choice log-prob max |delta| {worst:.2e}; "
              f"{400 / t_server:.1f} requests/s (server) vs {400 / t_ours:.1f} (ours)")
    assert same >= 0.98 * len(srv)


def test_the_gate_fails_on_a_server_given_another_model_file(ggufs, tmp_path):
    other = LlamaServer(ggufs[1], tmp_path / "server.log")
    try:
        with pytest.raises(server.ParityError, match=r"(?s)parity gate FAILED.*\| probe \| position \|"):
            server.open_backend(_model(ggufs[0]), ServerSettings(base_url=other.base_url), progress=False)
    finally:
        other.stop()


def test_a_server_killed_mid_run_ends_clearly_and_a_rerun_resumes(ggufs, tmp_path):
    first = LlamaServer(ggufs[0], tmp_path / "server1.log")
    cache_dir = tmp_path / "cache"
    run = settings(limit=8, cache="write", cache_dir=str(cache_dir))
    backend = server.open_backend(_model(ggufs[0]), ServerSettings(base_url=first.base_url, retries=1,
                                                                   parity="off"), progress=False)

    def kill_after_some_answers():
        while first.proc.poll() is None:
            try:
                db = sqlite3.connect(f"file:{cache_dir / 'rank0.sqlite'}?mode=ro", uri=True)
                n = db.execute("SELECT count(*) FROM results").fetchone()[0]
                db.close()
            except sqlite3.Error:
                n = 0
            if n >= 6:
                first.proc.kill()
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_some_answers)
    watcher.start()
    try:
        with pytest.raises(ValueError, match=r"task 'arc_e', item \d+: .*no answer after 1 retries.*resumes"):
            evaluate.run(backend, ["arc_e"], tmp_path / "a", run)
    finally:
        watcher.join()
        first.stop()
    second = LlamaServer(ggufs[0], tmp_path / "server2.log")
    try:
        backend = server.open_backend(_model(ggufs[0]), ServerSettings(base_url=second.base_url, parity="off"),
                                      progress=False)
        res = evaluate.run(backend, ["arc_e"], tmp_path / "b", run)
    finally:
        second.stop()
    c = res["cache"]
    assert c["requests_from_cache"] >= 6 and c["requests_computed"] >= 1
    assert c["requests_from_cache"] + c["requests_computed"] == res["timing"]["requests"] == 32


@pytest.mark.skipif(os.environ.get("EVALSUITE_LLAMACPP_270M") != "1",
                    reason="slow (about 0.5 s per prompt token in llama-cpp-python's log-prob loop): "
                           "set EVALSUITE_LLAMACPP_270M=1")
def test_the_gate_on_the_real_270m(gguf_270m, tmp_path, capsys):
    # The long probe (795 tokens) takes longer than the default 300 s read timeout on this server.
    s = LlamaServer(gguf_270m, tmp_path / "server.log", alias="gemma3_270m")
    try:
        tolerance = float(os.environ.get("EVALSUITE_LLAMACPP_TOLERANCE", "0.5"))
        backend = server.open_backend(ModelSettings(backend="openai"),
                                      ServerSettings(base_url=s.base_url, parity_tolerance=tolerance,
                                                                     timeout_s=3600, retries=0), progress=False)
    finally:
        s.stop()
    with capsys.disabled():
        print(f"\n270M Q4_K_M on llama.cpp: {backend.parity}")
    assert backend.parity["status"] == "passed"
