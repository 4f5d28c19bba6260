"""IFEval: the instruction checkers (lm-evaluation-harness's port of the official ones) against the
official definitions, on hand-made responses for every instruction type: one that follows the
instruction and one that does not."""

from __future__ import annotations

import pytest

from evalsuite import scorers, tasks

EN = "this is a plain english sentence about the weather and the garden today"

# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("punctuation:no_comma", {}, "No commas in here at all.", "One, two."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 4}, "one two three",
     "one two three four"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3}, "one two three", "one two"),
    ("keywords:forbidden_words", {"forbidden_words": ["dog"]}, "I like cats.", "My Dog barks."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*only one*"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat, cat and Cat.",
     "cat and cat"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hello."}, "Say hello. Hello!", "Hello! Say hello."),
    ("startend:quotation", {}, '"wrapped in quotes"', "not wrapped"),
    ("change_case:english_lowercase", {}, EN, EN.capitalize().replace("english", "English")),
    ("keywords:existence", {"keywords": ["garden", "rain"]}, "Rain fell on the garden.", "Rain fell."),
    ("detectable_format:title", {}, "<<A Title>>\nThe text.", "A Title\nThe text."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zig zag",
     "zig"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* first\n- second\n- third"),
    ("language:response_language", {"language": "en"}, "The weather is lovely and the garden is green today.",
     "Le temps est magnifique et le jardin est vert aujourd'hui."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
     "Dear [name]."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", "One part."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?",
     "Any other questions? Done."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\nP.S. One more thing.", "Body only."),
    ("change_case:english_capital", {}, EN.upper(), EN),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one answer."),
    ("detectable_format:json_format", {}, '{"answer": 42}', "answer: 42"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro.\nSection 2\nMore.", "Section 1\nIntro only."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First we start.\n\nThen we finish.", "First we start.\n\nAfter that we finish."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Perhaps, who knows."),
]


def _doc(instruction, kwargs):
    return {"key": 0, "prompt": "Say hello.", "instruction_id_list": [instruction], "kwargs": [kwargs]}


@pytest.mark.parametrize("instruction, kwargs, follows, breaks", CASES, ids=[c[0] for c in CASES])
def test_checker_against_the_official_definition(instruction, kwargs, follows, breaks):
    ok, bad = scorers.ifeval(follows, _doc(instruction, kwargs)), scorers.ifeval(breaks, _doc(instruction, kwargs))
    assert ok["prompt_level_strict"] == 1.0 and ok["followed_strict"] == 1.0 and ok["instructions"] == 1.0
    assert bad["prompt_level_strict"] == 0.0 and bad["followed_strict"] == 0.0


def test_every_instruction_type_of_the_data_is_checked_here():
    items, _ = tasks.build_items(tasks.load_spec("ifeval"))
    types = {i for it in items for i in it.doc["instruction_id_list"]}
    assert len(items) == 541 and types == {c[0] for c in CASES} | {c[0] for c in NEEDS_PUNKT}


# The two checkers that tokenize with nltk's punkt model, which nltk fetches on first use.
NEEDS_PUNKT = [
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One sentence. Two sentences.", "One. Two. Three. Four."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "HELLO big WORLD", "HELLO big world"),
]


@pytest.mark.parametrize("instruction, kwargs, follows, breaks", NEEDS_PUNKT, ids=[c[0] for c in NEEDS_PUNKT])
def test_punkt_checkers_check_or_leave_the_item_unscored_never_failed(instruction, kwargs, follows, breaks):
    try:
        got = scorers.ifeval(follows, _doc(instruction, kwargs))
    except scorers.CannotScore as e:  # offline: the punkt model is missing
        assert "punkt" in str(e)
    else:
        assert got["prompt_level_strict"] == 1.0
        assert scorers.ifeval(breaks, _doc(instruction, kwargs))["prompt_level_strict"] == 0.0


def test_loose_accepts_a_response_once_its_first_line_is_dropped():
    doc = _doc("change_case:english_lowercase", {})
    got = scorers.ifeval("Sure! Here it is:\n" + EN, doc)
    assert got["prompt_level_strict"] == 0.0 and got["prompt_level_loose"] == 1.0


def test_prompt_and_instruction_levels_of_several_instructions():
    doc = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
           "kwargs": [{}, {}]}
    got = scorers.ifeval("no quotes, and a comma", doc)
    assert got == {"prompt_level_strict": 0.0, "prompt_level_loose": 0.0, "instructions": 2.0,
                   "followed_strict": 0.0, "followed_loose": 0.0}
    got = scorers.ifeval("no quotes and no comma", doc)
    assert got["prompt_level_strict"] == 0.0 and got["followed_strict"] == 1.0


def test_instruction_level_is_followed_over_all_instructions(tmp_path):
    """Two prompts, 1 of 1 and 1 of 3 instructions followed: instruction level 2/4, not the mean of 1 and 1/3."""
    from evalsuite import kinds
    from evalsuite.settings import Sampling
    spec = tasks.load_spec("ifeval")
    values = {"instructions": [1.0, 3.0], "followed_strict": [1.0, 1.0], "followed_loose": [1.0, 2.0]}
    got = kinds.KINDS["generate"].ratio_metrics(spec, values, [{}, {}])
    assert got == {"inst_level_strict": 0.5, "inst_level_loose": 0.75}
    assert "inst_level_strict" not in kinds.KINDS["generate"].metric_names(spec, Sampling())


def test_ifeval_task_end_to_end(tmp_path):
    import json

    from evalsuite import evaluate
    from evalsuite.requests import GenerationResult
    from evalsuite.settings import Settings

    class Lowercase:
        def generate_until(self, requests):
            return [GenerationResult("a short reply with no commas", [1], "eos") for _ in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        loglikelihood_rolling = loglikelihood

        def describe(self):
            return {"backend": "scripted", "source": "test", "fingerprint_sha256": None}

        def version_key(self):
            return {"backend": "scripted"}

    res = evaluate.run(Lowercase(), ["ifeval"], tmp_path, Settings(limit=12, cache="off", progress=False))
    t = res["tasks"]["ifeval"]
    recs = [json.loads(line) for line in (tmp_path / "samples_ifeval.jsonl").read_text().splitlines()]
    scored = [r for r in recs if r["scores"] is not None]
    assert t["num_items"] == len(scored) and len(t.get("unscored_items", [])) == len(recs) - len(scored)
    for r in recs:
        if r["scores"] is None:
            assert "punkt" in r["unscored_reason"] and {i for i in r["doc"]["instruction_id_list"]} & {
                c[0] for c in NEEDS_PUNKT}
    followed = sum(r["scores"]["followed_strict"] for r in scored)
    assert t["metrics"]["inst_level_strict"]["value"] == pytest.approx(
        followed / sum(r["scores"]["instructions"] for r in scored))
    assert t["metrics"]["prompt_level_strict"]["value"] == pytest.approx(
        sum(r["scores"]["prompt_level_strict"] for r in scored) / len(scored))
