"""model.backend=openai against a fake OpenAI-compatible server computed by our own network: the
parity gate, fail-closed replies, the result cache and resume, and scores equal to our backend's."""

from __future__ import annotations

import json

import pytest

from evalsuite import evaluate, server
from evalsuite.model import load_model
from evalsuite.settings import ModelSettings, ServerSettings
from fake_server import FakeServer
from helpers import settings


@pytest.fixture(scope="module")
def lm(tiny_gemma2_folder):
    return load_model(str(tiny_gemma2_folder))


@pytest.fixture
def fake(lm):
    s = FakeServer(lm)
    yield s
    s.close()


def _open(folder, fake, **kw):
    model = ModelSettings(preset=None, path=str(folder), backend="openai")
    return server.open_backend(model, ServerSettings(base_url=fake.base_url, **kw), progress=False)


def _records(out, task):
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def test_the_gate_passes_and_scores_equal_our_backend(tiny_gemma2_folder, lm, fake, tmp_path):
    backend = _open(tiny_gemma2_folder, fake, concurrency=3)
    assert backend.parity["status"] == "passed" and backend.parity["max_abs_delta"] < 1e-5
    assert backend.parity["tokens_compared"] > 600  # the long probe crosses the sliding window
    via_server = evaluate.run(backend, ["arc_e", "gsm8k"], tmp_path / "srv", settings(limit=3))
    ours = evaluate.run(lm, ["arc_e", "gsm8k"], tmp_path / "ours", settings(limit=3))
    for a, b in zip(_records(tmp_path / "srv", "arc_e"), _records(tmp_path / "ours", "arc_e"), strict=True):
        assert a["predictions"] == b["predictions"] and a["is_greedy"] == b["is_greedy"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    gen_a, gen_b = _records(tmp_path / "srv", "gsm8k"), _records(tmp_path / "ours", "gsm8k")
    assert [r["generation"] for r in gen_a] == [r["generation"] for r in gen_b]
    assert via_server["model"]["backend"] == "openai" and via_server["model"]["parity"]["status"] == "passed"
    assert via_server["tasks"]["arc_e"]["metrics"] == ours["tasks"]["arc_e"]["metrics"]


def test_the_gate_fails_on_other_numbers_with_a_per_token_diff(tiny_gemma2_folder, fake):
    fake.shift = 0.05  # every log-prob moved a little: another model, or this one computed wrongly
    with pytest.raises(server.ParityError, match=r"parity gate FAILED.*max \|delta\| 5\.000e-02") as e:
        _open(tiny_gemma2_folder, fake)
    assert "| probe | position | token | ours | server | delta |" in str(e.value)
    assert _open(tiny_gemma2_folder, fake, parity_tolerance=0.06).parity["status"] == "passed"


@pytest.mark.parametrize("fault, message", [("no_logprobs", "does not support echo with logprobs"),
                                            ("wrong_echo", "does not echo the prompt")])
def test_the_gate_refuses_a_server_without_usable_echo(tiny_gemma2_folder, fake, fault, message):
    setattr(fake, fault, True)
    with pytest.raises(server.ParityError, match=message):
        _open(tiny_gemma2_folder, fake)


def test_a_failing_server_stops_the_run_naming_the_item_and_a_rerun_resumes(tiny_gemma2_folder, fake, tmp_path):
    backend = _open(tiny_gemma2_folder, fake, retries=1, concurrency=2)
    gate = fake.completions
    fake.fail_after = gate + 5  # the engine dies after 5 scoring requests
    run = settings(limit=6, cache="write", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"task 'arc_e', item \d+: .*HTTP 500.*resumes"):
        evaluate.run(backend, ["arc_e"], tmp_path / "a", run)
    fake.fail_after, before = None, fake.completions
    backend = _open(tiny_gemma2_folder, fake)
    after_gate = fake.completions
    res = evaluate.run(backend, ["arc_e"], tmp_path / "b", run)
    assert res["cache"]["requests_from_cache"] >= 5  # what was answered before the failure is kept
    assert fake.completions - after_gate == res["cache"]["requests_computed"]
    assert res["cache"]["requests_from_cache"] + res["cache"]["requests_computed"] == res["timing"]["requests"]
    assert after_gate > before  # the gate runs again on every start
    recs = _records(tmp_path / "b", "arc_e")
    assert len(recs) == 6 and all(len(r["logprobs"]) == len(r["choices"]) for r in recs)


def test_parity_off_is_a_recorded_deviation(tiny_gemma2_folder, fake, tmp_path):
    backend = _open(tiny_gemma2_folder, fake, parity="off")
    assert fake.completions == 0  # no probes scored
    res = evaluate.run(backend, ["arc_e"], tmp_path, settings(limit=2))
    assert res["model"]["parity"] == {"status": "off"}
    assert any("parity=off" in d for d in res["tasks"]["arc_e"]["deviations"])


def test_reply_checks(monkeypatch):
    prompt = "The sky is blue"
    good = {"choices": [{"text": prompt + "!", "logprobs": {
        "text_offset": [0, 3, 7, 10, 15], "token_logprobs": [None, -1.0, -2.0, -0.5, -3.0],
        "top_logprobs": [None, {"a": -0.5}, {"b": -2.0}, {"c": -0.5}, {"!": -3.0}]}}]}
    offsets, values, top1 = server.echo_logprobs(good, prompt)
    assert offsets == [0, 3, 7, 10] and values == [None, -1.0, -2.0, -0.5] and top1 == [None, -0.5, -2.0, -0.5]
    for bad, message in [({"choices": []}, "no prompt log-probs"),
                         ({"choices": [{"text": "Another prompt", "logprobs": good["choices"][0]["logprobs"]}]},
                          "does not echo"),
                         ({"choices": [{"text": prompt, "logprobs": {"text_offset": [0, 7, 3], "token_logprobs": [
                             None, -1.0, -1.0], "top_logprobs": [None, {}, {}]}}]}, "inconsistent")]:
        with pytest.raises(ValueError, match=message):
            server.echo_logprobs(bad, prompt)


def test_chat_prompts_carry_the_gemma_turn_markers():
    from evalsuite.requests import Chat, Loglikelihood
    text, split = server.loglikelihood_prompt(Loglikelihood(Chat((("2+2?", "4"),), "3+3?"), " 6"))
    assert text == ("<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
                    "<start_of_turn>user\n3+3?<end_of_turn>\n<start_of_turn>model\n6")
    assert text[split:] == "6"
    assert server.loglikelihood_prompt(Loglikelihood("Answer: ", "Paris")) == ("Answer: Paris", 7)


@pytest.mark.parametrize("override, message", [
    ("server.parity=maybe", "server.parity='maybe'"), ("server.concurrency=0", "server.concurrency=0"),
    ("server.base_url=localhost:8000", "server.base_url='localhost:8000'")])
def test_bad_server_settings_name_the_key(override, message):
    from omegaconf import OmegaConf
    from evalsuite.settings import Settings
    key, value = override.split("=")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Settings), OmegaConf.from_dotlist([override])))


def test_the_gate_against_a_golden_file_needs_no_weights_here(tiny_gemma2_folder, lm, fake, tmp_path):
    from evalsuite import golden
    path = tmp_path / "g.json"
    golden.record(lm, path)  # where the weights are
    model = ModelSettings(preset=None, path=str(tmp_path / "absent"), backend="openai")  # not loaded
    backend = server.open_backend(model, ServerSettings(base_url=fake.base_url, parity_golden=str(path)),
                                  progress=False)
    assert backend.parity["status"] == "passed" and backend.parity["reference"].startswith("golden file")
    assert backend.version_key()["fingerprint_sha256"] == lm.fingerprint()
