"""Runner requests (loglikelihood, loglikelihood_rolling, generate_until), prefix reuse, chat format and
the transformers backend, on a tiny random Gemma 2 that reads the real 256000-piece tokenizer."""

from __future__ import annotations

import gc
import json
import platform
import weakref

import pytest
import torch

from evalsuite import batching
from evalsuite.backends import HFBackend
from evalsuite.model import load_model
from evalsuite.runner import Chat, Generation, Loglikelihood, Runner
from helpers import settings

FEWSHOT = "".join(f"Question: What is {i} plus {i}?\nAnswer: {2 * i}\n\n" for i in range(2, 7))


@pytest.fixture(scope="module")
def tiny_folder(tiny_gemma2_folder):
    return tiny_gemma2_folder


@pytest.fixture(scope="module")
def ours(tiny_folder):
    return load_model(str(tiny_folder))


@pytest.fixture(scope="module")
def hf(tiny_folder):
    return HFBackend(str(tiny_folder))


def _requests():
    reqs = []
    for q, choices in (("What is 7 plus 7?", ["14", "15", "41"]), ("What is 9 plus 9?", ["18", "81"]),
                       ("What is 1 plus 1?", ["2", "11", "3", "one"])):
        reqs += [Loglikelihood(FEWSHOT + f"Question: {q}\nAnswer:", " " + c, shared_prefix=len(FEWSHOT))
                 for c in choices]
    reqs += [Loglikelihood("A sentence with no prefix and a trailing space ", "ends here."),
             Loglikelihood("Short", " one")]
    return reqs


def test_prefix_reuse_gives_the_same_logprobs_as_no_reuse(ours):
    reqs = _requests()
    runner = Runner(ours, progress=False)
    shared = runner.loglikelihood(reqs)
    plain = Runner(ours, progress=False, share_prefix=False).loglikelihood(reqs)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, plain)) <= 1e-4
    assert [a.is_greedy for a in shared] == [b.is_greedy for b in plain]
    # The prefix was run once, not once per question: fewer tokens went through the network.
    again = Runner(ours, progress=False, share_prefix=False)
    again.loglikelihood(reqs)
    prefix_tokens = len(ours.tokenizer.encode(FEWSHOT, bos=True))
    assert again.tokens_forwarded - runner.tokens_forwarded == 2 * prefix_tokens


def test_packed_and_shared_scoring_equals_each_sequence_alone(ours):
    reqs = _requests()
    got = Runner(ours, batch_size=3, progress=False).loglikelihood(reqs)
    tok = ours.tokenizer
    for r, res in zip(reqs, got):
        ctx = r.context.rstrip(" ")
        cont = tok.encode(r.context[len(ctx):] + r.continuation)
        pre = (tok.encode(ctx[:r.shared_prefix], bos=True) + tok.encode(ctx[r.shared_prefix:])
               if r.shared_prefix else tok.encode(ctx, bos=True))
        lp = ours.token_logprobs([pre + cont])[0]
        assert abs(res.logprob - float(lp[-len(cont):].sum())) <= 1e-4 and res.num_tokens == len(cont)


def test_head_chunks_written_into_one_reused_block_score_the_same(ours, hf):
    reqs = _requests()
    whole = Runner(ours, progress=False).loglikelihood(reqs)
    for model in (ours, hf):
        runner = Runner(model, batch_size=3, head_chunk=5, progress=False)
        chunked = runner.loglikelihood(reqs)  # full chunks of 5 rows and shorter last ones
        assert runner.head._block is not None and runner.head._block.shape[0] == 5
        assert max(abs(a.logprob - b.logprob) for a, b in zip(whole, chunked)) <= 1e-4
        assert [a.is_greedy for a in whole] == [b.is_greedy for b in chunked]


def test_transformers_backend_scores_the_same(ours, hf):
    reqs = _requests()
    a = Runner(ours, progress=False).loglikelihood(reqs)
    b = Runner(hf, batch_size=4, progress=False).loglikelihood(reqs)
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) <= 1e-4
    assert [x.is_greedy for x in a] == [y.is_greedy for y in b]
    assert hf.describe()["backend"] == "hf" and len(hf.describe()["fingerprint_sha256"]) == 64


