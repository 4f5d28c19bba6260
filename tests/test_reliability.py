"""Nothing finished is lost: a run killed part way resumes from the result cache with the same results;
the cache is invalidated by a weight or code change; errors are one clear paragraph."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evalsuite import cache as result_cache
from helpers import cache_rows, settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tiny_gemma2_folder):
    return tiny_gemma2_folder


def _args(folder, out, *extra):
    # arc_e (log-likelihood) then gsm8k (generation): batches of 4 requests
    return ["+tasks=[arc_e,gsm8k]", "limit=8", f"model.path={folder}", "model.preset=null", "batch_size=4",
            "progress=false", f"output_dir={out}", *extra]


def _cmd(*args):
    return [sys.executable, "-m", "evalsuite", *args]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(*args, cwd):
    return subprocess.run(_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=600, env=_env())


def _run_dir(out: Path) -> Path:
    (run,) = [p.parent for p in out.glob("*/results.json")]
    return run


def _rows(cache_dir: Path) -> int:
    return sum(cache_rows(cache_dir).values())


def _results(run: Path):
    res = json.loads((run / "results.json").read_text())
    samples = {p.name: p.read_text() for p in sorted(run.glob("samples_*.jsonl"))}
    return {n: t["metrics"] for n, t in res["tasks"].items()}, samples, res["cache"]


def test_killed_run_resumes_and_computes_only_what_is_missing(tiny_folder, tmp_path):
    ref = _run(*_args(tiny_folder, tmp_path / "ref", "cache=off"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_metrics, ref_samples, ref_cache = _results(_run_dir(tmp_path / "ref"))
    total = ref_cache["requests_computed"]
    assert ref_cache["requests_from_cache"] == 0 and total == 8 * 4 + 8 - sum(  # arc_e has 3-5 choices
        4 - len(json.loads(line)["choices"]) for line in ref_samples["samples_arc_e.jsonl"].splitlines())

    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(*_args(tiny_folder, out)), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "cache").exists() and _rows(out / "cache") >= 8:  # two batches committed
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _rows(out / "cache")
    assert 8 <= kept < total and not list(out.glob("*/results.json"))

    again = _run(*_args(tiny_folder, out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    got_metrics, got_samples, got_cache = _results(_run_dir(out))
    assert got_cache["requests_from_cache"] == kept and got_cache["requests_computed"] == total - kept
    assert got_metrics == ref_metrics
    assert got_samples == ref_samples  # every record, log-probs and generations included
    assert f"{kept} requests read, {total - kept} computed" in again.stdout

    # Nothing left to do: a third run reads everything.
    third = _run(*_args(tiny_folder, tmp_path / "third", f"cache_dir={out / 'cache'}"), cwd=tmp_path)
    assert third.returncode == 0 and f"{total} requests read, 0 computed" in third.stdout


def test_one_changed_weight_invalidates_the_cache(tiny_folder, tmp_path):
    from evalsuite import evaluate
    from evalsuite.model import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cache_dir = tmp_path / "cache"

    def run(name):
        res = evaluate.run(load_model(str(folder)), ["arc_e"], tmp_path / name,
                           settings(limit=3, cache="write", cache_dir=cache_dir))
        return res["cache"]

    first = run("a")
    assert first["requests_from_cache"] == 0 and first["requests_computed"] > 0
    assert run("b")["requests_from_cache"] == first["requests_computed"]
    (st,) = folder.glob("*.safetensors")
    tensors = load_file(st)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += torch.tensor(1e-3, dtype=tensors[name].dtype)
    save_file(tensors, st, metadata={"format": "pt"})
    changed = run("c")
    assert changed["requests_from_cache"] == 0 and changed["requests_computed"] == first["requests_computed"]


def test_cache_modes_and_code_version(tiny_folder, tmp_path, monkeypatch):
    from evalsuite import evaluate
    from evalsuite.model import load_model

    lm = load_model(str(tiny_folder))
    cache_dir = tmp_path / "cache"

    def run(mode, name):
        return evaluate.run(lm, ["arc_e"], tmp_path / name, settings(limit=2, cache=mode, cache_dir=cache_dir))["cache"]

    assert run("read", "r0")["requests_from_cache"] == 0 and _rows(cache_dir) == 0  # read adds nothing
    n = run("write", "w")["requests_computed"]
    assert _rows(cache_dir) == n
    assert run("refresh", "f") == {"mode": "refresh", "dir": str(cache_dir), "requests_from_cache": 0,
                                   "requests_computed": n}
    assert run("read", "r1")["requests_from_cache"] == n
    # A change to the model code gives new keys: nothing stale is read.
    fake = tmp_path / "gemma.py"
    fake.write_text("# version 1\n")
    monkeypatch.setattr(result_cache, "CODE_FILES", [fake])
    monkeypatch.setattr(result_cache, "_PACKAGE", tmp_path)
    assert run("write", "v1")["requests_from_cache"] == 0
    assert run("write", "v1b")["requests_from_cache"] == n
    fake.write_text("# version 2\n")
    assert run("write", "v2")["requests_from_cache"] == 0
    with pytest.raises(ValueError, match="cache='sometimes': expected one of off, read, write, refresh"):
        run("sometimes", "x")


# ---- bad input: one paragraph naming the culprit, exit status 2, no traceback -----------------------
def _handle(overrides, capsys):
    from hydra import compose, initialize_config_dir

    from evalsuite.__main__ import CONF_DIR, handle
    from evalsuite.settings import normalize_overrides
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=normalize_overrides(["progress=false", *overrides]))
    with pytest.raises(SystemExit) as exit_info:
        handle(cfg)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def _copy_with(folder: Path, dest: Path, change) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    (st,) = dest.glob("*.safetensors")
    tensors = load_file(st)
    change(tensors)
    save_file(tensors, st, metadata={"format": "pt"})
    return dest


def test_bad_inputs_name_the_culprit(tiny_folder, tmp_path, capsys):
    model = [f"model.path={tiny_folder}", "model.preset=null", f"output_dir={tmp_path / 'out'}"]
    code, err = _handle(["+tasks=mmlx", *model], capsys)
    assert code == 2 and "unknown task 'mmlx'; did you mean 'mmlu'?" in err
    code, err = _handle(["+tasks=humaneval", "execution.memory_mb=-5", *model], capsys)
    assert code == 2 and "execution.memory_mb=-5: expected a number above 0" in err
    code, err = _handle(["+tasks=arc_e", "model.path=/nowhere/gemma", "model.preset=null"], capsys)
    assert code == 2 and "/nowhere/gemma" in err
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_folder.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[: 1000] if f.suffix == ".safetensors" else f.read_bytes())
    code, err = _handle(["+tasks=arc_e", f"model.path={truncated}", "model.preset=null"], capsys)
    assert code == 2 and "model.safetensors" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = _handle(["+tasks=arc_e", "limit=1", *model[:2], f"output_dir={a_file}"], capsys)
    assert code == 2 and f"output_dir: cannot write results to {a_file}" in err
    if not torch.cuda.is_available():
        code, err = _handle(["+tasks=arc_e", *model, "device=cuda"], capsys)
        assert code == 2 and "device='cuda' was requested but CUDA is not available" in err
    code, err = _handle(["+tasks=arc_e", *model, "cache=sometimes"], capsys)
    assert code == 2 and "cache='sometimes': expected one of off, read, write, refresh" in err


def test_a_prompt_longer_than_the_context_is_refused_naming_the_item(tiny_folder, tmp_path, capsys):
    import json as _json
    short = tmp_path / "short"
    short.mkdir()
    for f in tiny_folder.iterdir():
        (short / f.name).write_bytes(f.read_bytes())
    cfg = _json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").write_text(_json.dumps(cfg))
    code, err = _handle(["+tasks=arc_c", "limit=2", f"model.path={short}", "model.preset=null",
                         f"output_dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and "task 'arc_c', item 0: the prompt needs" in err and "more than the maximum length 64" in err
    assert "does not truncate" in err


def test_nan_in_a_layer_stops_the_run_naming_the_layer(tiny_folder, tmp_path, capsys):
    def poison(tensors):
        name = next(n for n in tensors if "layers.1." in n and "down_proj" in n)
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")

    folder = _copy_with(tiny_folder, tmp_path / "nan", poison)
    for task in ("arc_e", "gsm8k"):  # scoring and decoding
        code, err = _handle([f"+tasks={task}", "limit=1", f"model.path={folder}", "model.preset=null",
                             f"output_dir={tmp_path / 'out'}", "cache=off"], capsys)
        assert code == 2 and "NaN or inf in the model's logits" in err
        assert "came out of layer 1 (" in err


def test_out_of_memory_halves_the_batch_and_gives_the_same_results(tiny_folder, monkeypatch):
    from evalsuite.model import load_model
    from evalsuite.runner import Generation, Loglikelihood, Runner

    lm = load_model(str(tiny_folder))
    lls = [Loglikelihood(f"Question {i}: what comes next?\nAnswer:", f" {c}") for i in range(5) for c in "AB"]
    gens = [Generation(f"Count to {i}:", max_tokens=5) for i in range(5)]
    plain = Runner(lm, batch_size=8, progress=False)
    want_ll, want_gen = plain.loglikelihood(lls), plain.generate_until(gens)
    runner = Runner(lm, batch_size=8, progress=False)
    hidden = runner.backend.hidden

    def small_memory(ids, *a, **kw):
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return hidden(ids, *a, **kw)

    monkeypatch.setattr(runner.backend, "hidden", small_memory)
    got_ll, got_gen = runner.loglikelihood(lls), runner.generate_until(gens)
    assert runner.oom_splits >= 2
    assert [r.tokens for r in got_gen] == [r.tokens for r in want_gen]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got_ll, want_ll)) <= 1e-5


def test_dataset_file_missing_a_field_names_the_field_and_line(tmp_path, monkeypatch):
    import gzip

    from evalsuite import data
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2"}]
    raw = gzip.compress("\n".join(json.dumps(r) for r in rows).encode())
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test.jsonl.gz").write_bytes(raw)
    import hashlib
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"files": [
        {"file": "toy/test.jsonl.gz", "sha256": hashlib.sha256(raw).hexdigest(), "rows": 2}]}))
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    data.manifest.cache_clear()
    data.load_local.cache_clear()
    try:
        with pytest.raises(data.DataError, match=r"toy/test.jsonl.gz: line 2 has no field 'answer'"):
            data.load_local("toy/test.jsonl.gz", ("question", "answer"))
    finally:
        data.manifest.cache_clear()
        data.load_local.cache_clear()


def test_the_command_line_prints_no_traceback(tmp_path):
    proc = _run("+tasks=arc_e", "model.path=/nowhere/gemma", "model.preset=null", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "/nowhere/gemma" in proc.stderr
    proc = _run("+tasks=arc_e", "model.path=/nowhere/gemma", "model.preset=null", "debug=true", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("limit=-3", "limit=-3: expected null (all items) or a whole number >= 1"),
    ("limit=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("num_fewshot=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("batch_size=0", "batch_size=0: expected a whole number >= 1"),
    ("lmit=3", "Key 'lmit' not in 'Settings'"),
    ("model=gemma9_9b", "Could not find 'model/gemma9_9b'"),
    ("+tasks=arc_x", "unknown task 'arc_x'"),
    ("model.variant=chat", "model.variant='chat': expected one of pt, it"),
    ("toxicity.batch_size=0", "toxicity.batch_size=0: expected a whole number >= 1"),
])
def test_bad_settings_exit_2_with_one_paragraph(tmp_path, override, message):
    tasks = [] if "tasks=" in override else ["+tasks=arc_e"]
    proc = _run(*tasks, override, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert override.split("=")[0].lstrip("+") in proc.stderr  # the message names the key
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_tasks_with_or_without_plus_and_strict_json_results(tiny_folder, tmp_path):
    def parse_strict(text):
        def refuse(constant):
            raise ValueError(f"{constant} in strict JSON")
        return json.loads(text, parse_constant=refuse)

    for form in ("+tasks=arc_e", "tasks=arc_e"):
        out = tmp_path / ("plus" if form.startswith("+") else "plain")
        proc = _run(form, "limit=1", f"model.path={tiny_folder}", "model.preset=null", "progress=false",
                    "cache=off", f"output_dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = parse_strict((_run_dir(out) / "results.json").read_text())  # one item: no standard error
        acc = res["tasks"]["arc_e"]["metrics"]["acc"]
        assert res["schema_version"] == 1 and acc["stderr"] is None and "1 item" in acc["null_reason"]
        for line in (_run_dir(out) / "samples_arc_e.jsonl").read_text().splitlines():
            parse_strict(line)


def test_a_toxicity_task_without_its_classifier_exits_2_naming_the_setting(tmp_path):
    proc = _run("+tasks=toxigen", f"toxicity.classifier={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}",
                cwd=tmp_path)
    assert proc.returncode == 2 and "toxicity.classifier" in proc.stderr and "Traceback" not in proc.stderr
