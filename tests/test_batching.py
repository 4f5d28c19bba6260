"""Batch planning on lengths alone (no model): prefix sharing, the token budget, pooling of small groups."""

from __future__ import annotations

from evalsuite import batching


def _rows(prefix_len: int, n: int, rest: int, follow: int, tag0: int, token: int = 1):
    pre = (token,) * prefix_len
    return [(pre, (9,) * (rest + i), follow, tag0 + i) for i in range(n)]


def test_a_prefix_used_twice_is_shared_once_used_alone_is_not():
    rows = _rows(50, 3, 4, 2, 0) + _rows(40, 1, 5, 1, 10, token=2)
    groups = batching.group(True, rows)
    shared = (1,) * 50
    assert set(groups) == {(), shared}
    assert [span for span, _ in groups[shared]] == [6, 7, 8]  # own tokens and what follows, no prefix
    ((span, (tokens, tag)),) = groups[()]
    assert span == 40 + 5 + 1 and len(tokens) == 45 and tag == 10  # the lone prefix runs as ordinary tokens
    unshared = batching.group(False, rows)  # sharing off (or a backend without packing)
    assert set(unshared) == {()} and sorted(s for s, _ in unshared[()]) == [45 + 1, 56, 57, 58]


def test_batches_respect_rows_and_budget_and_run_longest_first():
    groups = {(): [(span, ((9,) * span, i)) for i, span in enumerate([3, 10, 7, 2, 8])]}
    plan = batching.plan(groups, most=2, budget=1000)
    assert [[s for _, (s, _) in b] for b in plan] == [[10, 8], [7, 3], [2]]
    tight = batching.plan(groups, most=8, budget=20)  # rows x widest <= 20
    assert all(len(b) * max(s for _, (s, _) in b) <= 20 for b in tight)
    assert sorted(item[1] for b in tight for _, (_, item) in b) == list(range(5))  # every row once


def test_partial_batches_of_small_groups_are_pooled_shortest_prefix_first():
    rows = _rows(30, 5, 3, 1, 0) + _rows(10, 2, 3, 1, 10, token=2) + _rows(20, 2, 3, 1, 20, token=3)
    plan = batching.plan(batching.group(True, rows), most=4, budget=10_000)
    assert [len(b) for b in plan] == [4, 4, 1]
    assert {len(pre) for pre, _ in plan[0]} == {30}
    pooled = [len(pre) for b in plan[1:] for pre, _ in b]
    assert pooled == sorted(pooled) and set(pooled) == {10, 20, 30}
    # pooled rows are copied into a stacked cache: their span counts the prefix
    own = {tag: len(rest) + follow for _, rest, follow, tag in rows}
    assert all(span == len(pre) + own[item[1]] for b in plan[1:] for pre, (span, item) in b)


def test_cut_keeps_a_row_of_many_continuations_under_the_budget():
    conts = [(i, (1,) * 10) for i in range(7)]  # each adds 9 tokens to the row
    runs = batching.cut(5, conts, budget=30)
    assert [len(r) for r in runs] == [2, 2, 2, 1] and [k for r in runs for k, _ in r] == list(range(7))
    assert all(5 + sum(len(c) - 1 for _, c in r) <= 30 for r in runs)
    assert batching.cut(5, [(0, (1,) * 100)], budget=30) == [[(0, (1,) * 100)]]  # one alone, however long
    assert batching.cut(5, [], budget=30) == []
