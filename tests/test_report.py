"""Reports against the published numbers: registry lookups, Markdown, and the HTML opened in headless
Chromium (skipped with the reason where Chromium is absent, a failure under EVALSUITE_REQUIRE_TOOLS=1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import jinja2
import pytest

from evalsuite import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def write_run(path, preset="gemma2_9b", value=0.70, n=50):
    path.mkdir(parents=True)
    tasks = {
        "arc_c": {"primary": "acc_norm", "metrics": {"acc_norm": {"value": value, "stderr": 0.02}}, "num_items": n,
                  "num_fewshot": 25, "chat_format": False,
                  "deviations": ["few-shot exemplars drawn from the evaluation split (x) minus the item",
                                 f"limit={n}: {n} of 1172 items"]},
        "gsm8k": {"primary": "exact_match_flexible", "metrics": {"exact_match_flexible": {"value": 0.5, "stderr": 0.05}},
                  "num_items": 2, "num_fewshot": 5, "chat_format": False, "deviations": []},
    }
    (path / "results.json").write_text(json.dumps({
        "config": {"model": {"preset": preset}, "seed": 1}, "created": "2026-11-23T00:00:00+00:00",
        "model": {"source": "/models/x", "fingerprint_sha256": "ab" * 32, "backend": "ours", "dtype": "torch.float32",
                  "device": "cpu"},
        "tasks": tasks, "skipped_tasks": {"drop": "no local copy"}, "timing": {"wall_seconds": 12.5}}))
    with open(path / "samples_arc_c.jsonl", "w") as fh:
        fh.write(json.dumps({"index": 0, "prompt": "Question: is <script>alert(1)</script> text?\nAnswer:",
                             "choices": ["yes", "no"], "gold": 0, "logprobs": [-1.0, -2.0],
                             "predictions": {"acc_norm": 0}}) + "\n")
    with open(path / "samples_gsm8k.jsonl", "w") as fh:
        fh.write(json.dumps({"index": 3, "prompt": "Question: 2+2?\nAnswer:", "generation": " 4\n#### 4",
                             "target": "#### 4", "scores": {"exact_match_flexible": 1.0}}) + "\n")
    return path


def test_registry_lookup_prefers_the_gemma2_paper_and_keeps_other_sources():
    pub = report.lookup("gemma-2-9b", "pt", "arc_c")
    assert pub["value"] == 68.4 and pub["source"].startswith("arXiv:2408.00118") and pub["shots_match"]
    assert 69.1 in [o["value"] for o in pub["others"]]  # the Gemma 3 report's value for the same row
    assert report.lookup("gemma-3-270m", "pt", "hellaswag")["value"] == 40.9
    assert report.lookup("gemma-3-270m", "pt", "mbpp") is None
    assert report.published_model({"config": {"model": {"preset": "gemma3_270m"}}}) == ("gemma-3-270m", "pt")
    # Gemma 4's card (instruction-tuned rows only): the presets' names reach its rows.
    g4 = report.published_model({"config": {"model": {"preset": "gemma4_26b_a4b", "variant": "it"}}})
    assert g4 == ("gemma-4-26b-a4b", "it")
    rows = {r["benchmark"]: r["value"] for r in report.registry() if (r["model"], r["variant"]) == g4}
    assert rows["MMLU Pro"] == 82.6 and rows["GPQA Diamond"] == 82.3 and len(rows) == 11


def test_markdown_report_compares_with_published_and_flags_protocol(tmp_path):
    run = write_run(tmp_path / "run")
    md = report.render([report.load_run(run)], "md")
    # 70.00 ± 1.96*2 = 3.92; published 68.4 is inside [66.08, 73.92]; delta +1.60
    assert "| arc_c | 70.00 ± 3.92 | 68.4 ✓ | +1.60 | 50 | exemplars from the evaluation split; limit=50: 50 of 1172 items |" in md
    # gsm8k 50 ± 9.8 against the paper's 68.6: outside
    assert "| gsm8k | 50.00 ± 9.80 | 68.6 ✗ | -18.60 |" in md
    assert "drop not run: no local copy" in md


def test_strict_undefined_catches_a_missing_field(tmp_path):
    run = report.load_run(write_run(tmp_path / "run"))
    del run["model"]["backend"]
    with pytest.raises(jinja2.UndefinedError, match="backend"):
        report.render([run], "md")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("EVALSUITE_REQUIRE_TOOLS") == "1":
            pytest.fail("EVALSUITE_REQUIRE_TOOLS=1 but Chromium is not installed")
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    return CHROMIUM


def headless(browser, *args, timeout=120):
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--user-data-dir=" + os.environ.get("TMPDIR", "/tmp") + "/evalsuite-chromium", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_html_report_in_headless_chromium(tmp_path, browser):
    runs = [write_run(tmp_path / "a"), write_run(tmp_path / "b", value=0.60)]
    html_path = report.write(runs, formats=("html",), out=tmp_path / "rep")[0]
    html = html_path.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # autoescaped
    # Self-contained: nothing is fetched (XML namespace names in the SVG are identifiers, not fetches).
    assert not re.search(r'(src|href)="https?:|url\(https?:|<link|<script', html)
    dom = headless(browser, "--dump-dom", html_path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    table = page[page.index('<table id="scores">'):page.index("</table>")]
    assert len(re.findall(r'<tr data-task="', table)) == 2 and table.count("<th colspan=\"3\">") == 2
    assert ">68.4<" in table and "70.00 ± 3.92" in table and "60.00 ± 3.92" in table
    assert len(re.findall(r'<div class="chart"><svg', page)) == 2 and page.count("<path") > 10
    assert len(re.findall(r'<details class="drill"', page)) == 4
    shot = tmp_path / "report.png"
    r = headless(browser, f"--screenshot={shot}", "--window-size=1200,900", html_path.as_uri())
    assert r.returncode == 0 and shot.stat().st_size > 10_000


def test_safety_rows_compare_with_the_it_column_flag_the_protocol_and_show_groups(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    groups = {"male": {"num_items": 240, "acc": {"value": 0.8, "stderr": 0.02}},
              "female": {"num_items": 240, "acc": {"value": 0.7, "stderr": 0.03}}}
    (run / "results.json").write_text(json.dumps({
        "config": {"model": {"preset": "gemma2_9b", "variant": "it"}}, "created": "2026-12-02T00:00:00+00:00",
        "model": {"source": "google/gemma-2-9b-it", "fingerprint_sha256": "cd" * 32, "backend": "ours",
                  "dtype": "torch.float32", "device": "cpu"},
        "tasks": {"winogender": {"primary": "acc", "metrics": {"acc": {"value": 0.75, "stderr": 0.016}},
                                 "num_items": 480, "num_fewshot": 0, "chat_format": True, "deviations": [],
                                 "aggregation": "mean over all items; groups: the same metrics over each of 2 groups",
                                 "groups": groups}},
        "skipped_tasks": {"toxigen": "task 'toxigen' scores generations by toxicity: no classifier"},
        "timing": {"wall_seconds": 1.0}}))
    assert report.published_model(report.load_run(run)) == ("gemma-2-9b", "it")
    md = report.render([report.load_run(run)], "md")
    assert "| winogender | 75.00 ± 3.14 | 79.2 ✗ | -4.17 |" in md  # the Gemma 2 9B IT value, 79.17
    assert "protocol not stated in the paper" in md and "chat format" in md
    assert "| male | 240 | 80.00 ± 3.92 |" in md and "| female | 240 | 70.00 ± 5.88 |" in md
    assert "toxigen not run: task 'toxigen' scores generations by toxicity" in md
    # Gemma 1.1 IT: the preset names its registry model
    assert report.published_model({"config": {"model": {"preset": "gemma1_7b", "variant": "it",
                                                        "published": "gemma-1.1-7b"}}}) == ("gemma-1.1-7b", "it")
    assert report.lookup("gemma-1.1-7b", "it", "winogender")["value"] == 57.64