def test_rolling_loglikelihood_windows(ours):
    texts = ["One short text.", "A longer text that needs several windows when the window is small, " * 3]
    full = Runner(ours, progress=False).loglikelihood_rolling(texts)
    tok = ours.tokenizer
    for t, res in zip(texts, full):
        ids = tok.encode(t, bos=True)
        assert res.num_tokens == len(ids) - 1
        assert abs(res.logprob - float(ours.token_logprobs([ids])[0].sum())) <= 1e-4
    win = 16
    small = Runner(ours, progress=False, max_length=win).loglikelihood_rolling(texts[1:])[0]
    seq = tok.encode(texts[1], bos=True)
    expect = 0.0
    for a in range(1, len(seq), win - 1):  # each window conditions on the tokens before it, up to `win`
        b = min(a + win - 1, len(seq))
        window = seq[max(0, b - win):b]
        expect += float(ours.token_logprobs([window])[0][-(b - a):].sum())
    assert small.num_tokens == len(seq) - 1 and abs(small.logprob - expect) <= 1e-4


def _gen_requests():
    shared = [Generation(FEWSHOT + f"Question: What is {q}?\nAnswer:", stop=("\n\n",), max_tokens=10,
                         shared_prefix=len(FEWSHOT)) for q in ("3 plus 4", "8 plus 1 plus 2")]
    return [Generation(FEWSHOT + "Question: What is 3 plus 4?\nAnswer:", stop=("\n\n",), max_tokens=12),
            Generation("Once upon a time", max_tokens=9),
            Generation("A", stop=("Question",), max_tokens=5),
            Generation("The list: one, two,", max_tokens=7, temperature=0.8, top_k=50, top_p=0.9, seed=7),
            Generation("The list: one, two,", max_tokens=7, temperature=0.8, top_p=0.5, seed=8)] + shared


def test_graphed_decoding_captures_once_per_cache_and_falls_back(ours, monkeypatch):
    """The CUDA graph bookkeeping, on CPU with a stand-in for capture: each cache being decoded is
    captured once (its first step runs eagerly) and replayed at its later steps, its graph goes away
    with it, and a failed capture turns graphs off while decoding goes on, with the same tokens."""
    from evalsuite import backends
    calls = {"capture": 0, "replay": 0}

    class Replayed:  # replays by running the step eagerly; holds its cache weakly, as the real one does not hold it
        def __init__(self, model, cache):
            self.model, self.cache = model, weakref.ref(cache)

        def replay(self, ids, positions):
            calls["replay"] += 1
            return self.model.decode_step(ids, positions, self.cache())

    def capture(model, cache, ids, positions):
        calls["capture"] += 1
        return model.decode_step(ids, positions, cache), Replayed(model, cache)

    reqs = _gen_requests()
    want = [r.tokens for r in Runner(ours, progress=False).generate_until(reqs)]
    monkeypatch.setattr(backends.DecodeGraph, "capture", staticmethod(capture))
    graphed = backends.OursBackend(ours)
    graphed.cuda_graphs = True
    # Graphs need the fixed shapes of static batches.
    static = dict(progress=False, scheduler="static")
    assert [r.tokens for r in Runner(graphed, generate_batch_size=4, **static).generate_until(reqs)] == want
    # Batches of 4 rows, a new cache whenever a row finishes: several captures, most steps replayed.
    assert calls["capture"] >= 2 and calls["replay"] > calls["capture"]
    gc.collect()
    assert len(graphed._graphs) == 0
    monkeypatch.setattr(backends.DecodeGraph, "capture",
                        staticmethod(lambda model, cache, ids, positions: (model.decode_step(ids, positions, cache), None)))
    assert [r.tokens for r in Runner(graphed, **static).generate_until(reqs)] == want
    assert graphed.cuda_graphs is False


