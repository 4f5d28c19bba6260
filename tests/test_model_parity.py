"""Our network against transformers (eager attention, fp32) on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from evalsuite.model import load_model
from evalsuite.model.weights import load_gguf, load_hf_folder
from helpers import GEMMA4_VARIANTS, random_hf_model, tiny_config, write_gguf, write_hf_checkpoint

TOL = 1e-4
FAMILIES = ["gemma1", "gemma2", "gemma3"]
# Gemma 4, one tiny config per group of features (helpers.GEMMA4_VARIANTS); HF checkpoints only.
GEMMA4 = list(GEMMA4_VARIANTS)
# (num_heads, num_kv_heads): multi-query, grouped, and one kv head per query head.
HEADS = [(4, 1), (4, 2), (4, 4)]


def _ids(batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    ids[:, 0] = 2  # BOS
    return ids


@pytest.mark.parametrize("family", FAMILIES + GEMMA4)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_logits_match_transformers_every_position(tmp_path, family, heads):
    cfg = tiny_config(family, num_heads=heads[0], num_kv_heads=heads[1])
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 40, cfg.vocab_size, seed=1)  # 40 tokens >> sliding window 7
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL
    # Soft-capping is monotonic: compare log-probs, which a missing cap does change.
    assert (got.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES + GEMMA4)
def test_padded_batch_matches_each_sequence_alone(tmp_path, family):
    """Right-padded batch vs transformers on each unpadded sequence: every real position."""
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    lengths = [33, 12, 25]
    ids = _ids(3, max(lengths), cfg.vocab_size, seed=2)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, :n] = True
        ids[i, n:] = 0
    with torch.no_grad():
        batched = ours(ids, valid=valid)
        for i, n in enumerate(lengths):
            ref = hf(ids[i:i + 1, :n]).logits[0]
            assert (batched[i, :n] - ref).abs().max().item() <= TOL
    # Left padding with explicit positions is exact as well (our mask works on positions, not slots).
    n = lengths[1]
    left = torch.zeros(1, 20, dtype=torch.long)
    left[0, 20 - n:] = ids[1, :n]
    lvalid = torch.arange(20)[None] >= 20 - n
    pos = (torch.arange(20) - (20 - n)).clamp(min=0)[None]
    with torch.no_grad():
        got = ours(left, positions=pos, valid=lvalid)[0, 20 - n:]
        ref = hf(ids[1:2, :n]).logits[0]
    assert (got - ref).abs().max().item() <= TOL


def test_hf_batch_with_attention_mask_matches(tmp_path):
    """Same right-padded batch fed to both, with transformers' own attention_mask."""
    cfg = tiny_config("gemma2")
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 30, cfg.vocab_size, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, valid=mask.bool())
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES + GEMMA4)
def test_kv_cache_decoding_equals_full_forward(tmp_path, family):
    """Prefill 5 tokens, then one token at a time past the window boundary (window 7)."""
    cfg = tiny_config(family)
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 24, cfg.vocab_size, seed=4)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        steps = [ours(ids[:, :5], cache=cache)]
        for j in range(5, 24):
            steps.append(ours(ids[:, j:j + 1], cache=cache))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= TOL
    assert len(cache) == 24


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_query_blocks_see_only_their_key_span(tmp_path, family, monkeypatch):
    """Attention in blocks of 5 queries (window 7), each over its own key span, padded rows and a
    cache included, still matches transformers."""
    from evalsuite.model.gemma import AttentionMask
    monkeypatch.setattr(AttentionMask, "QUERIES_PER_BLOCK", 5)
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    lengths = [40, 17]
    ids = _ids(2, 40, cfg.vocab_size, seed=9)
    valid = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        got = ours(ids, valid=valid)
        cache = ours.new_cache()
        ours(ids[:1, :23], cache=cache)
        continued = ours(ids[:1, 23:], cache=cache)[0]
        for i, n in enumerate(lengths):
            ref = hf(ids[i:i + 1, :n]).logits[0]
            assert (got[i, :n] - ref).abs().max().item() <= TOL
        assert (continued - hf(ids[:1]).logits[0, 23:]).abs().max().item() <= TOL
    # The spans are narrow: causal on global layers, the window on sliding ones.
    q_pos = torch.arange(40)[None]
    allowed = (q_pos[:, :, None] >= q_pos[:, None, :]) & (q_pos[:, :, None] - q_pos[:, None, :] < 7)
    spans = [(q0, k0, k1) for _, _, q0, _, k0, k1, _ in AttentionMask(allowed, torch.float32).blocks]
    assert spans[0] == (0, 0, 5) and spans[-1] == (35, 29, 40)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_power_of_two_scaling_goes_on_the_queries_bit_exactly(tmp_path, family):
    """query_pre_attn_scalar 16 (scaling 1/4; the real models' 256 gives 1/16): the queries are scaled
    instead of the scores. Logits match transformers and equal, bit for bit, those of scaling the scores."""
    from evalsuite.model.config import GLOBAL
    from evalsuite.model.gemma import Attention
    cfg = tiny_config(family, query_pre_attn_scalar=16)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    assert all(block.attn.prescale for block in ours.layers)
    lengths = [40, 17]
    ids = _ids(2, 40, cfg.vocab_size, seed=21)
    valid = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        got = ours(ids, valid=valid)
        for i, n in enumerate(lengths):
            assert (got[i, :n] - hf(ids[i:i + 1, :n]).logits[0]).abs().max().item() <= TOL
        for block in ours.layers:
            block.attn.prescale = False
        scores_scaled = ours(ids, valid=valid)
    assert torch.equal(got[valid], scores_scaled[valid])
    # The other tests' scalar (20) is not a power of two: they keep scaling the scores.
    assert not Attention(tiny_config(family), GLOBAL, 0).prescale


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_rows_with_different_key_spans_attend_apart(tmp_path, family, monkeypatch):
    """Two rows continuing prefixes of 30 and 8 tokens (stacked: the shorter one left-padded by 22
    slots) attend in separate row runs, each over its own key span; logits still match transformers."""
    from evalsuite.model.gemma import AttentionMask, KVCache
    monkeypatch.setattr(AttentionMask, "SMALL_RUN", 0)  # tiny shapes would otherwise share one run
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    prefixes = [_ids(1, 30, cfg.vocab_size, seed=11), _ids(1, 8, cfg.vocab_size, seed=12)]
    rest = _ids(2, 6, cfg.vocab_size, seed=13)
    rest[:, 0] = 7  # not BOS: these tokens continue their prefix
    with torch.no_grad():
        caches = []
        for pre in prefixes:
            caches.append(ours.new_cache())
            ours(pre, cache=caches[-1])
        positions = torch.stack([torch.arange(30, 36), torch.arange(8, 14)])
        got = ours(rest, positions=positions, cache=KVCache.stack(caches))
        for i, pre in enumerate(prefixes):
            ref = hf(torch.cat([pre, rest[i:i + 1]], dim=1)).logits[0, -6:]
            assert (got[i] - ref).abs().max().item() <= TOL
    slots = torch.arange(36)
    allowed = (slots[None, None, :] <= torch.arange(30, 36)[None, :, None]) & \
        torch.stack([slots >= 0, slots >= 22])[:, None, :]
    runs = [(r0, r1, k0, k1) for r0, r1, _, _, k0, k1, _ in AttentionMask(allowed, torch.float32).blocks]
    assert runs == [(0, 1, 0, 36), (1, 2, 22, 36)]
    monkeypatch.setattr(AttentionMask, "SMALL_RUN", 1 << 16)  # small: one matmul for both rows
    assert [(r0, r1) for r0, r1, *_ in AttentionMask(allowed, torch.float32).blocks] == [(0, 2)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_flex_attention_path_matches_transformers(tmp_path, family):
    """attention="flex" (the GPU path, run unfused here): the same visibility rules as the block
    path (padding, window 7, a left-padded stacked cache, pruned last layer) and Gemma 2's soft-cap
    as a score modification, against transformers."""
    from evalsuite.model.gemma import FlexMask, KVCache
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ours.attention = "flex"
    lengths = [40, 17]
    ids = _ids(2, 40, cfg.vocab_size, seed=21)
    valid = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    made = []
    real_init = FlexMask.__init__

    def spy(self, allowed):
        made.append(allowed.shape)
        real_init(self, allowed)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlexMask, "__init__", spy)
        got = ours(ids, valid=valid)
        for i, n in enumerate(lengths):
            assert (got[i, :n] - hf(ids[i:i + 1, :n]).logits[0]).abs().max().item() <= TOL
        caches = []
        for pre in (ids[:1, :30], ids[1:, :8]):
            caches.append(ours.new_cache())
            ours(pre, cache=caches[-1], logits_at=torch.zeros(pre.shape, dtype=torch.bool))
        rest = _ids(2, 6, cfg.vocab_size, seed=22)
        at = torch.ones(2, 6, dtype=torch.bool)
        at[:, :2] = False
        positions = torch.stack([torch.arange(30, 36), torch.arange(8, 14)])
        cont = ours(rest, positions=positions, cache=KVCache.stack(caches), logits_at=at).view(2, 4, -1)
        for i, pre in enumerate((ids[:1, :30], ids[1:, :8])):
            ref = hf(torch.cat([pre, rest[i:i + 1]], dim=1)).logits[0, -4:]
            assert (cont[i] - ref).abs().max().item() <= TOL
    assert made  # the flex path ran, not the block path
    ours.attention = "sdpa"
    with pytest.raises(ValueError, match="attention='sdpa'"):
        ours(ids)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_decoding_writes_into_spare_cache_slots_only(tmp_path, family, monkeypatch):
    """Short appends go into spare slots (reallocated every HEADROOM steps, kept across select), the
    shared prefix an expanded cache holds once is never copied or written, and every step's logits
    equal those of the whole sequence run without a cache."""
    from evalsuite.model.gemma import KVCache
    monkeypatch.setattr(KVCache, "HEADROOM", 3)
    cfg = tiny_config(family)
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(3, 20, cfg.vocab_size, seed=31)
    ids[:, :10] = ids[0, :10]  # one shared 10-token prefix
    rows = torch.arange(3)
    with torch.no_grad():
        prefix = ours.new_cache()
        ours(ids[:1, :10], cache=prefix)
        saved = [t.clone() for t in prefix.k + prefix.v]
        cache = prefix.expand(3)
        got = {12: ours(ids[:, 10:13], cache=cache)[:, -1]}
        storage = [cache.k[0].untyped_storage().data_ptr()]
        for j in range(13, 20):
            if j == 15:  # a row finishes: the others go on from a selected cache
                rows, before = torch.tensor([0, 2]), cache
                cache = cache.select(rows)
                assert all(torch.equal(a, b[rows]) for a, b in zip(cache.k + cache.v, before.k + before.v))
            got[j] = ours(ids[rows, j:j + 1], cache=cache)[:, 0]
            storage.append(cache.k[0].untyped_storage().data_ptr())
        full = ours(ids)
    for j, logits in got.items():
        want = full[:, j] if j < 15 else full[[0, 2], j]
        assert (logits - want).abs().max().item() <= TOL, j
    assert all(torch.equal(a, b) for a, b in zip(saved, prefix.k + prefix.v))
    # The rows hold only their own 10 keys; the prefix stays the one-row cache it was.
    assert cache.shared is prefix and len(cache) == 20 and cache.k[0].shape[2] == 10
    # Step 13 makes a buffer of 4 + 3 slots, filled in place by step 14; select copies it with its
    # spare slots, filled by steps 15 and 16; step 17 makes one of 8 + 3, filled by 18 and 19.
    assert storage[0] != storage[1] == storage[2] != storage[3] == storage[4] != storage[5]
    assert storage[5] == storage[6] == storage[7]


