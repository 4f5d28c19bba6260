"""Answer extraction and scoring of generated answers, on hand-worked cases."""

from __future__ import annotations

import pytest

from evalsuite import scorers, tasks


@pytest.mark.parametrize("text, strict, flexible", [
    (" She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", "18"),
    (" The answer is $1,234.50.", scorers.INVALID, "1234.50"),  # no "####": strict fails, flexible reads it
    (" So 5 apples.\n#### 5.\n\n", "5", "5"),  # trailing period dropped
    (" Total: -7 degrees\n#### -7", "-7", "-7"),
    (" #### 12 and then 13 more", "12", "13"),  # flexible takes the last number
    (" I do not know.", scorers.INVALID, scorers.INVALID),
    (" it costs $3", scorers.INVALID, "3"),  # "$3" is a 2-character span; "$" then dropped
])
def test_gsm8k_extraction(text, strict, flexible):
    assert scorers.gsm8k_extract(text) == {"strict": strict, "flexible": flexible}


def test_gsm8k_reference_and_score():
    doc = {"question": "?", "answer": "Work: 1,000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}
    assert scorers.gsm8k_reference(doc["answer"]) == "1234"
    assert scorers.gsm8k(" 1000 + 234 = 1234\n#### 1,234", doc) == {"exact_match_strict": 1.0,
                                                                     "exact_match_flexible": 1.0}
    assert scorers.gsm8k(" It is 1234, not 1235", doc) == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}
    assert scorers.gsm8k(" It is 1235, no, 1234", doc) == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}


def test_generate_task_spec_builds_generation_requests():
    items, prov = tasks.build_items(tasks.load_spec("gsm8k"), limit=3)
    req = items[0].requests[0]
    assert req.stop == ("Question:", "</s>", "<|im_end|>") and req.max_tokens == 256
    assert req.context.count("Question:") == 6 and req.context.endswith("\nAnswer:")
    assert req.context.startswith("Question: ")  # no description line for GSM8K
    assert items[0].gold.endswith("#### 18") and prov["fewshot_file"] == "gsm8k/train.jsonl.gz"
    assert len({it.requests[0].context.split("Question: ")[-1] for it in items}) == 3
    # One shared few-shot block: everything before the last "Question:" is the same for all items.
    assert len({it.requests[0].context.rsplit("Question: ", 1)[0] for it in items}) == 1


_GEN = ("name: bad\nversion: 1\npaper_row: a row\ndata: {file: gsm8k/test.jsonl.gz}\nfields: [question, answer]\n"
        "fewshot: {count: 0}\nkind: generate\nprompt: 'Q'\ntarget: 'A'\ngeneration: {max_tokens: 4}\nscorer: gsm8k\n"
        "metrics: [exact_match_strict]\nprimary: exact_match_strict\n")


@pytest.mark.parametrize("spec, message", [
    (_GEN.replace("scorer: gsm8k", "scorer: gsm9k"), "scorer='gsm9k', expected one of .*gsm8k"),
    ("name: bad\nversion: 1\npaper_row: a row\ndata: {file: gsm8k/test.jsonl.gz}\nfields: [question]\n"
     "fewshot: {count: 0}\nkind: multiple_choice\nprompt: 'Q'\nchoices: '[]'\ngold: '0'\nprompt: 'again'\n"
     "metrics: [acc]\nprimary: acc\n", "bad/task.yaml: line 11: field 'prompt' is given twice"),
    # a misspelt key would silently change the protocol: refused, with the closest valid name
    (_GEN.replace("fewshot: {count: 0}", "fewshot: {count: 0, smae: subject}"),
     r"bad/task.yaml: fewshot: unknown key 'smae'; did you mean 'same'\?"),
    (_GEN.replace("generation: {max_tokens: 4}", "generation: {max_tokens: 4, stops: [x]}"),
     r"generation: unknown key 'stops'; did you mean 'stop'\?"),
    (_GEN + "macroby: task\n", r"unknown key 'macroby'; did you mean 'macro_by'\?"),
    (_GEN.replace("primary: exact_match_strict", "primary: exact_match_flexible"),
     r"primary='exact_match_flexible' is not among metrics \['exact_match_strict'\]"),
    (_GEN.replace("name: bad", "name: gsm8k"), "name='gsm8k', expected the folder's name 'bad'"),
    (_GEN.replace("max_tokens: 4", "max_tokens: many"), "generation: max_tokens: expected int, got 'many'"),
    (_GEN.replace("version: 1\n", ""), "missing key 'version'"),
    (_GEN.replace("kind: generate", "kind: ranking"), "kind='ranking', expected one of"),
    (_GEN.replace("prompt: 'Q'\n", ""), "a generate task needs field 'prompt'"),
])
def test_bad_task_spec_is_a_clear_error(tmp_path, monkeypatch, spec, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "task.yaml").write_text(spec)
    monkeypatch.setattr(tasks, "TASKS_DIR", tmp_path)
    tasks.load_spec.cache_clear()
    try:
        with pytest.raises(tasks.TaskError, match=message):
            tasks.load_spec("bad")
    finally:
        tasks.load_spec.cache_clear()


