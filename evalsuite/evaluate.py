"""Run tasks on a model and write results.json, samples_<task>.jsonl and a Markdown summary."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from . import metrics, scorers, tasks
from .backends import as_backend
from .cache import ResultCache, model_key
from .distributed import World, fingerprint
from .execution import SANDBOXES, Limits, SandboxError, containment, interpreter, require_sandbox, run_all
from .runner import Generation, Runner, TooLong

# Rows of the Gemma 2 paper's table that exist as tasks so far.
SUITES = {"paper": ["mmlu", "arc_c", "arc_e", "gsm8k", "math", "agieval", "bbh", "triviaqa", "nq", "drop", "hellaswag",
                    "winogrande", "piqa", "siqa", "boolq", "humaneval", "mbpp"]}


def expand_tasks(names: list[str], data_source: str = "local", no_execution: str | None = None
                 ) -> tuple[list[str], dict[str, str]]:
    """Task names to run, and the suite members left out (name -> why): a suite skips the tasks that
    have no local copy (with data.source=local) and the code tasks when programs cannot be run
    (no_execution says why); a task named on its own is never skipped but fails with the reason."""
    out: list[str] = []
    skipped: dict[str, str] = {}
    for n in names:
        for t in SUITES.get(n, [n]):
            spec = tasks.load_spec(t)  # unknown names fail here, listing the valid ones
            why = None
            if data_source == "local" and not spec["data"].get("file"):
                why = tasks.no_local_copy(spec) if n not in SUITES else \
                    f"no local copy of {spec['data']['hub']['id']}; run with data.source=hub"
            elif no_execution and hasattr(scorers.SCORERS.get(spec.get("scorer")), "PROGRAM"):
                why = f"task {t!r} runs generated code: {no_execution}"
            if why:
                if n not in SUITES:
                    raise tasks.TaskError(why)
                skipped[t] = why
            elif t not in out:
                out.append(t)
    return out, skipped


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How generate tasks decode: n samples per prompt; None keeps the task's own setting (greedy)."""
    n: int = 1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"generation.n={self.n!r}: expected a whole number >= 1 (samples per prompt)")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"generation.temperature={self.temperature}: expected >= 0 (0: greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p={self.top_p}: expected a value in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"generation.top_k={self.top_k}: expected >= 0 (0: off)")
        if self.n > 1 and not self.temperature:
            raise ValueError(f"generation.n={self.n} with greedy decoding gives {self.n} identical samples: "
                             "set generation.temperature > 0 as well")

    @property
    def default(self) -> bool:
        return self == Sampling()

    def requests(self, req: Generation, task: str, index: int, seed: int) -> list[Generation]:
        if self.default:
            return [req]
        over = {k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p))
                if v is not None}
        # Each sample has its own generator seed, derived from (run seed, task, item, sample), so what a
        # sample decodes does not depend on batching or on which other tasks run.
        return [dataclasses.replace(req, **over, seed=int.from_bytes(
            hashlib.sha256(f"{seed}/{task}/{index}/{j}".encode()).digest()[:7], "little")) for j in range(self.n)]

    def _derived(self, spec) -> list[tuple[str, str, int, str]]:
        """(name, aggregate, k, base metric) of the metrics that several samples add."""
        if self.n == 1:
            return []
        scorer = scorers.SCORERS[spec["scorer"]]
        out = [(f"maj@{self.n}_{m}", "maj", self.n, m) for m in spec["metrics"] if hasattr(scorer, "ANSWER")]
        return out + [(f"pass@{k}" if m == "pass@1" else f"pass@{k}_{m}", "pass", k, m)
                      for m in spec["metrics"] if m not in scorers.CONTINUOUS for k in metrics.pass_ks(self.n) if k > 1]

    def metric_names(self, spec) -> list[str]:
        return list(spec["metrics"]) + [name for name, *_ in self._derived(spec)]

    def score(self, spec, results: list, doc: dict, outcomes: list | None = None) -> tuple[dict[str, float], list[dict], list]:
        """Per-item metrics from the item's samples: each metric's mean over samples (for one sample,
        its score), maj@n (the score of the most common extracted answer) and pass@k (k > 1).
        outcomes: the sandbox results of code tasks' programs, one per sample."""
        scorer = scorers.SCORERS[spec["scorer"]]
        per_sample = ([scorer(r.text, doc, o) for r, o in zip(results, outcomes)] if outcomes is not None
                      else [scorer(r.text, doc) for r in results])
        got = {m: sum(s[m] for s in per_sample) / len(per_sample) for m in spec["metrics"]}
        answers = [scorer.ANSWER(r.text) for r in results] if hasattr(scorer, "ANSWER") else []
        for name, agg, k, m in self._derived(spec):
            if agg == "maj":
                got[name] = per_sample[metrics.majority_index([a[m] for a in answers], scorers.INVALID)][m]
            else:
                got[name] = metrics.pass_at_k(self.n, int(sum(s[m] for s in per_sample)), k)
        return got, per_sample, answers

    def primary(self, spec) -> str:
        maj = f"maj@{self.n}_{spec['primary']}"
        return maj if maj in self.metric_names(spec) else spec["primary"]