def _prefix_and_rows(cfg):
    """An 11-token shared prefix and 3 rows continuing it, left-padded to 12 tokens, of 12, 5 and 9."""
    ctx = _ids(1, 11, cfg.vocab_size, seed=5)
    bodies = _ids(3, 12, cfg.vocab_size, seed=6)
    lengths = [12, 5, 9]
    valid = torch.arange(12)[None] >= 12 - torch.tensor(lengths)[:, None]  # left-padded
    positions = (11 + valid.cumsum(1) - 1).clamp(min=0)
    return ctx, bodies, lengths, valid, positions


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_shared_prefix_is_attended_once_for_all_rows(tmp_path, family, monkeypatch):
    """Rows continuing one shared prefix (left-padded, of unequal length, then decoding) against
    transformers on each whole sequence. Blocks of 4 queries under the window of 7 make blocks that
    see prefix and own keys, and blocks that see own keys only; the flex path agrees too."""
    from evalsuite.model.gemma import AttentionMask
    monkeypatch.setattr(AttentionMask, "QUERIES_PER_BLOCK", 4)
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ctx, bodies, lengths, valid, positions = _prefix_and_rows(cfg)
    steps = _ids(3, 3, cfg.vocab_size, seed=7)
    for attention in ("blocks", "flex"):
        ours.attention = attention
        with torch.no_grad():
            prefix = ours.new_cache()
            ours(ctx, cache=prefix, logits_at=torch.zeros(1, 11, dtype=torch.bool))
            cache = prefix.expand(3)
            got = [ours(bodies, positions=positions, valid=valid, cache=cache)]
            for j in range(3):
                got.append(ours(steps[:, j:j + 1], positions=positions[:, -1:] + 1 + j, cache=cache))
            for i, n in enumerate(lengths):
                seq = torch.cat([ctx, bodies[i:i + 1, 12 - n:], steps[i:i + 1]], dim=1)
                ref = hf(seq).logits[0, 11:]
                mine = torch.cat([got[0][i, 12 - n:]] + [g[i] for g in got[1:]])
                assert (mine - ref).abs().max().item() <= TOL, (attention, i)
        assert cache.k[0].shape[2] == 15  # own keys only: 12 body slots and 3 steps


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_decode_step_matches_transformers(tmp_path, family):
    """Decoding with fixed shapes (KVCache.reserve, Gemma.decode_step) after a shared prefix and
    left-padded prompts of unequal length, past the sliding window and through a select (a row
    finishes), against transformers on each whole sequence. Steps write in place into the slots the
    rows reserved, and never into the prefix."""
    cfg = tiny_config(family)
    hf = write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ctx, bodies, lengths, valid, positions = _prefix_and_rows(cfg)
    steps = _ids(3, 4, cfg.vocab_size, seed=8)
    got: dict[int, list] = {0: [], 1: [], 2: []}
    with torch.no_grad():
        prefix = ours.new_cache()
        ours(ctx, cache=prefix, logits_at=torch.zeros(1, 11, dtype=torch.bool))
        saved = [t.clone() for t in prefix.k + prefix.v]
        cache = prefix.expand(3)
        ours(bodies, positions=positions, valid=valid, cache=cache, logits_at=torch.zeros(3, 12, dtype=torch.bool))
        cache.reserve(4)
        rows = torch.arange(3)
        for j in range(4):
            if j == 2:  # row 1 finishes
                rows = torch.tensor([0, 2])
                cache = cache.select(rows)
            storage = [t.untyped_storage().data_ptr() for t in cache.k + cache.v]
            h = ours.decode_step(steps[rows, j], positions[rows, -1] + 1 + j, cache)
            assert storage == [t.untyped_storage().data_ptr() for t in cache.k + cache.v]  # written in place
            for r, logits in zip(rows.tolist(), ours.head(h)):
                got[r].append(logits)
        for i, n in enumerate(lengths):
            k = len(got[i])
            ref = hf(torch.cat([ctx, bodies[i:i + 1, 12 - n:], steps[i:i + 1, :k]], dim=1)).logits[0, -k:]
            assert (torch.stack(got[i]) - ref).abs().max().item() <= TOL, i
    assert all(torch.equal(a, b) for a, b in zip(saved, prefix.k + prefix.v))
    assert cache.shared is prefix and cache.k[0].shape[2] == 12 + 4 and int(cache.slot) == 11 + 12 + 4


