"""Batch planning for the runner: pure functions of token lengths (no model, no tensors).

A row is (prefix, rest, tokens to follow, tag): the tokens a few-shot prefix shares with other rows,
the row's own tokens, how many more it will need (continuation tokens scored, or tokens generated),
and what the caller uses to find it again. `group` decides which prefixes are shared, `plan` cuts
the rows into batches of at most `most` rows whose padded width stays under the token budget.
"""

from __future__ import annotations

from collections import Counter


def group(share: bool, rows) -> dict:
    """rows: [(prefix, rest, tokens to follow, tag)] -> {prefix: [(span, (tokens to run, tag))]}.

    With `share` (the backend packs rows and prefix sharing is on), a prefix used by several rows
    (with a non-empty rest) is shared: its rows run only their rest, and their span (what counts
    against the token budget) leaves the prefix out, since its keys are held once for the whole
    batch. Other rows go to the plain group () with their prefix as ordinary tokens.
    """
    uses = Counter(pre for pre, rest, _, _ in rows if pre and rest)
    groups: dict[tuple[int, ...], list] = {(): []}
    for pre, rest, follow, tag in rows:
        if pre and rest and uses[pre] > 1 and share:
            groups.setdefault(pre, []).append((len(rest) + follow, (rest, tag)))
        else:
            groups[()].append((len(pre) + len(rest) + follow, (pre + rest, tag)))
    return groups


def cut(context: int, conts: list, budget: int) -> list[list]:
    """A context's continuations [(key, tokens)] -> runs of them, in order, each run one row
    [context][c1]...[ck] (every continuation but its last token) of at most `budget` tokens, or a
    single continuation. Many continuations can share one context (CrowS-Pairs: 3016 sentences after
    BOS alone); in one row they would make one sequence of 90,000 tokens."""
    runs, run, width = [], [], context
    for key, c in conts:
        if run and width + len(c) - 1 > budget:
            runs.append(run)
            run, width = [], context
        run.append((key, c))
        width += len(c) - 1
    return runs + [run] if run else runs


def room(rows: int, widest: int, most: int, budget: int) -> bool:
    """Whether a batch of `rows` rows (at most `most`), the widest spanning `widest` tokens, may
    take one more row under the token budget (rows x widest)."""
    return rows < most and (rows + 1) * widest <= budget


def fill(rows, most: int, budget: int) -> list[list]:
    """rows: [(prefix, (span, item))] in order -> batches of at most `most` rows under the token budget."""
    batches, batch, widest = [], [], 0
    for row in rows:
        if batch and not room(len(batch), max(widest, row[1][0]), most, budget):
            batches.append(batch)
            batch, widest = [], 0
        batch.append(row)
        widest = max(widest, row[1][0])
    return batches + [batch] if batch else batches


def plan(groups: dict, most: int, budget: int) -> list[list]:
    """groups: {prefix: [(span, item)]}, span = tokens the item needs (see `group`) -> batches of
    [(prefix, (span, item))].

    Each group is batched on its own, longest first, so that its batches share one prefix's KV.
    The last, partly filled batch of every prefix group then goes to a pool that is batched
    across prefixes (their caches are stacked): a task made of many small few-shot groups, such as
    BBH's 27 subtasks at a small limit, still runs in full batches. The pool is ordered by prefix
    length, since a stacked cache is as wide as its longest prefix (MMLU's 5-shot blocks run from
    200 to 2,400 tokens), and keeps each prefix's rows together, so a prefix is needed by a few
    consecutive batches only.
    """
    batched, pool = [], []
    for pre, members in groups.items():
        batches = fill([(pre, m) for m in sorted(members, key=lambda m: -m[0])], most, budget)
        if pre and batches and room(len(batches[-1]), max(m[0] for _, m in batches[-1]), most, budget):
            pool.append(batches.pop())
        batched += batches
    pool.sort(key=lambda rows: len(rows[0][0]))  # stable: equal lengths keep group order
    # Rows of several prefixes get them copied into a stacked cache: there the prefix counts.
    return batched + fill([(pre, (len(pre) + span, item)) for rows in pool for pre, (span, item) in rows], most, budget)