@pytest.mark.parametrize("text, refs, hit", [
    (" The Beatles", ["Beatles"], 1.0),  # article and case
    ("  Baker, California!", ["Baker California"], 1.0),  # punctuation, spacing
    (" 14 December 1972", ["14 December 1972 UTC", "December 1972"], 0.0),  # exact, not contains
    (" December 1972", ["14 December 1972 UTC", "December 1972"], 1.0),  # any reference
    (" an apple a day", ["apple day"], 1.0),
    (" theatre", ["the atre"], 0.0),  # "the" only as a word
    (" ‘Ulysses’", ["Ulysses"], 1.0),  # curly quotes are punctuation
])
def test_short_answer_exact_match(text, refs, hit):
    assert scorers.exact_match_any(text, refs) == hit


def test_nq_and_triviaqa_read_their_reference_fields():
    assert scorers.nq_open(" Bob Russell", {"answer": ["Bobby Scott", "Bob Russell"]}) == {"exact_match": 1.0}
    doc = {"answer": {"value": "The Thames", "aliases": ["Thames", "River Thames", "The Thames"]}}
    assert scorers.triviaqa(" river thames", doc) == {"exact_match": 1.0}
    assert scorers.triviaqa(" Seine", doc) == {"exact_match": 0.0}


def test_triviaqa_builds_from_hub_schema_rows(monkeypatch):
    """TriviaQA has no local copy: the hub path is exercised with hand-made rows in the hub schema."""
    from evalsuite import data

    def row(i):
        return {"question": f"Which river flows through city {i}", "question_id": f"q{i}",
                "answer": {"value": f"River {i}", "aliases": [f"River {i}", f"R{i}"], "type": "WikipediaEntity"}}

    calls = []

    def fake_hub(hub_id, config, split, revision, fields):
        calls.append((hub_id, config, split))
        rows = [row(i) for i in range(10 if split == "train" else 3)]
        return data.Split(file=f"hub:{hub_id}/{config}/{split}", rows=rows, sha256="0" * 64, entry={})

    monkeypatch.setattr(data, "load_hub", fake_hub)
    items, prov = tasks.build_items(tasks.load_spec("triviaqa"), source="hub")
    assert ("mandarjoshi/trivia_qa", "rc.nocontext", "validation") in calls
    assert ("mandarjoshi/trivia_qa", "rc.nocontext", "train") in calls and not prov["deviations"]
    ctx = items[0].requests[0].context
    assert ctx.count("\nAnswer: River ") == 5 and ctx.endswith("Question: Which river flows through city 0?\nAnswer:")
    assert items[0].requests[0].stop == ("\n", ".", ",")
    with pytest.raises(tasks.TaskError, match="no local copy.*data.source=hub"):
        tasks.build_items(tasks.load_spec("triviaqa"))


@pytest.mark.parametrize("text, answer", [
    (" A = True. So the answer is True.", "True"),
    (" (A) is wrong. So the answer is (B).", "(B)"),
    (" So the answer is } ] >.", "} ] >"),
    (" the answer is 5. Wait, no. So the answer is -219.", "-219"),  # the last statement counts
    (" So The Answer Is yes", "yes"),
    (" I think it is (C)", scorers.INVALID),
])
def test_bbh_extraction(text, answer):
    assert scorers.bbh_extract(text) == answer


def test_bbh_exact_match_and_subtask_limit():
    assert scorers.bbh(" So the answer is (B).", {"target": "(B)"}) == {"exact_match": 1.0}
    assert scorers.bbh(" So the answer is B.", {"target": "(B)"}) == {"exact_match": 0.0}
    items, prov = tasks.build_items(tasks.load_spec("bbh"), limit=2)
    assert len(items) == 54 and len({it.doc["task"] for it in items}) == 27  # limit is per subtask
    assert prov["num_fewshot"] == 3 and prov["fewshot_file"] == "bbh/cot_prompts.jsonl.gz"
    ctx = items[0].requests[0].context
    assert not ctx.startswith("BENCHMARK DATA") and ctx.count("\n\nQ: ") == 4  # canary dropped; 3 shots, then the question
    assert ctx.endswith("Q: not ( True ) and ( True ) is\nA: Let's think step by step.")


