"""Wall time of a suite, task by task, at two commits: each task's two runs back to back.

    python benchmarks/suite_before_after.py --before b3e7751 [--suite paper] [--limit 50]
        [--tasks gsm8k bbh | --whole] [--out benchmarks/results/paper_limit50.json] [-- extra overrides]

Each task runs as its own `python -m evalsuite +tasks=<task> limit=N cache=off progress=false`
process, once in a worktree of the `--before` commit and once in this tree, the two back to back
(which goes first alternates from task to task, so a drift of the machine's speed does not favour
one side). The machine's speed varies from run to run and day to day, so a ratio holds for its own
pair only: a pair is never split across invocations. Per task: process wall seconds (loading
included), results.json's wall and scoring seconds and tokens generated, both primary scores, and
how many items have the same generation (generate tasks) or the same predictions and log-likelihoods
(choice tasks) on both sides. The suite's members it leaves out (evaluate.expand_tasks: no local
data without data.source=hub, no sandbox) are recorded with the reason, not run. The out file is rewritten after every pair and tasks already in it are skipped, so a
killed or split measurement goes on where it stopped. --whole runs the suite as one process a side
instead (`+tasks=paper limit=1` is the README's main command), its requests pooled across tasks.
Prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str) -> Path:
    """A checkout of `commit` (kept between invocations under the system's temp folder)."""
    full = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"evalsuite-{full[:12]}"
    if not (path / "evalsuite").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), full], cwd=ROOT, check=True)
    return path


def run_task(tree: Path, task: str, limit: int, extra: list[str]) -> dict:
    """One evalsuite process in `tree` (its own package first on sys.path): timings and samples.
    task: a task, or a suite run whole (all its tasks' requests pooled in one process)."""
    out = Path(tempfile.mkdtemp(prefix=f"suite-{task}-"))
    cmd = [sys.executable, "-m", "evalsuite", f"+tasks={task}", f"limit={limit}", "cache=off", "progress=false",
           f"output_dir={out}", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    run_dir = next(out.glob("*/results.json")).parent
    res = json.loads((run_dir / "results.json").read_text())
    samples = {}
    for path in run_dir.glob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            key = (path.stem, rec["index"])
            samples[key] = rec["generation"] if "generation" in rec else [rec["predictions"], rec["logprobs"]]
    t = res["tasks"].get(task)
    scored = {"primary": t["primary"], "score": t["metrics"][t["primary"]]["value"]} if t else \
        {"skipped_tasks": sorted(res["skipped_tasks"])}  # a whole suite
    return {"process_seconds": round(wall, 1), "wall_seconds": round(res["timing"]["wall_seconds"], 1),
            "scoring_seconds": round(res["timing"]["scoring_seconds"], 1),
            "tokens_generated": res["timing"]["tokens_generated"], "requests": res["timing"]["requests"],
            "items": sum(t["num_items"] for t in res["tasks"].values()), **scored,
            "git_commit": res["git_commit"], "_samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="commit to compare this tree with")
    ap.add_argument("--suite", default="paper")
    ap.add_argument("--tasks", nargs="*", help="only these tasks of the suite, in this order")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--whole", action="store_true", help="the suite as one process a side (+tasks=<suite>), "
                    "as the README's main command runs it, instead of task by task")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "suite_before_after.json")
    ap.add_argument("extra", nargs="*", help="overrides for both sides (after --)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from evalsuite import evaluate, tasks
    from evalsuite.settings import Settings
    from evalsuite.toxicity import problem

    # The suite's own rule for the members it leaves out (no local data, no sandbox, no classifier).
    defaults = Settings()
    source = next((o.split("=", 1)[1] for o in args.extra if o.startswith("data.source=")), defaults.data.source)
    names, skipped = evaluate.expand_tasks([args.suite], source, evaluate.execution_problem(defaults.execution),
                                           lambda: problem(defaults.toxicity.classifier, defaults.toxicity.revision))
    if args.tasks:  # in the order given (the slowest last, say, when a measurement is split)
        unknown = [t for t in args.tasks if t not in names]
        if unknown:
            raise SystemExit(f"--tasks: {unknown} not run by suite {args.suite!r} ({names}; left out: {skipped})")
        names = args.tasks
    if args.whole:
        names = [args.suite]
    before_tree = worktree(args.before)
    done = json.loads(args.out.read_text()) if args.out.exists() else {"pairs": {}}
    done.update(before=args.before, suite=args.suite, limit=args.limit, extra=args.extra)
    if not args.whole:
        done["skipped"] = skipped
    for i, task in enumerate(names):
        if task in done["pairs"]:
            continue
        sides = [("before", before_tree), ("after", ROOT)]
        runs = {side: run_task(tree, task, args.limit, args.extra) for side, tree in (sides if i % 2 == 0 else sides[::-1])}
        a, b = runs["before"].pop("_samples"), runs["after"].pop("_samples")
        same = sum(a.get(k) == v for k, v in b.items())
        done["pairs"][task] = {**runs, "same_outputs": same, "outputs": len(b),
                               "first": "before" if i % 2 == 0 else "after", "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1) + "\n")
        print(json.dumps({task: done["pairs"][task]}), flush=True)
    print(table(done, [args.suite] + tasks.suites()[args.suite]))


def table(done: dict, names: list[str]) -> str:
    """Run seconds (results.json: requests answered, programs run, scored) and, in brackets, the
    process's (start, loading and writing the report included)."""
    rows = ["| task | items | tokens generated | before s | after s | speedup | same outputs |",
            "|---|---|---|---|---|---|---|"]
    measured = [(task, done["pairs"][task]) for task in names if task in done["pairs"]]
    for task, p in measured:
        b, a = p["before"], p["after"]
        rows.append(f"| {task} | {a['items']} | {a['tokens_generated']:,} | {b['wall_seconds']:.1f} ({b['process_seconds']:.1f}) | "
                    f"{a['wall_seconds']:.1f} ({a['process_seconds']:.1f}) | {b['wall_seconds'] / a['wall_seconds']:.2f}x | "
                    f"{p['same_outputs']} of {p['outputs']} |")
    if measured:
        b, a, bp, ap = (sum(p[side][what] for _, p in measured) for side, what in
                        (("before", "wall_seconds"), ("after", "wall_seconds"),
                         ("before", "process_seconds"), ("after", "process_seconds")))
        rows.append(f"| all measured | | | {b:.1f} ({bp:.1f}) | {a:.1f} ({ap:.1f}) | {b / a:.2f}x | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