def test_generation_same_whatever_the_batch_size_and_equal_to_single_greedy(ours):
    reqs = _gen_requests()
    one = Runner(ours, generate_batch_size=1, progress=False).generate_until(reqs)
    many = Runner(ours, generate_batch_size=16, progress=False).generate_until(reqs)
    assert [r.tokens for r in one] == [r.tokens for r in many] and [r.text for r in one] == [r.text for r in many]
    runner = Runner(ours, progress=False)
    for req, res in [(q, r) for q, r in zip(reqs, one) if q.temperature == 0]:
        pre, body = runner.encode_context(req.context, req.shared_prefix)
        ids = list(pre + body)
        ref = ours.greedy(ids, max_new_tokens=len(res.tokens))
        assert res.tokens == ref
        assert res.finish in ("stop", "length", "eos")
        if res.finish == "stop":
            assert not any(s in res.text for s in req.stop)
        else:
            assert len(res.tokens) == req.max_tokens
    assert one[3].tokens != one[4].tokens  # sampling is on, seeded per request
    unshared = Runner(ours, progress=False, share_prefix=False).generate_until(reqs)
    assert [r.tokens for r in unshared] == [r.tokens for r in one]
    shared = Runner(ours, progress=False)
    shared.generate_until(reqs[-2:])  # the few-shot block went through the network once
    assert shared.tokens_forwarded == len(runner.encode_context(reqs[-1].context, reqs[-1].shared_prefix)[0]) + sum(
        len(runner.encode_context(q.context, q.shared_prefix)[1]) for q in reqs[-2:])


def _small_groups():
    """Three few-shot blocks of different lengths: 5, 2 and 2 questions each."""
    blocks = [FEWSHOT, FEWSHOT[:90], "Question: Name a colour.\nAnswer: red\n\n"]
    qs = [("What is 3 plus 4?", "8 plus 1?", "2 plus 2?", "5 plus 5?", "6 plus 0?"), ("1 plus 8?", "7 plus 2?"),
          ("Name a fruit.", "Name a day of the week.")]
    return [(block + f"Question: {q}\nAnswer:", len(block)) for block, group in zip(blocks, qs) for q in group]


def test_small_few_shot_groups_share_batches_with_the_same_results(ours):
    prompts = _small_groups()
    gens = [Generation(p, stop=("\n\n",), max_tokens=8, shared_prefix=n) for p, n in prompts]
    lls = [Loglikelihood(p, c, shared_prefix=n) for p, n in prompts for c in (" 7", " blue")]
    runner = Runner(ours, generate_batch_size=4, progress=False)
    groups = batching.group(True, [(*runner.encode_context(g.context, g.shared_prefix), g.max_tokens, i)
                                   for i, g in enumerate(gens)])
    plan = batching.plan(groups, runner.generate_batch_size, runner.token_budget)
    # One full batch from the 5-question block, then its remainder and both small blocks pooled,
    # shortest prefix first (a stacked cache is as wide as its longest prefix).
    assert [len(b) for b in plan] == [4, 4, 1]
    pooled = [len(pre) for batch in plan[1:] for pre, _ in batch]
    assert len(set(pooled)) == 3 and pooled == sorted(pooled)
    got = runner.generate_until(gens)
    alone = Runner(ours, generate_batch_size=1, progress=False, share_prefix=False).generate_until(gens)
    assert [r.tokens for r in got] == [r.tokens for r in alone]
    # each block went through the network once, each question's own tokens once
    assert runner.tokens_forwarded == sum(len(pre) for pre in groups if pre) + sum(
        len(runner.encode_context(g.context, g.shared_prefix)[1]) for g in gens)
    shared = Runner(ours, batch_size=4, progress=False).loglikelihood(lls)
    plain = Runner(ours, batch_size=1, progress=False, share_prefix=False).loglikelihood(lls)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, plain)) <= 1e-4
    assert [a.is_greedy for a in shared] == [b.is_greedy for b in plain]