def execution_settings(execution: dict | None) -> tuple[str, int | None, Limits]:
    """(sandbox, workers, limits) from the `execution` config group; ValueError naming a bad option."""
    exec_cfg = dict(execution or {})
    sandbox, workers = exec_cfg.pop("sandbox", "bwrap"), exec_cfg.pop("workers", None)
    try:
        limits = Limits(**exec_cfg)
    except TypeError as e:
        raise ValueError(f"execution: {e}; expected keys sandbox, workers and {', '.join(Limits.__dataclass_fields__)}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"execution.workers={workers!r}: expected null (one per core) or a whole number >= 1")
    return sandbox, workers, limits


def execution_problem(execution: dict) -> str | None:
    """Check the execution settings (ValueError naming the option) and say why code tasks cannot
    run here, or None when they can."""
    sandbox, _, _ = execution_settings(execution)
    try:
        require_sandbox(sandbox)
    except SandboxError as e:
        if sandbox not in SANDBOXES:
            raise ValueError(str(e)) from None
        return str(e)
    return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(model, task_names: list[str], out_dir: Path, *, limit=None, num_fewshot=None, seed=1234,
        batch_size=16, generate_batch_size=64, token_budget=16384, data_source="local", progress=True, chat=False,
        fewshot_sampler=None, share_prefix=True, sampling: Sampling = Sampling(), execution: dict | None = None,
        skipped: dict[str, str] | None = None, config: dict | None = None, cache: str = "off",
        cache_dir: str | Path | None = None, world: World = World()) -> dict:
    """model: a LoadedModel (our network) or a backend from evalsuite.backends.
    cache: off | read | write | refresh (see evalsuite.cache), in cache_dir (default out_dir/cache).
    world: the torchrun ranks sharing the work (evalsuite.distributed); every rank calls run() with the
    same arguments, rank 0 scores, writes the files and returns the results, the others return {}."""
    backend = as_backend(model)
    if world.rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / ".write-test").touch()
            (out_dir / ".write-test").unlink()
        except OSError as e:
            raise ValueError(f"output_dir: cannot write results to {out_dir} ({e.strerror or e})") from None
    key = model_key(backend.describe()) if cache != "off" or world.size > 1 else None  # hashes the code
    result_cache = None
    if cache != "off":
        result_cache = ResultCache(cache_dir or out_dir / "cache", cache, key)
    t_start = time.perf_counter()
    built = {}
    for name in task_names:
        spec = tasks.load_spec(name)
        built[name] = (spec, *tasks.build_items(spec, num_fewshot, limit, seed, data_source, chat=chat,
                                                sampler=fewshot_sampler))
    if world.size > 1:  # merging the shares of ranks that evaluate different things would be silently wrong
        world.agree({"config": fingerprint(config or {}),
                     **{f"model.{k}": fingerprint(v) for k, v in key.items()},
                     **{f"task {name}": fingerprint([prov["data_sha256"], prov["fewshot_sha256"],
                                                     [(it.index, it.requests, it.gold) for it in items]])
                        for name, (spec, items, prov) in built.items()}})
    # All tasks' requests are pooled, per request type, so batching and sharing work across tasks.
    # (task, item) of every request, to name the item when a request is refused
    ll_owned = [((name, it.index), r) for name, (spec, items, _) in built.items() if spec["kind"] != "generate"
                for it in items for r in it.requests]
    gen_owned = [((name, it.index), r) for name, (spec, items, _) in built.items() if spec["kind"] == "generate"
                 for it in items for r in sampling.requests(it.requests[0], name, it.index, seed)]
    ll_requests, gen_requests = [r for _, r in ll_owned], [r for _, r in gen_owned]
    runner = Runner(backend, batch_size=batch_size, generate_batch_size=generate_batch_size,
                    token_budget=token_budget, progress=progress,
                    share_prefix=share_prefix, cache=result_cache, world=world)
    t0 = time.perf_counter()
    ll_results = None
    try:
        ll_results = runner.loglikelihood(ll_requests) if ll_requests else []
        gen_results = runner.generate_until(gen_requests) if gen_requests else []
    except TooLong as e:  # name the task and item, not the runner's request number
        (name, index), _ = (gen_owned if ll_results is not None else ll_owned)[e.index]
        raise ValueError(f"task {name!r}, item {index}: the prompt {e.what} (model.max_position_embeddings). "
                         "evalsuite does not truncate prompts (a cut prompt is not the benchmark's question): "
                         "lower num_fewshot or use a model with a longer context") from None
    finally:
        if result_cache is not None:
            result_cache.close()
    score_seconds = time.perf_counter() - t0
    counts = ("from_cache", "computed", "oom_splits", "tokens_scored", "tokens_forwarded", "tokens_generated")
    per_rank = world.all_gather({"scoring_seconds": score_seconds, "gather_seconds": runner.gather_seconds,
                                 **{c: getattr(runner, c) for c in counts}})
    if world.rank != 0:
        return {}
    total = {c: sum(r[c] for r in per_rank) for c in counts}
    # Code tasks: every sample's program runs in the sandbox, all tasks' programs in one parallel pool.
    programs, g = {}, 0
    for name, (spec, items, _) in built.items():
        if spec["kind"] == "generate":
            program = getattr(scorers.SCORERS[spec["scorer"]], "PROGRAM", None)
            for it in items:
                if program:
                    programs.update((j, program(gen_results[j].text, it.doc)) for j in range(g, g + sampling.n))
                g += sampling.n
    outcomes, exec_info = {}, None
    if programs:
        sandbox, workers, limits = execution_settings(execution)
        t_exec = time.perf_counter()
        outs = run_all(list(programs.values()), limits, sandbox=sandbox, workers=workers, progress=progress)
        outcomes = dict(zip(programs, outs))
        exec_info = {"sandbox": sandbox, "limits": dataclasses.asdict(limits), "python": interpreter(),
                     "containment": containment(), "programs": len(outs), "seconds": time.perf_counter() - t_exec,
                     "statuses": {st: sum(o.status == st for o in outs) for st in sorted({o.status for o in outs})}}
    k = g = 0  # next unread result of each request type
    report: dict[str, Any] = {}
    for name, (spec, items, prov) in built.items():
        generate = spec["kind"] == "generate"
        metric_names = sampling.metric_names(spec) if generate else spec["metrics"]
        per_metric: dict[str, list[float]] = {m: [] for m in metric_names}
        scored_items, unscored = [], []  # unscored: items with a sample the harness could not execute
        with open(out_dir / f"samples_{name}.jsonl", "w") as fh:
            for it in items:
                if generate:
                    res_all = gen_results[g:g + sampling.n]
                    outs = [outcomes[j] for j in range(g, g + sampling.n)] if g in outcomes else None
                    g += sampling.n
                    res = res_all[0]
                    if outs is not None and any(o.status == "error" for o in outs):
                        got, per_sample, answers = None, None, None  # never a zero: the program was not judged
                        unscored.append(it.index)
                    else:
                        got, per_sample, answers = sampling.score(spec, res_all, it.doc, outs)
                    record = {"index": it.index, "prompt": it.prompt, "generation": res.text, "finish": res.finish,
                              "num_tokens": len(res.tokens), "target": it.gold, "scores": got}
                    if outs is not None:
                        execs = [{"status": o.status, "detail": o.detail, "seconds": round(o.seconds, 3),
                                  "output_bytes": o.output_bytes, "memory_peak_mb": o.memory_peak_mb} for o in outs]
                        record["execution"] = execs if sampling.n > 1 else execs[0]
                    if sampling.n > 1:
                        record.update(generation=[r.text for r in res_all], finish=[r.finish for r in res_all],
                                      num_tokens=[len(r.tokens) for r in res_all], sample_scores=per_sample,
                                      answers=answers)
                else:
                    res = ll_results[k:k + len(it.requests)]
                    k += len(it.requests)
                    lps = [r.logprob for r in res]
                    preds = metrics.choice_predictions(lps, it.choices)
                    got = {m: float(preds[m] == it.gold) for m in spec["metrics"]}
                    record = {"index": it.index, "prompt": it.prompt, "choices": it.choices, "gold": it.gold,
                              "logprobs": lps, "is_greedy": [r.is_greedy for r in res],
                              "num_tokens": [r.num_tokens for r in res],
                              "predictions": {m: preds[m] for m in spec["metrics"]}}
                if got is not None:
                    scored_items.append(it)
                    for m in metric_names:
                        per_metric[m].append(got[m])
                record.update(fewshot_indices=it.fewshot_indices, doc=it.doc)
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        scores, groups = {}, {}
        macro_by = spec.get("macro_by")
        for m, vals in per_metric.items():
            if macro_by:  # mean of the subtask means; stderr from the subtasks' independent stderrs
                by: dict[str, list[float]] = {}
                for it, v in zip(scored_items, vals):
                    by.setdefault(str(it.doc[macro_by]), []).append(v)
                sub = {g: metrics.mean_stderr(v) for g, v in by.items()}
                for group, (mean, se) in sub.items():
                    groups.setdefault(group, {"num_items": len(by[group])})[m] = {"value": mean, "stderr": se}
                mean = sum(v[0] for v in sub.values()) / len(sub)
                # nan when a subtask has a single item (no stderr of its own)
                se = math.sqrt(sum(v[1] ** 2 for v in sub.values())) / len(sub)
            else:
                mean, se = metrics.mean_stderr(vals)
            scores[m] = {"value": mean, "stderr": se}
        report[name] = {"paper_row": spec["paper_row"], "version": spec["version"],
                        "primary": sampling.primary(spec) if generate else spec["primary"],
                        "metrics": scores, "num_items": len(scored_items), **prov}
        if unscored:
            report[name]["unscored_items"] = unscored
            report[name]["deviations"] = [*report[name]["deviations"], f"{len(unscored)} items not scored: the "
                                          "harness could not execute their programs (status error in the samples "
                                          "file); rerun to execute them again"]
        if generate and hasattr(scorers.SCORERS[spec["scorer"]], "PROGRAM"):
            report[name]["execution"] = exec_info
            if exec_info and exec_info["sandbox"] == "none":
                report[name]["deviations"] = [*report[name]["deviations"], "generated code ran WITHOUT a sandbox "
                                              "(execution.sandbox=none): rlimits, cgroup and timeout only"]
            if exec_info and exec_info["containment"]["cgroup"] is None:
                report[name]["deviations"] = [*report[name]["deviations"], "no cgroup for the sandboxes ("
                                              f"{exec_info['containment']['why_no_cgroup']}); bounds: "
                                              f"{exec_info['containment']['bounds']}"]
        if generate and not sampling.default:
            report[name]["sampling"] = dataclasses.asdict(sampling)
            report[name]["deviations"] = [*report[name]["deviations"], f"decoding changed from the task's setting: "
                                          f"{', '.join(f'{k}={v}' for k, v in dataclasses.asdict(sampling).items())}"]
        if macro_by:
            report[name].update(aggregation=f"macro average over {len(groups)} {macro_by} groups", groups=groups)
    out = {
        "evalsuite_version": "0.1.0", "git_commit": git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {}, "model": backend.describe(),
        "tasks": report, "skipped_tasks": skipped or {},
        "timing": {"wall_seconds": time.perf_counter() - t_start, "scoring_seconds": score_seconds,
                   "requests": len(ll_requests) + len(gen_requests), "tokens_scored": total["tokens_scored"],
                   "tokens_forwarded": total["tokens_forwarded"], "tokens_generated": total["tokens_generated"],
                   "tokens_per_second": total["tokens_forwarded"] / score_seconds if score_seconds else None,
                   "oom_splits": total["oom_splits"]},  # batches halved after running out of memory
        "cache": {"mode": cache, "dir": str(result_cache.folder) if result_cache else None,
                  "requests_from_cache": total["from_cache"], "requests_computed": total["computed"]},
    }
    if world.size > 1:  # each rank's share, to see the balance
        out["distributed"] = {"world_size": world.size, "ranks": per_rank}
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    (out_dir / "summary.md").write_text(summary_markdown(out))
    try:  # the results are on disk already; a report that cannot be drawn must not lose them
        from . import report
        report.write([out_dir])
    except Exception as e:  # noqa: BLE001
        print(f"warning: report not written ({type(e).__name__}: {e}); "
              f"retry with python -m evalsuite.report {out_dir}")
    return out


def summary_markdown(res: dict) -> str:
    lines = [f"Model: {res['model']['source']} ({(res['model']['fingerprint_sha256'] or '')[:12]}, "
             f"backend {res['model']['backend']})", "",
             "| task | metric | value | ± stderr | items | shots | notes |", "|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        for m, s in t["metrics"].items():
            mark = " (primary)" if m == t["primary"] else ""
            lines.append(f"| {name} | {m}{mark} | {100 * s['value']:.2f} | {100 * s['stderr']:.2f} | "
                         f"{t['num_items']} | {t['num_fewshot']} | {'; '.join(t['deviations'])} |")
    for name, why in res.get("skipped_tasks", {}).items():
        lines.append(f"| {name} | not run | | | | | {why} |")
    tm = res["timing"]
    lines += ["", f"{tm['requests']} requests, {tm['tokens_forwarded']} tokens forwarded and "
                  f"{tm.get('tokens_generated', 0)} generated in {tm['scoring_seconds']:.1f}s "
                  f"({tm['tokens_per_second'] or 0:.0f} tokens forwarded/s); wall {tm['wall_seconds']:.1f}s"]
    return "\n".join(lines) + "\n"