@pytest.mark.parametrize("family", ["gemma2", "gemma4_ple", "gemma4_moe"])
def test_decode_step_traces_to_one_graph(tmp_path, family):
    """What CUDA graph capture needs, checked on CPU: torch.compile(fullgraph=True) traces a step
    without a break (a break is where a value is read back to the host), the next steps run the same
    trace (fixed shapes, the slot moved on the device), and the results equal the eager step's.
    Gemma 4: KV-sharing layers and, for few rows, the gathered experts."""
    import torch._dynamo
    cfg = tiny_config(family)
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 6, cfg.vocab_size, seed=3)
    torch._dynamo.reset()
    step = torch.compile(ours.decode_step, backend="eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager, traced = ours.new_cache(), ours.new_cache()
        for cache in (eager, traced):
            ours(ids, cache=cache)
            cache.reserve(3)
        for j in range(3):
            tokens, pos = _ids(2, 1, cfg.vocab_size, seed=10 + j)[:, 0], torch.full((2,), 6 + j)
            assert torch.equal(ours.decode_step(tokens, pos, eager), step(tokens, pos, traced)), j
    torch._dynamo.reset()


def test_logits_at_selects_positions(tmp_path):
    cfg = tiny_config("gemma2")
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 15, cfg.vocab_size, seed=7)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, [3, 9]] = True
    at[1, 14] = True
    with torch.no_grad():
        full = ours(ids)
        some = ours(ids, logits_at=at)
    assert some.shape == (3, cfg.vocab_size)
    assert (some - full[at]).abs().max().item() <= 1e-5  # same maths; BLAS may round differently per shape


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_needed_positions_prune_the_last_layer_only(tmp_path, family):
    """hidden(needed=...): the needed positions as without it, zeros elsewhere, and the same cache
    (a prefix with nothing needed still leaves every layer's keys and values)."""
    cfg = tiny_config(family)
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(2, 15, cfg.vocab_size, seed=8)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 11:] = False
    needed = torch.zeros_like(valid)
    needed[0, [2, 14]] = needed[1, 10] = True
    with torch.no_grad():
        full = ours.hidden(ids, valid=valid)
        some = ours.hidden(ids, valid=valid, needed=needed)
        assert (some[needed] - full[needed]).abs().max().item() <= 1e-5
        assert not some[~needed].any()
        pruned, whole = ours.new_cache(), ours.new_cache()
        ours.hidden(ids[:1, :9], cache=pruned, needed=torch.zeros(1, 9, dtype=torch.bool))
        ours.hidden(ids[:1, :9], cache=whole)
        assert all(torch.equal(a, b) for a, b in zip(pruned.k + pruned.v, whole.k + whole.v))
        after = ours(ids[:1, 9:], cache=pruned)
    assert (after - ours(ids[:1])[:, 9:]).abs().max().item() <= TOL


