"""Gemma 3 270M from the PyPI GGUF: our log-probs against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch
from helpers import settings

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: What is 12 times 7?\nAnswer: 84\n\n",
]


@pytest.fixture(scope="module")
def hf_270m(gguf_270m):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_270m.parent, gguf_file=gguf_270m.name, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_config_read_from_gguf(ours_270m):
    cfg = ours_270m.config
    assert cfg.family == "gemma3" and cfg.num_layers == 18 and cfg.vocab_size == 262144
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == [5, 11, 17]
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1_000_000.0, 10_000.0)
    assert cfg.query_pre_attn_scalar == 256 and cfg.attn_logit_softcap is None


def test_tokenization_of_reference_prompt(ours_270m):
    assert ours_270m.tokenizer.encode("The capital of France is", bos=True) == [2, 818, 5279, 529, 7001, 563]


def test_logprobs_match_transformers(ours_270m, hf_270m):
    tok = ours_270m.tokenizer
    seqs = [tok.encode(p, bos=True) for p in PROMPTS]
    # One prompt longer than the 512-token sliding window, so local and global layers differ.
    long_text = " ".join(f"Item {i}: the {i % 7}th colour of a list of things." for i in range(80))
    seqs.append(tok.encode(long_text, bos=True))
    assert len(seqs[-1]) > 600
    ours = ours_270m.token_logprobs(seqs, batch_size=4)  # batched with padding
    for ids, got in zip(seqs, ours):
        ref = _hf_logprobs(hf_270m, ids)
        assert (got - ref).abs().max().item() <= 1e-3


def test_greedy_continuation_matches_transformers(ours_270m, hf_270m):
    ids = ours_270m.tokenizer.encode("The capital of France is", bos=True)
    ours = ours_270m.greedy(ids, max_new_tokens=12)
    with torch.no_grad():
        ref = hf_270m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref
    assert ours_270m.tokenizer.decode(ours).startswith(" the capital of")


def test_gsm8k_greedy_generations_match_transformers_generate(ours_270m, hf_270m):
    """The first 20 GSM8K test prompts, 5-shot, as the gsm8k task builds them: our batched KV-cached
    decoding (shared few-shot prefix, stop strings, max 256 tokens) against transformers' generate on
    the same token ids, token for token. Slow (about 8 minutes on 2 CPU cores), kept in the suite."""
    from evalsuite import tasks
    from evalsuite.runner import Runner
    items, _ = tasks.build_items(tasks.load_spec("gsm8k"), limit=20)
    reqs = [it.requests[0] for it in items]
    runner = Runner(ours_270m, generate_batch_size=20, progress=False)
    ours = runner.generate_until(reqs)
    assert sum(r.finish == "stop" for r in ours) >= 3  # the stop strings are exercised, not only the length cap
    seqs = [list(sum(runner.encode_context(q.context, q.shared_prefix), ())) for q in reqs]
    width = max(map(len, seqs))
    # One left-padded batch with its attention mask, as transformers' generate expects; as many new
    # tokens as our longest output (a stop string ends ours after the token completing it).
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        ref = hf_270m.generate(ids, attention_mask=mask, max_new_tokens=max(len(r.tokens) for r in ours),
                               do_sample=False, pad_token_id=0)
    for i, res in enumerate(ours):
        assert res.tokens == ref[i, width:width + len(res.tokens)].tolist(), f"prompt {i}"


def test_compare_flags_a_perturbed_model_and_passes_the_same_model(ours_270m, tmp_path):
    from evalsuite import compare, evaluate
    run = lambda d: evaluate.run(ours_270m, ["arc_e"], tmp_path / d, settings(limit=100))  # noqa: E731
    run("base")
    run("again")
    # Plant a regression: noise as large as the weights themselves in every MLP down-projection.
    params = {n: p for n, p in ours_270m.model.named_parameters() if "down" in n}
    assert params, "no MLP down-projection weights found to perturb"
    saved = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=gen) * p.std())
        run("perturbed")
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    assert compare.main([str(tmp_path / "base"), str(tmp_path / "again")]) == 0
    assert compare.main([str(tmp_path / "base"), str(tmp_path / "perturbed")]) == 1