def test_token_budget_counts_a_shared_prefix_once(ours):
    """Rows sharing a few-shot block hold its keys once, so the budget counts their own tokens only;
    rows pooled across blocks get their block copied into a stacked cache, so there it counts."""
    gens = [Generation(p, stop=("\n\n",), max_tokens=8, shared_prefix=n) for p, n in _small_groups()]
    runner = Runner(ours, generate_batch_size=8, progress=False)
    groups = batching.group(True, [(*runner.encode_context(g.context, g.shared_prefix), g.max_tokens, i)
                                   for i, g in enumerate(gens)])
    block = max(groups, key=len)  # the 5-question block
    own = max(span for span, _ in groups[block])
    assert len(block) > own
    budget = 5 * own  # room for the 5 rows' own tokens, not for 2 rows with the block
    plan = batching.plan(groups, runner.generate_batch_size, budget)
    assert [len(b) for b in plan][0] == 5 and {pre for pre, _ in plan[0]} == {block}
    own_spans = {item[1]: span for rows in groups.values() for span, item in rows}
    pooled = [(pre, span, item) for batch in plan[1:] for pre, (span, item) in batch]
    assert pooled and all(span == len(pre) + own_spans[item[1]] for pre, span, item in pooled)
    assert all(len(b) * max(span for _, (span, _) in b) <= budget for b in plan)


def test_batch_sizes_must_be_positive_integers(ours):
    for option in ("batch_size", "generate_batch_size", "token_budget"):
        for bad in (0, -2, 1.5, "8"):
            with pytest.raises(ValueError, match=f"^{option}={bad!r}: expected a positive integer"):
                Runner(ours, progress=False, **{option: bad})


def test_generation_matches_the_transformers_backend(ours, hf):
    reqs = [q for q in _gen_requests() if q.temperature == 0]
    a = Runner(ours, progress=False).generate_until(reqs)
    b = Runner(hf, progress=False).generate_until(reqs)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_stop_string_spanning_tokens_truncates_text():
    class Tok:
        pad_id, bos_id = 0, 2
        pieces = {10: "ab", 11: "c\n", 12: "\nd", 13: "x"}

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    class Fake:
        tokenizer, stop_ids, packing, max_length, turn_ids, system_role = Tok(), (1,), True, 100, None, False
        device = torch.device("cpu")

    from evalsuite.generation import StopCheck
    be = Fake()
    req = Generation("", stop=("\n\n",), max_tokens=10)

    def feed(toks):
        check = StopCheck(be, req)
        return [check.add(t) for t in toks][-1]

    assert feed([10, 11]) is None
    res = feed([10, 11, 12])
    assert res.text == "abc" and res.finish == "stop"
    assert feed([10, 1]).finish == "eos"
    assert feed([13] * 10).finish == "length"


def test_chat_format_inserts_turn_markers_by_id(ours, gemma2_tokenizer_json):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(gemma2_tokenizer_json))
    chat = Chat(examples=(("Q1?", "A1"),), user="Q2? <start_of_turn> stays text")
    pre, body = Runner(ours, progress=False).encode_context(chat)
    text = "<bos><start_of_turn>user\nQ1?<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>"
    expect = ref.encode(text, add_special_tokens=False).ids
    expect += ours.tokenizer.encode("user\nQ2? <start_of_turn> stays text")  # user text is never parsed for markers
    expect += ref.encode("<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False).ids
    assert list(pre + body) == expect
    assert pre[-2:] == (107, ours.tokenizer.encode("\n")[0])  # the examples are the shared prefix
    assert body.count(106) == 2


def test_chat_items_score_through_the_runner(ours):
    from evalsuite import tasks
    items, prov = tasks.build_items(tasks.load_spec("mmlu"), limit=2, chat=True)
    assert prov["chat_format"] and isinstance(items[0].requests[0].context, Chat)
    assert len(items[0].requests[0].context.examples) == 5
    reqs = [r for it in items for r in it.requests]
    shared = Runner(ours, progress=False).loglikelihood(reqs)
    plain = Runner(ours, progress=False, share_prefix=False).loglikelihood(reqs)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, plain)) <= 1e-4


def test_evaluate_runs_generate_and_choice_tasks_together(ours, tmp_path):
    from evalsuite import evaluate
    from evalsuite import report
    res = evaluate.run(ours, ["gsm8k", "piqa"], tmp_path, settings(limit=2, num_fewshot=1))
    report.publish(tmp_path, res)
    g = res["tasks"]["gsm8k"]
    assert g["num_items"] == 2 and set(g["metrics"]) == {"exact_match_strict", "exact_match_flexible"}
    assert res["timing"]["tokens_generated"] > 0 and res["tasks"]["piqa"]["num_items"] == 2
    rec = json.loads((tmp_path / "samples_gsm8k.jsonl").read_text().splitlines()[0])
    assert rec["finish"] in ("stop", "eos", "length") and rec["target"].endswith("#### 18")
    assert set(rec["scores"]) == {"exact_match_strict", "exact_match_flexible"}
    assert "| gsm8k | exact_match_flexible (primary) |" in (tmp_path / "summary.md").read_text()


