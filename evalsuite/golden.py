"""Golden logits: catch a model-code change that moves any log-probability.

    python -m evalsuite.golden record model=gemma3_270m [golden.file=golden/gemma3_270m.json]
    python -m evalsuite.golden check  model=gemma3_270m [golden.tolerance=1e-4 | golden.exact=true]

`record` stores, for a fixed probe set, every token's log-probability with the model's weight
fingerprint and the numerics settings. The probes are short texts of several kinds (prose, code,
arithmetic, non-Latin scripts, whitespace) plus one built to be longer than the model's sliding
window, so local and global attention layers both matter. `check` recomputes them and exits 1 with
a per-token diff when max |delta| exceeds the tolerance (or, with golden.exact=true, when any value
differs in any bit), 2 when the golden file is for other weights or settings, 0 otherwise.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import torch

from .model import load_model

FORMAT_VERSION = 1
PROBES = [
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Question: What is 12 times 7?\nAnswer: 12 * 7 = 84.\n#### 84",
    "Мы учим модели. 我们在评估语言模型。 Évaluer, c'est mesurer.",
    "\t  Indented\n\n\n   spaces   and\ttabs  ",
]


def long_probe(window: int | None, tokenizer) -> str:
    """A text of more tokens than the sliding window (at least 600), numbered so it is not periodic."""
    need = max(600, (window or 0) + 64)
    lines: list[str] = []
    while len(tokenizer.encode(" ".join(lines), bos=True)) <= need:
        lines.extend(f"Line {i}: the {i % 13}th item weighs {i * 7 % 101} grams."
                     for i in range(len(lines), len(lines) + 50))
    return " ".join(lines)


def probe_set(lm) -> list[str]:
    return PROBES + [long_probe(lm.config.sliding_window, lm.tokenizer)]


def settings(lm) -> dict:
    return {"fingerprint_sha256": lm.fingerprint(), "family": lm.config.family, "dtype": str(lm.model.dtype),
            "device": lm.device.type}


def compute(lm) -> list[dict]:
    texts = probe_set(lm)
    seqs = [lm.tokenizer.encode(t, bos=True) for t in texts]
    logprobs = lm.token_logprobs(seqs, batch_size=1)  # one at a time: no padding in the numbers
    return [{"text": t, "ids": ids, "logprobs": lp.tolist()} for t, ids, lp in zip(texts, seqs, logprobs)]


def record(lm, path: Path) -> dict:
    golden = {"format": FORMAT_VERSION, "torch": torch.__version__, **settings(lm), "probes": compute(lm)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") if path.suffix == ".gz" else open(path, "w") as fh:
        json.dump(golden, fh)
    return golden


def load(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no golden file; record one with python -m evalsuite.golden record")
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
        return json.load(fh)


def check(lm, golden: dict, tolerance: float = 1e-4, exact: bool = False) -> dict:
    """{'comparable': why not or None, 'max_abs_delta', 'failures': [(probe, position, token, golden, now)]}."""
    now = settings(lm)
    diffs = [f"{k}: golden {golden.get(k)!r}, now {v!r}" for k, v in now.items() if golden.get(k) != v]
    if diffs:
        return {"comparable": "; ".join(diffs), "max_abs_delta": None, "failures": []}
    current = compute(lm)
    failures, worst = [], 0.0
    for p, (gold, cur) in enumerate(zip(golden["probes"], current)):
        if gold["ids"] != cur["ids"]:
            return {"comparable": f"probe {p}: the tokenizer now gives other ids", "max_abs_delta": None, "failures": []}
        for j, (a, b) in enumerate(zip(gold["logprobs"], cur["logprobs"])):
            delta = abs(a - b)
            worst = max(worst, delta)
            if (a != b) if exact else delta > tolerance:
                failures.append((p, j + 1, cur["ids"][j + 1], a, b))
    return {"comparable": None, "max_abs_delta": worst, "failures": failures}


def diff_table(lm, result: dict, limit: int = 30) -> str:
    rows = sorted(result["failures"], key=lambda f: -abs(f[3] - f[4]))[:limit]
    lines = ["| probe | position | token | golden | now | delta |", "|---|---|---|---|---|---|"]
    for p, pos, tok, a, b in rows:
        lines.append(f"| {p} | {pos} | {lm.tokenizer.decode([tok])!r} | {a:.7f} | {b:.7f} | {b - a:+.3e} |")
    if len(result["failures"]) > limit:
        lines.append(f"({len(result['failures']) - limit} more tokens differ)")
    return "\n".join(lines)


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from .__main__ import CONF_DIR

    action = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("record", "check") else None
    if action is None:
        sys.exit("usage: python -m evalsuite.golden record|check model=NAME [golden.file=PATH] "
                 "[golden.tolerance=1e-4] [golden.exact=true] [device=] [dtype=]")

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
    def run(cfg: DictConfig) -> None:
        g = OmegaConf.to_container(cfg.golden, resolve=True)
        path = Path(g["file"] or f"golden/{cfg.model.get('preset') or 'model'}.json")
        lm = load_model(cfg.model.path, device=cfg.device, dtype=cfg.dtype, preset=cfg.model.get("preset"))
        if action == "record":
            golden = record(lm, path)
            print(f"recorded {sum(len(p['logprobs']) for p in golden['probes'])} token log-probs of "
                  f"{len(golden['probes'])} probes to {path} (weights {golden['fingerprint_sha256'][:12]})")
            return
        try:
            golden = load(path)
        except FileNotFoundError as e:
            print(str(e), file=sys.stderr)
            sys.exit(2)
        result = check(lm, golden, float(g["tolerance"]), bool(g["exact"]))
        if result["comparable"]:
            print(f"{path} does not apply to this model: {result['comparable']}", file=sys.stderr)
            sys.exit(2)
        n = sum(len(p["logprobs"]) for p in golden["probes"])
        mode = "bit-exact" if g["exact"] else f"tolerance {g['tolerance']}"
        if result["failures"]:
            print(diff_table(lm, result))
            print(f"FAILED: {len(result['failures'])} of {n} token log-probs differ ({mode}); "
                  f"max |delta| = {result['max_abs_delta']:.3e}", file=sys.stderr)
            sys.exit(1)
        print(f"ok: {n} token log-probs match {path} ({mode}); max |delta| = {result['max_abs_delta']:.3e}")

    run()


if __name__ == "__main__":
    main()
