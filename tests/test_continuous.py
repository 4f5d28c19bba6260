"""Continuous batching (generation.ContinuousDecoder) against static batches, and the incremental
stop-string check, on a tiny random Gemma 2 with the real 256000-piece tokenizer."""

from __future__ import annotations

import random

import pytest

from evalsuite import generation
from evalsuite.backends import OursBackend
from evalsuite.model import load_model
from evalsuite.requests import Generation
from evalsuite.runner import Runner

BLOCKS = ["".join(f"Question: What is {i} plus {i}?\nAnswer: {2 * i}\n\n" for i in range(2, 7)),
          "Question: Name a colour.\nAnswer: red\n\n", "Q: 1 + 1?\nA: 2\n\n" * 3]


@pytest.fixture(scope="module")
def ours(tiny_gemma2_folder):
    return load_model(str(tiny_gemma2_folder))


def _requests() -> list[Generation]:
    """Prompts of three few-shot blocks (6, 2 and 1 questions), prompts without one, greedy and
    sampled, of many lengths and stopping rules, so rows finish at many different steps."""
    reqs = []
    for block, n in zip(BLOCKS, (6, 2, 1)):
        for q in range(n):
            reqs.append(Generation(block + f"Question: What is {q} times {q + 3}?" + " Think." * q + "\nAnswer:",
                                   stop=("\n\n", "Question"), max_tokens=3 + 4 * q, shared_prefix=len(block)))
    reqs += [Generation("Once upon a time", max_tokens=13), Generation("A", stop=("e",), max_tokens=9),
             Generation("The list: one, two,", max_tokens=11, temperature=0.8, top_k=50, top_p=0.9, seed=7),
             Generation(BLOCKS[0] + "Question: 5 plus 5?\nAnswer:", max_tokens=6, temperature=1.0, seed=3,
                        shared_prefix=len(BLOCKS[0])),
             Generation("x" * 40, max_tokens=1)]
    return reqs


def _decode(ours, reqs, **kw):
    return Runner(ours, progress=False, **kw).generate_until(reqs)


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 64])
def test_continuous_equals_static_whatever_the_slots_and_order(ours, slots):
    reqs = _requests()
    want = _decode(ours, reqs, scheduler="static", generate_batch_size=16)
    order = list(range(len(reqs)))
    random.Random(slots).shuffle(order)
    got = _decode(ours, [reqs[i] for i in order], generate_batch_size=slots)
    got = [got[order.index(i)] for i in range(len(reqs))]
    assert [(r.tokens, r.text, r.finish) for r in got] == [(r.tokens, r.text, r.finish) for r in want]
    assert len({len(r.tokens) for r in want}) >= 5  # rows do finish at many different steps


def test_rows_enter_freed_slots_and_shared_prefix_is_run_once(ours, monkeypatch):
    """With 3 slots and 6 prompts of one few-shot block, waiting prompts are prefilled as rows finish
    (more than one admission), the block's KV is computed once and shared, and the results are the
    static scheduler's."""
    reqs = [r for r in _requests() if r.context.startswith(BLOCKS[0]) and r.temperature == 0]
    admissions = []
    real = generation.ContinuousDecoder._admit

    def admit(self, queue, free, cache, live, next_pos):
        admissions.append((len(queue), self.shared is not None))
        return real(self, queue, free, cache, live, next_pos)

    monkeypatch.setattr(generation.ContinuousDecoder, "_admit", admit)
    runner = Runner(ours, progress=False, generate_batch_size=3)
    got = runner.generate_until(reqs)
    assert len(admissions) >= 3 and all(shared for _, shared in admissions)
    prefix = len(runner.encode_context(reqs[0].context, reqs[0].shared_prefix)[0])
    bodies = sum(len(runner.encode_context(q.context, q.shared_prefix)[1]) for q in reqs)
    assert runner.tokens_forwarded == prefix + bodies
    want = _decode(ours, reqs, scheduler="static")
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_kv_budget_caps_the_slots(ours, monkeypatch):
    seen = []
    real = generation.ContinuousDecoder.__init__

    def init(self, be, slots, *a, **k):
        seen.append(slots)
        real(self, be, slots, *a, **k)

    monkeypatch.setattr(generation.ContinuousDecoder, "__init__", init)
    reqs = [Generation(f"Count: {i}", max_tokens=20) for i in range(8)]
    per_token = OursBackend(ours).kv_bytes_per_token
    want = _decode(ours, reqs, scheduler="static")
    got = _decode(ours, reqs, kv_cache_gib=3 * 30 * per_token / 2**30)  # room for 3 rows of <= 30 tokens
    assert seen == [3] and [r.tokens for r in got] == [r.tokens for r in want]


class _Tok:
    def __init__(self, tok):
        self.tokenizer, self.stop_ids = tok, (1,)


def _full_decode_reference(be, req, toks):
    """What a full decode after every token decides: the first step whose text holds a stop string."""
    for n in range(1, len(toks) + 1):
        if toks[n - 1] in be.stop_ids:
            return be.tokenizer.decode(toks[:n - 1]), toks[:n - 1], "eos"
        text = be.tokenizer.decode(toks[:n])
        hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if hits:
            return text[:min(hits)], toks[:n], "stop"
        if n >= req.max_tokens:
            return text, toks[:n], "length"
    return None


@pytest.mark.parametrize("text, stop", [
    ("Answer: 42\n\nQuestion: next", ("\n\n",)),
    ("é😀 中文 then the end marker ### and more", ("###", "😀 中")),  # byte-fallback pieces around stops
    ("=" * 60 + "STOP here", ("==STOP",)),  # a long piece before the stop
    ("no stop string in this text at all, just words", ("zzz",)),
    ("abc" * 30 + "Q:", ("Q:", "c" * 4)),
])
def test_incremental_stop_check_decides_as_a_full_decode_at_every_step(ours, text, stop):
    be = _Tok(ours.tokenizer)
    toks = ours.tokenizer.encode(text)
    req = Generation("", stop=stop, max_tokens=len(toks))
    check = generation.StopCheck(be, req)
    for tok in toks:
        res = check.add(tok)
        if res is not None:
            break
    assert res is not None
    assert (res.text, res.tokens, res.finish) == _full_decode_reference(be, req, toks)