def test_batch_size_does_not_change_logits(tmp_path):
    cfg = tiny_config("gemma2")
    write_hf_checkpoint(cfg, tmp_path)
    ours, _ = load_hf_folder(tmp_path)
    ids = _ids(6, 20, cfg.vocab_size, seed=8)
    with torch.no_grad():
        together = ours(ids)
        alone = torch.cat([ours(ids[i:i + 1]) for i in range(6)])
    assert (together - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3", *GEMMA4])
def test_bfloat16_follows_transformers(tmp_path, family):
    """bf16: same op order and casts as transformers, so the two agree far better than bf16 vs fp32."""
    cfg = tiny_config(family)
    write_hf_checkpoint(cfg, tmp_path)
    import transformers
    extra = {"experts_implementation": "eager"} if cfg.num_experts else {}  # as helpers.random_hf_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager",
                                                           **extra)
    ours, _ = load_hf_folder(tmp_path, dtype=torch.bfloat16)
    ids = _ids(2, 30, cfg.vocab_size, seed=9)
    with torch.no_grad():
        ref, got = hf(ids).logits.float(), ours(ids).float()
    assert got.dtype == torch.float32 and ours.embed.weight.dtype == torch.bfloat16
    assert ours.layers[0].attn_norm.weight.dtype == torch.float32  # norm scales stay fp32
    assert (got - ref).abs().max().item() <= 1e-2  # measured 0.0; bf16 vs fp32 differs by ~0.2 here


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_gguf_loads_to_the_same_logits_as_its_hf_twin(tmp_path, family, quant):
    cfg = tiny_config(family)
    hf = random_hf_model(cfg, seed=10)
    decoded = write_gguf(hf, cfg, tmp_path / "tiny.gguf", quant=quant)
    hf.load_state_dict(decoded, strict=False)  # the twin holds exactly what the GGUF decodes to
    ours, meta = load_gguf(tmp_path / "tiny.gguf")
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "sliding_window", "layer_types",
                  "attn_logit_softcap", "final_logit_softcap", "rope_theta", "rope_local_theta"):
        if not (family == "gemma3" and field == "layer_types"):
            assert getattr(ours.cfg, field) == getattr(cfg, field), field
    ids = _ids(2, 30, cfg.vocab_size, seed=11)
    # GGUF does not store the attention scale or (for Gemma 3) the layer pattern; llama.cpp's rules
    # give 1/sqrt(head_dim) and every 6th layer global, so the twin is run with those.
    twin_cfg = cfg.replace(query_pre_attn_scalar=cfg.head_dim, layer_types=ours.cfg.layer_types,
                           rope_scaling_factor=ours.cfg.rope_scaling_factor)
    twin = random_hf_model(twin_cfg, seed=10)
    twin.load_state_dict(decoded, strict=False)
    with torch.no_grad():
        ref, got = twin(ids).logits, ours(ids)
    assert (got - ref).abs().max().item() <= TOL


def test_load_model_reads_folder_with_real_gemma2_tokenizer(tmp_path, gemma2_tokenizer_json):
    """A tiny random Gemma 2 with the real 256000-piece vocabulary: the whole Gemma 2 path."""
    cfg = tiny_config("gemma2", vocab_size=256000, hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, num_layers=2)
    hf = write_hf_checkpoint(cfg, tmp_path, tokenizer_json=gemma2_tokenizer_json)
    lm = load_model(str(tmp_path))
    assert lm.tokenizer.vocab_size == 256000
    ids = lm.tokenizer.encode("Gemma 2 reads the real vocabulary.", bos=True)
    assert ids[0] == 2 and ids.count(2) == 1
    lp = lm.token_logprobs([ids])[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    ref = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert (lp - ref).abs().max().item() <= TOL
