"""The one place where log-likelihood requests are executed on our Gemma network.

Tokenization split: trailing spaces of the context move to the front of the continuation, then
the context is encoded alone (with BOS) and the continuation alone. Gemma's tokenizer has no
dummy prefix, so " Paris" encodes the same whatever precedes it, and every choice of a question
shares exactly the same context tokens.

Execution: requests with the same context tokens form one packed row,
    [context][choice 1][choice 2]...[choice k]
where each choice continues at the context's positions and attends to the context and to
itself only (segment mask). The context is computed once for all its choices, inside one
forward. Rows are sorted by length (longest first) and batched under a token budget. The
vocabulary-sized head runs only at the positions that predict continuation tokens, in chunks.
Results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import LoadedModel


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    num_tokens: int


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return context, continuation


class Runner:
    def __init__(self, lm: LoadedModel, batch_size: int = 16, token_budget: int = 16384, head_chunk: int = 512,
                 progress: bool = True):
        self.lm, self.batch_size, self.token_budget, self.head_chunk = lm, batch_size, token_budget, head_chunk
        self.progress = progress
        self.tokens_scored = 0  # continuation tokens scored
        self.tokens_forwarded = 0  # real (non-padding) tokens through the network

    def _rows(self, requests: list[tuple[str, str]]):
        tok, enc_cache = self.lm.tokenizer, {}
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for idx, (context, continuation) in enumerate(requests):
            context, continuation = split_pair(context, continuation)
            if context not in enc_cache:
                enc_cache[context] = tuple(tok.encode(context, bos=True))
            cont = tok.encode(continuation)
            if not cont:
                raise ValueError(f"request {idx}: empty continuation {continuation!r}")
            groups.setdefault(enc_cache[context], []).append((idx, cont))
        rows = []
        max_len = self.lm.config.max_position_embeddings
        for ctx, conts in groups.items():
            # Split a group whose choices would make a row longer than the token budget.
            row: list[tuple[int, list[int]]] = []
            for item in conts:
                if row and len(ctx) + sum(len(c) for _, c in row) + len(item[1]) > max(self.token_budget, 1):
                    rows.append((ctx, row))
                    row = []
                row.append(item)
            rows.append((ctx, row))
            longest = len(ctx) + max(len(c) for _, c in conts)
            if longest > max_len:
                raise ValueError(f"a request needs {longest} tokens, more than the model's maximum {max_len}")
        return rows

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LoglikelihoodResult]:
        rows = sorted(self._rows(requests), key=lambda r: -(len(r[0]) + sum(len(c) for _, c in r[1])))
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        batches, batch = [], []
        for row in rows:
            width = len(row[0]) + sum(len(c) for _, c in row[1])
            first_width = (len(batch[0][0]) + sum(len(c) for _, c in batch[0][1])) if batch else width
            if batch and (len(batch) >= self.batch_size or (len(batch) + 1) * first_width > self.token_budget):
                batches.append(batch)
                batch = []
            batch.append(row)
        if batch:
            batches.append(batch)
        bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", disable=not self.progress)
        for batch in batches:
            for idx, res in self._run_batch(batch):
                results[idx] = res
            bar.update(sum(len(r[1]) for r in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _run_batch(self, batch):
        dev = self.lm.device
        width = max(len(ctx) + sum(len(c) for _, c in conts) for ctx, conts in batch)
        b = len(batch)
        ids = torch.full((b, width), self.lm.tokenizer.pad_id, dtype=torch.long)
        pos = torch.zeros(b, width, dtype=torch.long)
        seg = torch.full((b, width), -1, dtype=torch.long)  # -1 padding, 0 context, k choice k
        at = torch.zeros(b, width, dtype=torch.bool)  # positions whose logits are needed
        targets = []  # per request: (idx, row, [(position predicting it, token)])
        for r, (ctx, conts) in enumerate(batch):
            n = len(ctx)
            ids[r, :n], pos[r, :n], seg[r, :n] = torch.tensor(ctx), torch.arange(n), 0
            at[r, n - 1] = True
            off = n
            for k, (idx, cont) in enumerate(conts, start=1):
                m = len(cont)
                ids[r, off:off + m], pos[r, off:off + m], seg[r, off:off + m] = torch.tensor(cont), torch.arange(n, n + m), k
                at[r, off:off + m - 1] = True
                preds = [n - 1] + list(range(off, off + m - 1))
                targets.append((idx, r, list(zip(preds, cont))))
                off += m
        valid = seg >= 0
        attend = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        ids, pos, valid, attend, at = (t.to(dev) for t in (ids, pos, valid, attend, at))
        hidden = self.lm.model.hidden(ids, positions=pos, valid=valid, attend=attend)
        sel = hidden[at]  # (n, hidden), row-major order of `at`; each needed position once
        where = {(r, p): i for i, (r, p) in enumerate(at.nonzero().tolist())}
        rows_idx, toks = [], []  # for every scored token: its row in `sel` and the token
        for idx, r, pairs in targets:
            for p, t in pairs:
                rows_idx.append(where[(r, p)])
                toks.append(t)
        rows_idx_t = torch.tensor(rows_idx, device=dev)
        toks_t = torch.tensor(toks, device=dev)
        lp_all = torch.empty(len(toks), dtype=torch.float32, device=dev)
        greedy_all = torch.empty(len(toks), dtype=torch.bool, device=dev)
        # The head runs once per selected position (the context's last position is shared by all
        # choices), in chunks to bound the (chunk, vocab) fp32 logits.
        for start in range(0, sel.shape[0], self.head_chunk):
            logits = self.lm.model.head(sel[start:start + self.head_chunk]).float()
            logp = F.log_softmax(logits, dim=-1)
            mine = (rows_idx_t >= start) & (rows_idx_t < start + self.head_chunk)
            local, tk = rows_idx_t[mine] - start, toks_t[mine]
            lp_all[mine] = logp[local, tk]
            greedy_all[mine] = logits[local].argmax(-1) == tk
        lp_all, greedy_all = lp_all.cpu(), greedy_all.cpu()
        self.tokens_forwarded += int(valid.sum())
        self.tokens_scored += len(toks)
        out, k = [], 0
        for idx, r, pairs in targets:
            m = len(pairs)
            out.append((idx, LoglikelihoodResult(float(lp_all[k:k + m].sum()), bool(greedy_all[k:k + m].all()), m)))
            k += m
        return out