@pytest.mark.parametrize("pred, gold, em, f1", [
    (["2"], ["2.0"], 1.0, 1.0),  # numbers compared as floats
    (["the Eagles"], ["Eagles"], 1.0, 1.0),  # articles
    (["John Smith"], ["Smith"], 0.0, 0.67),  # P 1/2, R 1
    (["7 yards"], ["17"], 0.0, 0.0),  # gold has a number the prediction lacks
    (["17 yards"], ["17"], 0.0, 0.67),
    (["Tom and Jerry"], ["Tom", "Jerry"], 0.0, 0.25),  # one span aligned to one of two gold spans
    (["Jerry", "Tom"], ["Tom", "Jerry"], 1.0, 1.0),  # order of spans does not matter
    (["twenty-two"], ["twenty two"], 1.0, 1.0),  # hyphens split tokens
    (["Smith's"], ["smiths"], 1.0, 1.0),  # punctuation, case
])
def test_drop_em_f1(pred, gold, em, f1):
    assert scorers.drop_em_f1(pred, gold) == (em, f1)


def test_drop_reads_answer_spans():
    doc = {"answers_spans": {"spans": ["Tom", "Jerry"], "types": ["span", "span"]}}
    assert scorers.drop(" Tom\n", doc) == {"exact_match": 0.0, "f1": 0.5}


def test_drop_local_copy_scores_against_every_accepted_answer():
    # ref_text: the accepted answers joined by "|"; a date's empty fields leave blanks, dropped
    doc = {"completion": " 50.6", "ref_text": "50.6|49.7|  March  1995"}
    assert scorers.drop_golds(doc) == [["50.6"], ["49.7"], ["March 1995"]]
    assert scorers.drop(" 49.7", doc) == {"exact_match": 1.0, "f1": 1.0}
    assert scorers.drop(" March 1995 or so", doc)["f1"] == 0.67  # P 2/4, R 1, rounded to 2 places as officially
    assert scorers.drop(" 51", doc) == {"exact_match": 0.0, "f1": 0.0}  # numbers must agree


def test_drop_local_items_use_the_evaluation_split_minus_the_item():
    items, prov = tasks.build_items(tasks.load_spec("drop"), limit=3)
    assert prov["data_status"] == "derived" and any("minus the item" in d for d in prov["deviations"])
    assert all(it.index not in it.fewshot_indices and len(it.fewshot_indices) == 3 for it in items)
    ctx = items[0].requests[0].context
    assert ctx.count("Passage: ") == 4 and items[0].gold == "under the age of 18 and 25 to 44 and 45 to 64"


def test_drop_builds_from_hub_schema_rows(monkeypatch):
    from evalsuite import data

    def fake_hub(hub_id, config, split, revision, fields):
        assert hub_id == "ucinlp/drop" and config is None
        rows = [{"section_id": "s", "query_id": f"{split}{i}", "passage": f"Passage {i}.",
                 "question": f"How many {i}?", "answers_spans": {"spans": [str(i), "x"], "types": ["number", "span"]}}
                for i in range(6 if split == "train" else 2)]
        return data.Split(file=f"hub:{hub_id}/{split}", rows=rows, sha256="0" * 64, entry={})

    monkeypatch.setattr(data, "load_hub", fake_hub)
    items, _ = tasks.build_items(tasks.load_spec("drop"), source="hub")
    ctx = items[1].requests[0].context
    assert ctx.count("Passage ") == 4 and ctx.endswith("Passage: Passage 1.\nQuestion: How many 1?\nAnswer:")
    assert ", x\n\n" in ctx  # exemplar answers: spans joined by ", "
    assert scorers.drop(" 1", items[1].doc)["f1"] == 0.5


