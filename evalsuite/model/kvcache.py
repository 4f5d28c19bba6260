"""The KV cache of the Gemma network: keys and values of earlier tokens, shared prefixes, decoding slots."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of earlier tokens, per layer, with their positions and validity.

    Keys are stored after RoPE, as in transformers. `append` is called once per layer per forward;
    positions and validity are extended once per forward by `extend`. A cache built for one
    sequence can be shared by many continuations with `expand`.

    An expanded cache keeps that sequence once, as `shared` (a one-row cache whose keys precede
    every row's), and `k`/`v` hold only what each row appended after it; `positions` and `valid`
    cover both. Attention scores the shared keys once for the queries of all rows. Copying the
    prefix into every row instead (as concatenating would) costs, for a 5-shot GSM8K prompt and
    Gemma 3 270M, about 30 MB per row and a copy of it at every append.

    Short appends (decoding) write into spare slots: `k[layer]` is then a view of the first slots
    of a larger buffer that this cache owns, grown by HEADROOM slots at a time. Appending by
    concatenation would copy the whole cache at every step. Long appends (a prompt, scored
    continuations) get an exact-size tensor: they come once, and spare slots would only hold memory.

    `reserve(n)` fixes the shapes instead, for Gemma.decode_step: n zeroed slots, invalid until a
    step writes them, and every step writes one slot in place at a device-side index (`slot`), so
    that a step reads nothing back to the host and can be captured in a CUDA graph and replayed.
    """

    HEADROOM = 64  # spare slots per reallocation for appends of up to SHORT tokens
    SHORT = 16

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        # Per layer, the (k, v) buffers this cache allocated and whose first slots k[layer] and
        # v[layer] view; None where they are tensors it does not own (a prompt's keys), which are
        # never written to.
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.shared: KVCache | None = None  # see expand
        self.positions: torch.Tensor | None = None  # (b, s) long, shared prefix included
        self.valid: torch.Tensor | None = None  # (b, s) bool
        self.slot: torch.Tensor | None = None  # after reserve: (1,) the slot the next step writes

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def extend(self, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:
            self.positions, self.valid = positions, valid
        else:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.positions, self.valid

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one forward's keys and values (b, nkv, t, hd); returns the rows' own keys and values
        so far (without the shared prefix)."""
        if self.slot is not None:  # reserved: one step, written in place (own slots follow the shared ones)
            own = self.slot - (self.positions.shape[1] - self.k[layer].shape[2])
            self.k[layer].index_copy_(2, own, k)
            self.v[layer].index_copy_(2, own, v)
            return self.k[layer], self.v[layer]
        old_k, old_v, t = self.k[layer], self.v[layer], k.shape[2]
        if old_k is None:
            self.k[layer], self.v[layer] = k, v
            return k, v
        s, buffers = old_k.shape[2], self._buffers[layer]
        if buffers is None or buffers[0].shape[2] < s + t or buffers[0].shape[0] != k.shape[0]:
            spare = self.HEADROOM if t <= self.SHORT else 0
            shape = (k.shape[0], k.shape[1], s + t + spare, k.shape[3])
            buffers = (k.new_empty(shape), v.new_empty(shape))
            buffers[0][:, :, :s], buffers[1][:, :, :s] = old_k, old_v
            self._buffers[layer] = buffers if spare else None
        buffers[0][:, :, s:s + t], buffers[1][:, :, s:s + t] = k, v
        self.k[layer], self.v[layer] = buffers[0][:, :, :s + t], buffers[1][:, :, :s + t]
        return self.k[layer], self.v[layer]

    def reserve(self, n: int) -> None:
        """Fixed shapes for n more one-token steps (see the class docstring); the cache must hold
        each row's own keys (a prompt was run)."""
        if self.k[0] is None or self.slot is not None:
            raise ValueError("reserve needs a cache holding a prompt, reserved once")
        b = self.positions.shape[0]
        self.slot = torch.tensor([self.positions.shape[1]], device=self.positions.device)
        self.positions = torch.cat([self.positions, self.positions.new_zeros(b, n)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(b, n)], dim=1)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            # Zeros, not empty memory: a masked slot still enters q @ k, and NaN there would spread.
            self.k[i], self.v[i] = (torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], dim=2) for t in (k, v))
            self._buffers[i] = None

    def write_step(self, positions: torch.Tensor) -> None:
        """A reserved cache: the step's positions (b,) at `slot`, now valid."""
        self.positions.index_copy_(1, self.slot, positions[:, None])
        self.valid.index_fill_(1, self.slot, True)

    def full(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values (b, nkv, s, hd), the shared prefix copied in."""
        if self.shared is None:
            return self.k[layer], self.v[layer]
        b = self.positions.shape[0]
        pre = [t.expand(b, -1, -1, -1) for t in (self.shared.k[layer], self.shared.v[layer])]
        if self.k[layer] is None:
            return pre[0], pre[1]
        return torch.cat([pre[0], self.k[layer]], dim=2), torch.cat([pre[1], self.v[layer]], dim=2)

    def expand(self, batch: int) -> "KVCache":
        """A cache of `batch` rows that all start with this one-row cache, which it shares (no copy)."""
        if self.positions is None or self.positions.shape[0] != 1 or self.shared is not None:
            raise ValueError("expand needs a non-empty cache of batch size 1 without a shared prefix")
        out = KVCache(len(self.k))
        out.shared = self
        out.positions = self.positions.expand(batch, -1)
        out.valid = self.valid.expand(batch, -1)
        return out

    @staticmethod
    def stack(caches: list["KVCache"]) -> "KVCache":
        """One row per one-row cache, left-padded to the longest (padding is marked invalid, so it is
        never attended to); lets requests with different few-shot prefixes share a batch."""
        width = max(len(c) for c in caches)
        out = KVCache(len(caches[0].k))

        def pad(t: torch.Tensor, n: int, dim: int, value=0) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)

        gaps = [width - len(c) for c in caches]
        for i in range(len(out.k)):
            kv = [c.full(i) for c in caches]
            out.k[i] = torch.cat([pad(k, g, 2) for (k, _), g in zip(kv, gaps)])
            out.v[i] = torch.cat([pad(v, g, 2) for (_, v), g in zip(kv, gaps)])
        out.positions = torch.cat([pad(c.positions, g, 1) for c, g in zip(caches, gaps)])
        out.valid = torch.cat([pad(c.valid, g, 1, False) for c, g in zip(caches, gaps)])
        return out

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep only the given batch rows (e.g. drop finished sequences during decoding)."""
        out = KVCache(len(self.k))
        out.shared = self.shared
        out.slot = None if self.slot is None else self.slot.clone()
        for i, (k, v, buffers) in enumerate(zip(self.k, self.v, self._buffers)):
            if k is None:
                continue
            if buffers is None:
                out.k[i], out.v[i] = k.index_select(0, rows), v.index_select(0, rows)
            else:  # keep the spare slots, so that decoding the remaining rows goes on without a copy
                out._buffers[i] = (buffers[0].index_select(0, rows), buffers[1].index_select(0, rows))
                out.k[i], out.v[i] = out._buffers[i][0][:, :, :k.shape[2]], out._buffers[i][1][:, :, :k.shape[2]]
        out.positions, out.valid = self.positions.index_select(0, rows), self.valid.index_select(0, rows)
        return out

    # ---- continuous batching: rows placed into a batch that is being decoded ----------------------
    # Every row's own keys are right-aligned: they end at the batch's last slot, where each decoding
    # step appends, and a row shorter than the batch is invalid in its first slots. So a new row can
    # take the place of a finished one without moving the others.

    @classmethod
    def slots(cls, num_layers: int, shared: "KVCache | None", device) -> "KVCache":
        """A batch of no rows yet, all rows to start with `shared` (or nothing): see grow and place."""
        out = cls(num_layers)
        out.shared = shared
        if shared is None:
            out.positions = torch.zeros(0, 0, dtype=torch.long, device=device)
            out.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        else:
            out.positions, out.valid = shared.positions[:0].clone(), shared.valid[:0].clone()
        return out

    def _own(self) -> tuple[int, int]:
        """(slots of the shared prefix, own slots per row)."""
        shared = 0 if self.shared is None else self.shared.positions.shape[1]
        return shared, self.positions.shape[1] - shared

    def grow(self, rows: int) -> None:
        """More rows, up to `rows` in all; new rows hold no keys of their own (invalid) until placed."""
        n = rows - self.positions.shape[0]
        if n <= 0:
            return
        P, S = self._own()
        pos = self.positions.new_zeros(n, P + S)
        valid = self.valid.new_zeros(n, P + S)
        if P:
            pos[:, :P], valid[:, :P] = self.shared.positions, self.shared.valid
        self.positions, self.valid = torch.cat([self.positions, pos]), torch.cat([self.valid, valid])
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            buffers = self._buffers[i] or (k, v)
            grown = tuple(torch.cat([b, b.new_zeros(n, *b.shape[1:])]) for b in buffers)
            self._buffers[i] = grown
            self.k[i], self.v[i] = grown[0][:, :, :S], grown[1][:, :, :S]

    def _widen(self, n: int, like: list[torch.Tensor]) -> None:
        """n more own slots in front of every row's (invalid, keys zero); like[layer]: a tensor of
        the keys' dtype, device and (heads, head_dim)."""
        P, S = self._own()
        b = self.positions.shape[0]
        self.positions = torch.cat([self.positions[:, :P], self.positions.new_zeros(b, n), self.positions[:, P:]], 1)
        self.valid = torch.cat([self.valid[:, :P], self.valid.new_zeros(b, n), self.valid[:, P:]], 1)
        for i, t in enumerate(like):
            shape = (b, t.shape[1], n + S + self.HEADROOM, t.shape[3])
            buffers = (t.new_zeros(shape), t.new_zeros(shape))
            if self.k[i] is not None:
                buffers[0][:, :, n:n + S], buffers[1][:, :, n:n + S] = self.k[i], self.v[i]
            self._buffers[i] = buffers
            self.k[i], self.v[i] = buffers[0][:, :, :n + S], buffers[1][:, :, :n + S]

    def place(self, rows: list[int], other: "KVCache") -> None:
        """Writes the rows of `other` (a prefilled cache) into these rows, right-aligned. `other`
        either starts with this batch's shared prefix (its own keys are placed) or, where this batch
        shares none, with a prefix of its own or none (its prefix is copied in with its keys)."""
        carries = self.shared is None  # other's prefix, if any, becomes part of the row's own keys
        if not carries and other.shared is not self.shared:
            raise ValueError("place: the rows must start with this batch's shared prefix")
        P, S = self._own()
        P_other = 0 if carries or other.shared is None else other.shared.positions.shape[1]
        src_pos, src_valid = other.positions[:, P_other:], other.valid[:, P_other:]
        kv = [other.full(i) if carries else (other.k[i], other.v[i]) for i in range(len(self.k))]
        L = src_pos.shape[1]
        if L > S:
            self._widen(L - S, [k for k, _ in kv])
            S = L
        idx = torch.tensor(rows, device=self.positions.device)
        for i, (k, v) in enumerate(kv):
            self.k[i][idx, :, S - L:] = k
            self.v[i][idx, :, S - L:] = v
        self.positions[idx, P:P + S - L] = 0
        self.valid[idx, P:P + S - L] = False
        self.positions[idx, P + S - L:] = src_pos
        self.valid[idx, P + S - L:] = src_valid

    def compact(self) -> None:
        """Drops the first own slots where no row holds a key, once they are a quarter of them (a
        copy): rows that replaced longer ones leave such slots behind."""
        P, S = self._own()
        seen = self.valid[:, P:].any(0).nonzero()
        c = int(seen[0]) if len(seen) else S
        if c == 0 or c < S // 4:
            return
        self.positions = torch.cat([self.positions[:, :P], self.positions[:, P + c:]], 1)
        self.valid = torch.cat([self.valid[:, :P], self.valid[:, P + c:]], 1)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            shape = (k.shape[0], k.shape[1], S - c + self.HEADROOM, k.shape[3])
            buffers = (k.new_empty(shape), v.new_empty(shape))
            buffers[0][:, :, :S - c], buffers[1][:, :, :S - c] = k[:, :, c:], v[:, :, c:]
            self._buffers[i] = buffers
            self.k[i], self.v[i] = buffers[0][:, :, :S - c], buffers[1][:, :, :S - c]