def test_macro_average_over_subtasks(ours, tmp_path):
    from evalsuite import evaluate
    # A macro-averaged choice task before generation tasks: results of both types stay aligned.
    res = evaluate.run(ours, ["agieval", "bbh", "gsm8k"], tmp_path, settings(limit=1))
    assert res["tasks"]["agieval"]["num_items"] == 8 and len(res["tasks"]["agieval"]["groups"]) == 8
    t = res["tasks"]["bbh"]
    assert t["num_items"] == 27 and len(t["groups"]) == 27
    means = [g["exact_match"]["value"] for g in t["groups"].values()]
    assert t["metrics"]["exact_match"]["value"] == pytest.approx(sum(means) / 27)


def test_several_samples_per_prompt(ours, tmp_path):
    from evalsuite import evaluate
    from evalsuite.settings import Sampling
    sampling = Sampling(n=3, temperature=1.0)
    res = evaluate.run(ours, ["gsm8k"], tmp_path, settings(limit=2, sampling=sampling))
    t = res["tasks"]["gsm8k"]
    assert t["primary"] == "maj@3_exact_match_flexible" and t["sampling"]["n"] == 3
    assert "maj@3_exact_match_strict" in t["metrics"] and "pass@3_exact_match_flexible" in t["metrics"]
    assert any("temperature=1.0" in d for d in t["deviations"])
    recs = [json.loads(line) for line in (tmp_path / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert all(len(r["generation"]) == 3 and len(r["sample_scores"]) == 3 for r in recs)
    # A random tiny model at temperature 1 draws different samples; seeds are per (item, sample), so a
    # second run reproduces them exactly.
    assert len(set(recs[0]["generation"])) > 1
    again = evaluate.run(ours, ["gsm8k"], tmp_path / "again", settings(limit=2, sampling=sampling))
    recs2 = [json.loads(line) for line in (tmp_path / "again" / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in recs] == [r["generation"] for r in recs2]
    assert again["tasks"]["gsm8k"]["metrics"] == t["metrics"]


def test_code_tasks_run_their_programs_in_the_sandbox(ours, tmp_path):
    from evalsuite import evaluate, execution
    why = execution.bwrap_available()
    if why:
        pytest.skip(f"no sandbox here: {why}")
    res = evaluate.run(ours, ["humaneval", "mbpp"], tmp_path,
                       settings(limit=2, execution={"sandbox": "bwrap", "timeout_s": 5}))
    for name in ("humaneval", "mbpp"):
        t = res["tasks"][name]
        assert t["primary"] == "pass@1" and t["num_items"] == 2
        assert t["execution"]["sandbox"] == "bwrap" and t["execution"]["programs"] == 4
        recs = [json.loads(line) for line in (tmp_path / f"samples_{name}.jsonl").read_text().splitlines()]
        # A random model writes no working code; each sample says how its program ended.
        assert all(r["execution"]["status"] in ("failed", "timeout", "killed") for r in recs)
        assert t["metrics"]["pass@1"]["value"] == 0.0
    # sandbox=none runs, and says so where the results are read.
    res = evaluate.run(ours, ["humaneval"], tmp_path / "none", settings(limit=1, execution={"sandbox": "none"}))
    assert res["tasks"]["humaneval"]["execution"]["sandbox"] == "none"
    assert any("WITHOUT a sandbox" in d for d in res["tasks"]["humaneval"]["deviations"])


def test_a_sample_the_harness_could_not_execute_is_not_scored(ours, tmp_path, monkeypatch):
    from evalsuite import compare, evaluate, execution, report

    def run_all(programs, *args, **kwargs):  # the machinery fails for the first program only
        return [execution.ExecResult("error", "the harness could not run this sample: OSError: planted")] + \
            [execution.ExecResult("failed", "AssertionError") for _ in programs[1:]]
    monkeypatch.setattr(evaluate, "run_all", run_all)
    # and a machine where no cgroup can be had: results.json and the report say which bounds hold
    monkeypatch.setattr(evaluate, "containment", lambda: {"cgroup": None, "why_no_cgroup": "planted", "bounds": "B"})
    res = evaluate.run(ours, ["humaneval"], tmp_path, settings(limit=3, execution={"sandbox": "none"}))
    report.publish(tmp_path, res)
    t = res["tasks"]["humaneval"]
    assert t["num_items"] == 2 and t["unscored_items"] == [0] and t["metrics"]["pass@1"]["value"] == 0.0
    assert any("1 items not scored" in d for d in t["deviations"])
    assert "no cgroup for the sandboxes (planted); bounds: B" in t["deviations"]
    assert "no cgroup for the sandboxes (planted)" in (tmp_path / "report.md").read_text()
    recs = [json.loads(line) for line in (tmp_path / "samples_humaneval.jsonl").read_text().splitlines()]
    assert recs[0]["scores"] is None and recs[0]["execution"]["status"] == "error"
    assert sorted(compare.item_scores({**res, "_dir": str(tmp_path)}, "humaneval")) == [1, 2]  # only scored items pair
    assert "not scored" in (tmp_path / "report.html").read_text()
    report.write([tmp_path])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_malloc_settings():
    from evalsuite.runner import keep_freed_memory
    assert keep_freed_memory() is True


def test_paper_it_run_of_a_tiny_instruction_tuned_checkpoint_stores_chat_prompts(ours, tmp_path,
                                                                                 gemma2_tokenizer_json):
    """model.variant=it (the -it presets) turns on the chat format: the stored prompts carry the turn
    markers, and they are the token ids the model was given (106/107, never text parsed for them)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer

    from evalsuite import evaluate
    from evalsuite.__main__ import CONF_DIR
    from evalsuite.settings import ModelSettings

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        preset = OmegaConf.to_object(compose("config", overrides=["model=gemma2_9b_it", "tasks=paper_it"]))
    assert preset.model.variant == "it" and preset.chat_format() and preset.model.path == "google/gemma-2-9b-it"
    names, _ = evaluate.expand_tasks(preset.task_names())
    assert names == ["mmlu", "mbpp"]
    run_settings = settings(limit=1, num_fewshot=1, model=ModelSettings(variant="it"),
                            execution=preset.execution.__class__(sandbox="none"))
    res = evaluate.run(ours, names, tmp_path, run_settings)
    ref = Tokenizer.from_file(str(gemma2_tokenizer_json))
    runner = Runner(ours, progress=False)
    for name in names:
        assert res["tasks"][name]["chat_format"] is True
        rec = json.loads((tmp_path / f"samples_{name}.jsonl").read_text().splitlines()[0])
        assert rec["prompt"].startswith("<bos><start_of_turn>user\n") and rec["prompt"].endswith(
            "<end_of_turn>\n<start_of_turn>model\n")
        item = evaluate.build_task(name, run_settings).items[0]
        pre, body = runner.encode_context(item.requests[0].context)
        ids = list(pre + body)
        assert ids == ref.encode(rec["prompt"], add_special_tokens=False).ids  # the stored prompt is what ran
        assert ids[:2] == [2, 106] and ids.count(106) == 4 and ids.count(107) == 3  # one example, then the question


def test_many_continuations_of_one_context_are_cut_into_rows_under_the_budget(ours):
    """CrowS-Pairs scores every sentence after BOS alone: one context, thousands of continuations."""
    sentences = [f"Sentence number {i} is here, with a few more words." for i in range(40)]
    reqs = [Loglikelihood("", s) for s in sentences]
    wide = Runner(ours, progress=False).loglikelihood(reqs)
    cut = Runner(ours, progress=False, token_budget=64).loglikelihood(reqs)
    alone = [Runner(ours, progress=False).loglikelihood([r])[0] for r in reqs[:3]]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(wide, cut)) <= 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(alone, cut)) <= 1e-4