@pytest.mark.parametrize("text, answer", [
    (" so $x \\in \\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$.", "[2,5)"),
    (" Final Answer: The final answer is $\\frac12$. I hope it is correct.", "\\frac{1}{2}"),  # TeX shorthand
    (" The final answer is 10,000 dollars.", "10000"),  # units and thousands separators
    (" Thus $x = \\boxed{\\frac{\\sqrt{3}}{2}}$ and we stop.", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    (" angle is \\boxed{5^\\circ}", "5"),
    (" The final answer is $\\text{(B)}$.", "(B)"),
    (" no answer here", scorers.INVALID),
])
def test_math_extraction(text, answer):
    assert scorers.math_extract(text) == answer


def test_math_scores_against_the_final_answer_field():
    doc = {"answer": "\\frac{1}{2}", "solution": "... \\boxed{\\frac{1}{2}}"}
    assert scorers.math(" Final Answer: The final answer is $\\frac{1}{2}$.", doc) == {"exact_match": 1.0}
    assert scorers.math(" Final Answer: The final answer is $0.5$.", doc) == {"exact_match": 0.0}  # strings only
    items, prov = tasks.build_items(tasks.load_spec("math"), limit=1)
    ctx = items[0].requests[0].context
    assert ctx.count("Final Answer: The final answer is") == 4 and ctx.endswith("have?\n\nSolution:")
    assert prov["fewshot_file"] == "tasks/math/task.yaml#fewshot.examples" and not prov["deviations"][:-1]


def test_agieval_english_subsets_with_their_published_examples():
    items, prov = tasks.build_items(tasks.load_spec("agieval"), limit=2)
    assert len(items) == 16 and prov["num_fewshot"] == "3-5"
    by: dict = {}
    for it in items:
        by.setdefault(it.doc["task"], it)  # the first item of each subset
    assert set(by) == {"aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage",
                       "sat-math"}
    shots = {t: it.requests[0].context.count("The answer is therefore ") for t, it in by.items()}
    assert shots["aqua-rat"] == 5 and shots["sat-math"] == 5 and shots["lsat-ar"] == 3
    sat_en, without = by["sat-en"].requests[0].context, by["sat-en-without-passage"].requests[0].context
    assert len(without) < len(sat_en) / 2  # the borrowed sat-en examples lose their passages
    it = by["sat-math"]
    assert it.choices == ["A", "B", "C", "D"] and it.gold == 3 and it.requests[it.gold].continuation == " D"
    assert it.requests[0].shared_prefix > 0 and it.requests[0].context.endswith("The answer is therefore")
    assert " \n" not in it.requests[0].context  # examples laid out exactly as the question


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (5, 2, 1, 2 / 5),                      # pass@1 is the fraction correct
    (5, 2, 2, 1 - (3 * 2) / (5 * 4)),      # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 1, 10, 1.0),                      # n - c < k: some draw of k always holds the correct one
    (4, 0, 3, 0.0),
])
def test_pass_at_k_unbiased_estimator(n, c, k, expected):
    from evalsuite.metrics import pass_at_k
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    from evalsuite.metrics import pass_at_k
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)


def test_majority_vote_ignores_samples_without_an_answer():
    from evalsuite.metrics import majority_index
    inv = scorers.INVALID
    assert majority_index(["3", "4", "4", "3"]) == 0  # tie: the answer seen first
    assert majority_index(["3", "4", "4"]) == 1
    assert majority_index([inv, inv, "7"], inv) == 2  # one answer beats two unanswered samples
    assert majority_index([inv, inv], inv) == 0


def test_maj_at_n_and_pass_at_k_from_samples():
    from evalsuite.kinds import KINDS, Item
    from evalsuite.requests import GenerationResult
    from evalsuite.settings import Sampling
    spec, kind = tasks.load_spec("gsm8k"), KINDS["generate"]
    doc = {"question": "?", "answer": "#### 12"}
    item = Item("gsm8k", 0, doc, [], "#### 12", [], "?")
    texts = [" So 11.\n#### 11", " It is 12.\n#### 12", " 10 + 2 = 12", " We get 11 apples"]
    s = Sampling(n=4, temperature=0.7)
    assert kind.metric_names(spec, s) == ["exact_match_strict", "exact_match_flexible", "maj@4_exact_match_strict",
                                    "maj@4_exact_match_flexible", "pass@4_exact_match_strict",
                                    "pass@4_exact_match_flexible"]
    got = kind.score(spec, item, [GenerationResult(t) for t in texts], None, s).scores
    # strict answers: 11, 12, -, - -> the two answered samples tie, 11 came first -> wrong.
    # flexible answers: 11, 12, 12, 11 -> tie, 11 first -> wrong; 1 strict and 2 flexible of 4 correct.
    assert got == {"exact_match_strict": 0.25, "exact_match_flexible": 0.5, "maj@4_exact_match_strict": 0.0,
                   "maj@4_exact_match_flexible": 0.0, "pass@4_exact_match_strict": 1.0,
                   "pass@4_exact_match_flexible": 1.0}
    texts[0] = " So 12.\n#### 12"
    got = kind.score(spec, item, [GenerationResult(t) for t in texts], None, s).scores
    assert got["maj@4_exact_match_strict"] == 1.0 and got["maj@4_exact_match_flexible"] == 1.0
    assert kind.primary(spec, s) == "maj@4_exact_match_flexible"
    assert kind.primary(spec, Sampling()) == "exact_match_flexible"


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 4}, "generation.n=4 with greedy decoding"),
    ({"n": 0}, "generation.n=0: expected a whole number >= 1"),
    ({"temperature": -1.0}, "generation.temperature=-1.0"),
    ({"top_p": 1.5}, "generation.top_p=1.5"),
])
def test_sampling_settings_are_checked(kwargs, message):
    from evalsuite.settings import Sampling
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
