"""The parts of log-likelihood scoring below the runner: encoding contexts (the split rule, the chat
format), packing rows into tensors, and the vocabulary head run only where a token is scored."""

from __future__ import annotations

import torch

from .requests import Chat


class Encoder:
    """Token ids of texts, each encoded once (a few-shot block is shared by many requests)."""

    def __init__(self, backend):
        self.backend = backend
        self._enc: dict[tuple[str, bool], tuple[int, ...]] = {}

    def encode(self, text: str, bos: bool = False) -> tuple[int, ...]:
        key = (text, bos)
        if key not in self._enc:
            self._enc[key] = tuple(self.backend.tokenizer.encode(text, bos=bos)) if text else (
                (self.backend.tokenizer.bos_id,) if bos else ())
        return self._enc[key]

    def turn(self, role: str, text: str, close: bool = True) -> tuple[int, ...]:
        if self.backend.turn_ids is None:
            raise ValueError("chat format requested but the model's vocabulary has no <start_of_turn>/<end_of_turn>")
        sot, eot = self.backend.turn_ids
        out = (sot, *self.encode(f"{role}\n{text}"))
        return out + (eot, *self.encode("\n")) if close else out

    def context(self, context: str | Chat, shared_prefix: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix tokens, rest of the context); prefix is () when not shared."""
        if isinstance(context, Chat):
            context = context.folded(self.backend.system_role)
            pre = (self.backend.tokenizer.bos_id,)
            if context.system:
                pre += self.turn("system", context.system)
            for user, model in context.examples:
                pre += self.turn("user", user) + self.turn("model", model)
            body = self.turn("user", context.user) + self.turn("model", "", close=False)
            return (pre, body) if context.examples or context.system else ((), pre + body)
        shared_prefix = min(shared_prefix, len(context))
        if shared_prefix:
            return self.encode(context[:shared_prefix], bos=True), self.encode(context[shared_prefix:])
        return (), self.encode(context, bos=True)


def pack_rows(batch, offsets: list[int], pad_id: int):
    """batch: [(context tokens, [(key, continuation tokens)])] -> (ids, positions, segments, needed,
    targets): each row is [context][choice 1]...[choice k], every choice at the context's next
    positions (segment k; 0 the context, -1 padding); targets per continuation: (key, row,
    [(position predicting it, token)]).

    A continuation's last token is not run: its output predicts nothing that is scored and its key
    is seen by no later token (nothing follows it in its segment). MMLU's one-token answers thus
    add no tokens at all; the context's last position scores every choice's first token."""
    width = max(len(ctx) + sum(len(c) - 1 for _, c in conts) for ctx, conts in batch)
    b = len(batch)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    at = torch.zeros(b, width, dtype=torch.bool)  # positions whose logits are needed
    targets = []
    for r, (ctx, conts) in enumerate(batch):
        n, o = len(ctx), offsets[r]
        ids[r, :n], pos[r, :n], seg[r, :n] = torch.tensor(ctx), torch.arange(o, o + n), 0
        at[r, n - 1] = True
        off = n
        for k, (key, cont) in enumerate(conts, start=1):
            m = len(cont) - 1  # tokens run: all but the last
            ids[r, off:off + m], seg[r, off:off + m] = torch.tensor(cont[:-1], dtype=torch.long), k
            pos[r, off:off + m] = torch.arange(o + n, o + n + m)
            at[r, off:off + m] = True
            preds = [n - 1] + list(range(off, off + m))
            targets.append((key, r, list(zip(preds, cont))))
            off += m
    return ids, pos, seg, at, targets


class LogprobHead:
    """log p(token) and whether it is the greedy choice, from hidden states, through the backend's head."""

    def __init__(self, backend, chunk: int = 256):
        self.backend, self.chunk = backend, chunk
        self._block: torch.Tensor | None = None  # see _logits

    def logprobs(self, sel: torch.Tensor, rows_idx: list[int], toks: list[int], check_finite
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each scored token (toks[i], predicted by hidden state sel[rows_idx[i]]): its log-prob
        and whether it is greedy, on the CPU.

        The head runs once per selected position (the context's last position is shared by all
        choices), in chunks to bound the (chunk, vocab) fp32 logits. log p(token) = logit -
        logsumexp, greedy = logit equals the max; the logsumexp is computed in place (as
        torch.logsumexp does it, without its two chunk-sized temporaries)."""
        dev = self.backend.device
        rows_idx_t = torch.tensor(rows_idx, device=dev)
        toks_t = torch.tensor(toks, device=dev)
        lp_all = torch.empty(len(toks), dtype=torch.float32, device=dev)
        greedy_all = torch.empty(len(toks), dtype=torch.bool, device=dev)
        for start in range(0, sel.shape[0], self.chunk):
            logits = self._logits(sel[start:start + self.chunk])
            mine = (rows_idx_t >= start) & (rows_idx_t < start + self.chunk)
            local, tk = rows_idx_t[mine] - start, toks_t[mine]
            picked = logits[local, tk]
            top = logits.amax(dim=-1)
            lse = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            check_finite(lse)  # NaN or inf anywhere in a row makes its logsumexp non-finite
            lp_all[mine] = picked - lse[local]
            greedy_all[mine] = picked >= top[local]
        return lp_all.cpu(), greedy_all.cpu()

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of `rows` (at most `chunk` hidden states) that the caller may overwrite.

        They go into one (chunk, vocab) block kept for the runner's life: allocated afresh for
        every chunk, Gemma 3's 268 MB blocks of varying row counts fragmented malloc's heap, whose
        peak then varied from run to run by up to 1 GB.
        """
        buf = self._block  # `chunk` rows, the most a chunk has
        logits = self.backend.head(rows, out=None if buf is None else buf[:rows.shape[0]])
        if buf is None and rows.shape[0] == self.chunk:
            self._block = logits
        return logits.float()  # bf16 models: a fp32 copy
