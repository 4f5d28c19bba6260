"""`python -m evalsuite.export lm_eval RUN_DIR`: the files lm-evaluation-harness writes, read back with
lm-eval's own code, with the keys a leaderboard script reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evalsuite import evaluate, export
from evalsuite.model import load_model
from helpers import settings

lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval (the test extra) reads the export")


@pytest.fixture(scope="module")
def run_dir(tiny_gemma2_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    evaluate.run(load_model(str(tiny_gemma2_folder)), ["arc_e", "bbq_ambig", "gsm8k"], out, settings(limit=4))
    return out


def test_the_export_reads_back_with_lm_evals_code(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evalsuite.export", "lm_eval", str(run_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    files = [str(p) for p in tmp_path.rglob("*") if p.is_file()]
    results_file = lm_eval_utils.get_latest_filename(lm_eval_utils.get_results_filenames(files))
    samples = lm_eval_utils.get_sample_results_filenames(files)
    assert sorted(lm_eval_utils.get_file_task_name(f.rsplit("/", 1)[1]) for f in samples) == \
        ["arc_e", "bbq_ambig", "gsm8k"]
    res = json.loads(open(results_file).read())
    ours = json.loads((run_dir / "results.json").read_text())
    table = lm_eval_utils.make_table(res)  # lm-eval's own table of a results file
    assert "arc_e" in table and "acc_norm" in table
    assert "bbq_ambig" in lm_eval_utils.make_table(res, "groups")
    for task, t in ours["tasks"].items():  # what a leaderboard script reads
        for m, s in t["metrics"].items():
            assert res["results"][task][f"{m},none"] == s["value"]
            assert res["results"][task][f"{m}_stderr,none"] == (s["stderr"] if s["stderr"] is not None else "N/A")
        assert res["versions"][task] == t["version"] and res["n-shot"][task] == t["num_fewshot"]
        assert res["n-samples"][task] == {"original": t["split_items"], "effective": 4}
    hib = res["higher_is_better"]["bbq_ambig"]
    assert hib["acc"] is True and hib["bias_score"] is False
    assert res["configs"]["gsm8k"]["output_type"] == "generate_until"
    assert res["configs"]["arc_e"]["output_type"] == "multiple_choice"
    assert res["group_subtasks"]["bbq_ambig"] and all(s in res["results"] for s in res["group_subtasks"]["bbq_ambig"])
    assert res["config"]["model"] == "evalsuite" and isinstance(res["date"], float)
    assert set(res) >= {"results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                        "config", "git_hash", "date"}
    arc = [json.loads(line) for line in open(next(f for f in samples if "samples_arc_e_" in f))]
    ours_arc = [json.loads(line) for line in (run_dir / "samples_arc_e.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in arc] == [r["index"] for r in ours_arc]
    assert [s["acc"] for s in arc] == [float(r["predictions"]["acc"] == r["gold"]) for r in ours_arc]
    assert arc[0]["arguments"]["gen_args_0"]["arg_0"] == ours_arc[0]["prompt"]
    assert [r[0] for r in arc[0]["filtered_resps"]] == ours_arc[0]["logprobs"]


def test_the_samples_load_with_datasets(run_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = export.lm_eval(run_dir, tmp_path)
    ds = datasets.load_dataset("json", data_files=str(paths[1]), split="train")  # as the hub viewer loads them
    assert len(ds) == 4 and "doc_id" in ds.column_names


def test_clustered_stderr_is_beside_the_plain_one(run_dir):
    ours = json.loads((run_dir / "results.json").read_text())
    acc = ours["tasks"]["bbq_ambig"]["metrics"]["acc"]
    assert "stderr_clustered" in acc and acc["clusters"] >= 1
    assert "clusters" not in ours["tasks"]["arc_e"]["metrics"]["acc"]  # no cluster defined: plain only
