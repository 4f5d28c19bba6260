"""Tasks, data, runner and CLI of the evaluation engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evalsuite import data, tasks
from evalsuite.runner import Runner

GOLDEN = Path(__file__).parent / "golden"


LOCAL_TASKS = [t for t in tasks.available_tasks() if tasks.load_spec(t).data.file]


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_task_renders_item0_as_golden(name):
    # python -m evalsuite.tasks golden NAME rewrites the file after an intended change
    assert tasks.golden_text(name) == (GOLDEN / f"{name}.txt").read_text()
    items, prov = tasks.build_items(tasks.load_spec(name), limit=1)
    it = items[0]
    assert it.index not in it.fewshot_indices or prov["fewshot_file"] != prov["data_file"]
    assert prov["data_sha256"] == data.load_files(tasks.load_spec(name).data.file).sha256
    files = tasks.load_spec(name).data.file
    if isinstance(files, str):
        assert prov["data_sha256"] == data.manifest()[files]["sha256"]


@pytest.mark.parametrize("sampler", ["fixed", "random", "first_n"])
def test_item_is_never_its_own_exemplar_and_exemplars_do_not_depend_on_limit(sampler):
    spec = tasks.load_spec("arc_c")
    items, prov = tasks.build_items(spec, sampler=sampler)
    assert all(it.index not in it.fewshot_indices and len(set(it.fewshot_indices)) == 25 for it in items)
    again, _ = tasks.build_items(spec, limit=5, sampler=sampler)
    assert [it.fewshot_indices for it in again] == [it.fewshot_indices for it in items[:5]]
    assert any("minus the item" in d for d in prov["deviations"]) and prov["fewshot_sampler"] == sampler
    blocks = {tuple(it.fewshot_indices) for it in items}
    if sampler == "random":
        assert len(blocks) > len(items) // 2  # a draw per item
    else:  # one shared block, except for the items that are themselves in it
        assert len(blocks) <= 27
        shared = max(blocks, key=lambda b: sum(tuple(it.fewshot_indices) == b for it in items))
        assert sum(tuple(it.fewshot_indices) == shared for it in items) >= len(items) - 26


def test_mmlu_exemplars_are_first_five_dev_questions_of_the_subject():
    items, prov = tasks.build_items(tasks.load_spec("mmlu"), limit=1)
    dev = data.load_local("mmlu/dev.jsonl.gz").rows
    subject = items[0].doc["subject"]
    assert items[0].fewshot_indices == [i for i, r in enumerate(dev) if r["subject"] == subject][:5]
    assert prov["deviations"] == ["limit=1: 1 of 14042 items"]


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    import shutil
    fake = tmp_path / "data"
    shutil.copytree(data.DATA_DIR, fake)
    path = fake / "piqa" / "validation.jsonl.gz"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "DATA_DIR", fake)
    data.load_local.cache_clear()
    try:
        with pytest.raises(data.DataError, match="piqa/validation.jsonl.gz: sha256 .* does not match"):
            data.load_local("piqa/validation.jsonl.gz")
    finally:
        data.load_local.cache_clear()


def test_unknown_task_lists_valid_names():
    with pytest.raises(tasks.TaskError, match="unknown task 'arc_x'.*arc_c, arc_e"):
        tasks.load_spec("arc_x")


@pytest.fixture(scope="module")
def requests_mixed():
    out = []
    for name, limit in (("arc_e", 3), ("winogrande", 2), ("boolq", 2)):
        items, _ = tasks.build_items(tasks.load_spec(name), limit=limit)
        out += [r for it in items for r in it.requests]
    return out


def test_runner_same_results_for_batch_size_1_and_16(ours_270m, requests_mixed):
    one = Runner(ours_270m, batch_size=1, progress=False).loglikelihood(requests_mixed)
    many = Runner(ours_270m, batch_size=16, progress=False).loglikelihood(requests_mixed)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(one, many)) <= 1e-4
    assert [a.is_greedy for a in one] == [b.is_greedy for b in many]


def test_packed_context_sharing_equals_scoring_each_request_alone(ours_270m, requests_mixed):
    from evalsuite.runner import split_pair
    packed = Runner(ours_270m, progress=False).loglikelihood(requests_mixed)
    tok = ours_270m.tokenizer
    seqs, conts = [], []
    for r in requests_mixed:
        context, continuation = split_pair(r.context, r.continuation)
        c = tok.encode(continuation)
        # The stated split: the few-shot prefix, the rest of the context and the continuation are encoded alone.
        pre = tok.encode(context[:r.shared_prefix], bos=True) + tok.encode(context[r.shared_prefix:]) \
            if r.shared_prefix else tok.encode(context, bos=True)
        seqs.append(pre + c)
        conts.append(len(c))
    alone = ours_270m.token_logprobs(seqs, batch_size=4)
    for res, lp, n in zip(packed, alone, conts):
        assert abs(res.logprob - float(lp[-n:].sum())) <= 1e-4
        assert res.num_tokens == n


def _cli(*args, cwd):
    import os
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "evalsuite", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def test_cli_end_to_end_writes_results(tmp_path):
    proc = _cli("+tasks=[arc_e,piqa]", "limit=5", f"output_dir={tmp_path / 'out'}", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing else written
    assert (tmp_path / "out" / "cache" / "rank0.sqlite").is_file()  # the result cache, beside the run
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.name != "cache"]
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["tasks"]) == {"arc_e", "piqa"}
    for t in res["tasks"].values():
        assert t["num_items"] == 5 and 0.0 <= t["metrics"][t["primary"]]["value"] <= 1.0
        assert len(t["data_sha256"]) == 64
    assert len(res["model"]["fingerprint_sha256"]) == 64 and res["timing"]["tokens_scored"] > 0
    lines = (run_dir / "samples_piqa.jsonl").read_text().splitlines()
    assert len(lines) == 5 and {"prompt", "choices", "logprobs", "predictions", "gold"} <= set(json.loads(lines[0]))
    assert "| piqa |" in proc.stdout
    # The report against the published numbers is written with every run (gemma3_270m: the model card).
    md = (run_dir / "report.md").read_text()
    assert re.search(r"\| piqa \| [0-9.]+ ± [0-9.]+ \| 67\.7 [✓✗] \|", md), md
    assert "<svg" in (run_dir / "report.html").read_text()


def test_cli_bad_overrides_name_the_valid_choices(tmp_path):
    proc = _cli("+tasks=arc_x", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown task 'arc_x'" in proc.stderr and "hellaswag" in proc.stderr
    proc = _cli("+tasks=arc_e", "model=gemma2_9", cwd=tmp_path)
    assert proc.returncode != 0 and "gemma2_9b" in proc.stderr  # Hydra lists the model options


def test_tasks_records_and_report_import_without_torch():
    code = ("import sys\nsys.modules['torch'] = None  # import torch now fails\n"
            "import evalsuite.report, evalsuite.records, evalsuite.requests\nfrom evalsuite import tasks\n"
            "[tasks.load_spec(t) for t in tasks.available_tasks()]\n"
            "items, _ = tasks.build_items(tasks.load_spec('arc_e'), limit=2)\nassert len(items[0].requests) == 4\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_settings_schema_defaults_are_the_documented_config():
    import dataclasses

    import yaml

    from evalsuite.settings import Settings
    documented = yaml.safe_load((Path(__file__).parents[1] / "conf" / "config.yaml").read_text())
    documented = {k: v for k, v in documented.items() if k not in ("defaults", "hydra")}
    schema = {k: v for k, v in dataclasses.asdict(Settings()).items() if k not in ("tasks", "model")}
    assert documented == schema


class _AnswersRequests:
    """A backend that only answers requests (as an inference server would): log p(continuation) is
    minus its length in characters."""

    def loglikelihood(self, requests):
        from evalsuite.requests import LoglikelihoodResult
        return [LoglikelihoodResult(-float(len(r.continuation)), False, 1) for r in requests]

    def loglikelihood_rolling(self, texts):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError

    def describe(self):
        return {"backend": "fake", "source": "test", "fingerprint_sha256": None}

    def version_key(self):
        return {"backend": "fake"}


def test_a_new_task_kind_is_one_class_and_a_task_folder(tmp_path, monkeypatch):
    """The seam: a kind scoring the probability mass of the true choices (TruthfulQA's MC2 rule),
    registered as one class, run by evaluate through a backend that only answers requests."""
    import math

    from evalsuite import evaluate, kinds
    from evalsuite.settings import Settings

    class TrueMass(kinds.MultipleChoice):
        templates = ("prompt", "choices", "gold")

        def allowed_metrics(self, spec):
            return ("mc2",)

        def score(self, spec, item, results, outcomes, sampling):
            p = [math.exp(r.logprob) for r in results]
            return kinds.Scored({"mc2": p[item.gold] / sum(p)}, self.record(spec, item, results))

    monkeypatch.setitem(kinds.KINDS, "true_mass", TrueMass())
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "task.yaml").write_text(
        "name: toy\nversion: 1\npaper_row: a toy\ndata: {file: piqa/validation.jsonl.gz}\n"
        "fields: [goal, sol1, sol2, label]\nfewshot: {count: 0}\nkind: true_mass\n"
        "prompt: \"{{ goal }}\"\nchoices: \"{{ [sol1, sol2] | tojson }}\"\ngold: \"{{ label }}\"\n"
        "metrics: [mc2]\nprimary: mc2\n")
    monkeypatch.setattr(tasks, "TASKS_DIR", tmp_path)
    tasks.load_spec.cache_clear()
    try:
        res = evaluate.run(_AnswersRequests(), ["toy"], tmp_path / "out", Settings(limit=3, cache="off",
                                                                                  progress=False))
    finally:
        tasks.load_spec.cache_clear()
    rows = data.load_local("piqa/validation.jsonl.gz").rows[:3]
    want = []
    for r in rows:
        p = [math.exp(-len(" " + r["sol1"])), math.exp(-len(" " + r["sol2"]))]
        want.append(p[int(r["label"])] / sum(p))
    got = res["tasks"]["toy"]["metrics"]["mc2"]["value"]
    assert got == pytest.approx(sum(want) / 3) and res["model"]["backend"] == "fake"
    recs = [json.loads(line) for line in (tmp_path / "out" / "samples_toy.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2] and all(len(r["logprobs"]) == 2 for r in recs)
