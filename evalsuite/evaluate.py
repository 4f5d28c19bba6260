"""Run tasks on a model: build the items, have every request answered, run the programs of code
tasks, score each task and write results.json and samples_<task>.jsonl (evalsuite.records).

    run(model, ["mmlu", "gsm8k"], out_dir, Settings(limit=100))

Every step keys what it produces by (task, item index), so nothing is matched by position. The
command line (evalsuite.__main__) renders the summary and the report from what `run` wrote.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import metrics, records, tasks
from .backends import as_backend
from .cache import ResultCache
from .distributed import World, fingerprint
from .execution import SandboxError, containment, interpreter, require_sandbox, run_all
from .kinds import KINDS, Item, TaskKind
from .requests import Generation, Loglikelihood, RequestBackend, RequestFailed, TooLong
from .runner import Runner
from .settings import ExecutionSettings, Settings

Key = tuple[str, int]  # (task, item index)
COUNTS = ("from_cache", "computed", "oom_splits", "tokens_scored", "tokens_forwarded", "tokens_generated")


@dataclass
class BuiltTask:
    name: str
    spec: tasks.TaskSpec
    kind: TaskKind
    items: list[Item]
    provenance: dict[str, Any]


def expand_tasks(names: list[str], data_source: str = "local", no_execution: str | None = None,
                 no_classifier=None) -> tuple[list[str], dict[str, str]]:
    """Task names to run, and the suite members left out (name -> why): a suite skips the tasks that
    have no local copy (with data.source=local), the code tasks when programs cannot be run
    (no_execution says why) and the toxicity tasks when the classifier cannot be loaded
    (no_classifier(): why, asked only when such a task is named); a task named on its own is never
    skipped but fails with the reason."""
    out: list[str] = []
    classifier_problem = functools.cache(no_classifier) if no_classifier is not None else None
    skipped: dict[str, str] = {}
    suites = tasks.suites()
    for n in names:
        for t in suites.get(n, [n]):
            spec = tasks.load_spec(t)  # unknown names fail here, listing the valid ones
            why = None
            if data_source == "local" and not spec.data.file:
                why = tasks.no_local_copy(spec) if n not in suites else \
                    f"no local copy of {spec.data.hub.id}; run with data.source=hub"
            elif no_execution and KINDS[spec.kind].runs_code(spec):
                why = f"task {t!r} runs generated code: {no_execution}"
            elif KINDS[spec.kind].classifies and classifier_problem and classifier_problem():
                why = f"task {t!r} scores generations by toxicity: {classifier_problem()}"
            if why:
                if n not in suites:
                    raise tasks.TaskError(why)
                skipped[t] = why
            elif t not in out:
                out.append(t)
    return out, skipped


def execution_problem(execution: ExecutionSettings) -> str | None:
    """Why code tasks cannot run here, or None when they can."""
    try:
        require_sandbox(execution.sandbox)
    except SandboxError as e:
        return str(e)
    return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(model, task_names: list[str], out_dir: Path, settings: Settings | None = None, *,
        skipped: dict[str, str] | None = None, config: dict | None = None, world: World = World()) -> dict:
    """model: a LoadedModel (our network), a backend from evalsuite.backends, or a RequestBackend.
    world: the torchrun ranks sharing the work (evalsuite.distributed); every rank calls run() with the
    same arguments, rank 0 scores, writes the files and returns what results.json holds, the others {}."""
    settings = settings or Settings()
    t_start = time.perf_counter()
    if world.rank == 0:
        _check_writable(out_dir)
    engine = request_engine(model, settings, out_dir, world)
    built = [build_task(name, settings) for name in task_names]
    if world.size > 1:  # merging the shares of ranks that evaluate different things would be silently wrong
        world.agree({"config": fingerprint(config or {}),
                     **{f"model.{k}": fingerprint(v) for k, v in engine.version_key().items()},
                     **{f"task {b.name}": fingerprint([b.provenance["data_sha256"], b.provenance["fewshot_sha256"],
                                                       [(it.index, it.requests, it.gold) for it in b.items]])
                        for b in built}})
    cache = getattr(engine, "cache", None)  # the runner's or a server backend's result cache, if any
    t0 = time.perf_counter()
    try:
        answers, requests = answer_requests(engine, built, settings)
    finally:
        if cache is not None:
            cache.close()
    score_seconds = time.perf_counter() - t0
    per_rank = world.all_gather({"scoring_seconds": score_seconds, "gather_seconds": getattr(engine, "gather_seconds", 0.0),
                                 **{c: getattr(engine, c, 0) for c in COUNTS}})
    if world.rank != 0:
        return {}
    outcomes, exec_info = run_programs(built, answers, settings)
    verdicts, classifier_info = classify(built, answers, settings)
    outcomes.update(verdicts)
    results = {b.name: score_task(b, answers, outcomes, exec_info, settings, out_dir, classifier_info,
                                    getattr(engine, "deviations", ())) for b in built}
    total = {c: sum(r[c] for r in per_rank) for c in COUNTS}
    result = records.RunResult(
        evalsuite_version="0.1.0", git_commit=git_commit(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        config=config or {}, model=engine.describe(), tasks=results, skipped_tasks=skipped or {},
        timing={"wall_seconds": time.perf_counter() - t_start, "scoring_seconds": score_seconds, "requests": requests,
                "tokens_scored": total["tokens_scored"], "tokens_forwarded": total["tokens_forwarded"],
                "tokens_generated": total["tokens_generated"],
                "tokens_per_second": total["tokens_forwarded"] / score_seconds if score_seconds else None,
                "oom_splits": total["oom_splits"]},  # batches halved after running out of memory
        cache={"mode": settings.cache if cache else "off", "dir": str(cache.folder) if cache else None,
               "requests_from_cache": total["from_cache"], "requests_computed": total["computed"]},
        distributed={"world_size": world.size, "ranks": per_rank} if world.size > 1 else None)
    return records.write_results(out_dir, result)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise ValueError(f"output_dir: cannot write results to {out_dir} ({e.strerror or e})") from None


def request_engine(model, settings: Settings, out_dir: Path, world: World) -> RequestBackend:
    """What answers the requests: a backend that answers them itself, or the runner over one that
    exposes hidden states, with the result cache (keys from the backend's version key)."""
    backend = model if isinstance(model, RequestBackend) else as_backend(model)
    if isinstance(backend, RequestBackend):
        if getattr(backend, "caches", False) and settings.cache != "off":  # a server backend keeps its own cache
            backend.cache = ResultCache(settings.cache_dir or out_dir / "cache", settings.cache, backend.version_key())
        return backend
    cache = None
    if settings.cache != "off":
        cache = ResultCache(settings.cache_dir or out_dir / "cache", settings.cache, backend.version_key())
    return Runner(backend, batch_size=settings.batch_size, generate_batch_size=settings.generate_batch_size,
                  scheduler=settings.decode_scheduler, kv_cache_gib=settings.kv_cache_gib,
                  token_budget=settings.token_budget, progress=settings.progress, share_prefix=settings.share_prefix,
                  cache=cache, world=world)


def build_task(name: str, settings: Settings) -> BuiltTask:
    spec = tasks.load_spec(name)
    items, provenance = tasks.build_items(spec, settings.num_fewshot, settings.limit, settings.seed,
                                          settings.data.source, chat=settings.chat_format(), sampler=settings.fewshot_sampler)
    return BuiltTask(name, spec, KINDS[spec.kind], items, provenance)


def answer_requests(engine: RequestBackend, built: list[BuiltTask], settings: Settings
                    ) -> tuple[dict[Key, list], int]:
    """Every item's answers, in the order of its requests, and the number of requests. All tasks'
    requests are pooled per request type, so batching and prefix sharing work across tasks."""
    answer = {Loglikelihood: engine.loglikelihood, Generation: engine.generate_until}  # the one switch on type
    pooled: dict[type, list[tuple[Key, Any]]] = {t: [] for t in answer}
    for b in built:
        for it in b.items:
            for req in b.kind.requests(b.spec, it, settings.generation, settings.seed):
                pooled[type(req)].append(((b.name, it.index), req))
    answers: dict[Key, list] = {(b.name, it.index): [] for b in built for it in b.items}
    for kind, owned in pooled.items():
        if not owned:
            continue
        try:
            results = answer[kind]([r for _, r in owned])
        except TooLong as e:  # name the task and item, not the request's number in the pool
            (name, index), _ = owned[e.index]
            raise ValueError(f"task {name!r}, item {index}: the prompt {e.what} (model.max_position_embeddings). "
                             "evalsuite does not truncate prompts (a cut prompt is not the benchmark's question): "
                             "lower num_fewshot or use a model with a longer context") from None
        except RequestFailed as e:  # an engine's failure: never a zero, the run stops naming the item
            (name, index), _ = owned[e.index]
            raise ValueError(f"task {name!r}, item {index}: {e.what}. Every request answered before it is kept in "
                             "the result cache (unless cache=off): the same command resumes from there") from None
        for (key, _), res in zip(owned, results, strict=True):
            answers[key].append(res)
    return answers, sum(len(o) for o in pooled.values())


def run_programs(built: list[BuiltTask], answers: dict[Key, list], settings: Settings
                 ) -> tuple[dict[Key, list], dict | None]:
    """Code tasks: every sample's program runs in the sandbox, all tasks' programs in one parallel pool.
    The verdicts per item, and what results.json records about the execution."""
    programs: dict[Key, list] = {}
    for b in built:
        for it in b.items:
            got = b.kind.programs(b.spec, it, answers[(b.name, it.index)])
            if got:
                programs[(b.name, it.index)] = got
    if not programs:
        return {}, None
    ex, limits = settings.execution, settings.execution.limits()
    flat = [p for progs in programs.values() for p in progs]
    t0 = time.perf_counter()
    outs = iter(run_all(flat, limits, sandbox=ex.sandbox, workers=ex.workers, progress=settings.progress))
    outcomes = {key: [next(outs) for _ in progs] for key, progs in programs.items()}
    statuses = [o.status for per in outcomes.values() for o in per]
    info = {"sandbox": ex.sandbox, "limits": dataclasses.asdict(limits), "python": interpreter(),
            "containment": containment(), "programs": len(flat), "seconds": time.perf_counter() - t0,
            "statuses": {st: statuses.count(st) for st in sorted(set(statuses))}}
    return outcomes, info


def classify(built: list[BuiltTask], answers: dict[Key, list], settings: Settings) -> tuple[dict[Key, list], dict | None]:
    """Toxicity tasks: every generation's verdict from the classifier (evalsuite.toxicity), per item,
    and what results.json records about the classifier."""
    owned = [(b.name, it.index) for b in built if b.kind.classifies for it in b.items]
    if not owned:
        return {}, None
    from .toxicity import load

    tx = settings.toxicity
    clf = load(tx.classifier, tx.revision, tx.toxic_label, tx.device)
    texts = [r.text for key in owned for r in answers[key]]
    t0 = time.perf_counter()
    verdicts = iter(clf.score(texts, tx.batch_size))
    out = {key: [next(verdicts) for _ in answers[key]] for key in owned}
    flat = [v for per in out.values() for v in per]
    info = {**clf.info, "toxic_at": KINDS["generate_toxicity"].TOXIC_AT, "texts": len(flat),
            "failed": sum(v.toxicity is None for v in flat), "truncated": sum(v.truncated for v in flat),
            "seconds": time.perf_counter() - t0}
    return out, info


def score_task(b: BuiltTask, answers: dict[Key, list], outcomes: dict[Key, list], exec_info: dict | None,
               settings: Settings, out_dir: Path, classifier_info: dict | None = None,
               engine_deviations=()) -> records.TaskResult:
    """Scores every item (its record goes to samples_<task>.jsonl) and aggregates the task's metrics.
    An item whose program the harness could not execute is recorded but not scored: never a zero."""
    sampling = settings.generation
    names = b.kind.metric_names(b.spec, sampling)
    values: dict[str, list[float]] = {m: [] for m in names}
    scored_items, unscored = [], []
    writer = records.SamplesWriter(out_dir, b.name)
    try:
        for it in b.items:
            key = (b.name, it.index)
            scored = b.kind.score(b.spec, it, answers[key], outcomes.get(key), sampling)
            writer.write(scored.record)
            if scored.scores is None:
                unscored.append(it.index)
                continue
            scored_items.append(it)
            for m in names:
                values[m].append(scored.scores[m])
    finally:
        writer.close()
    result = aggregate(b, values, scored_items)
    # the engine's (a server scored without its parity gate) are every task's
    result.provenance = {**b.provenance, "deviations": [*b.provenance["deviations"], *engine_deviations]}
    add_deviations(b, result, unscored, exec_info, sampling)
    if b.kind.classifies:
        result.classifier = classifier_info
    return result


def aggregate(b: BuiltTask, values: dict[str, list[float]], items: list[Item]) -> records.TaskResult:
    """The task's metrics from its scored items: the mean (or a macro average over `macro_by` groups),
    the kind's ratio metrics with bootstrap standard errors, and with `breakdown` all of them per group."""
    docs = [it.doc for it in items]
    rule = metrics.MacroMean(b.spec.macro_by) if b.spec.macro_by else metrics.Mean()
    scores, groups = {}, {}
    clusters = [it.cluster for it in items]
    for m, vals in values.items():
        mean, se, per_group = rule(vals, docs)
        scores[m] = records.Score.of(mean, se, len(vals), macro=per_group is not None)
        if per_group is not None:  # a macro average: its groups are the clusters
            scores[m].stderr_clustered = metrics.between_groups_stderr([g[1] for g in per_group.values()])
            scores[m].clusters = len(per_group)
        elif b.spec.cluster:
            scores[m].stderr_clustered, scores[m].clusters = metrics.clustered_stderr(vals, clusters)
        for g, (n, g_mean, g_se) in (per_group or {}).items():
            groups.setdefault(g, {"num_items": n})[m] = records.Score.of(g_mean, g_se, n).to_json()
    scores.update(ratio_scores(b, values, docs))
    if b.spec.breakdown:
        by: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by.setdefault(it.group, []).append(i)
        for g, idx in sorted(by.items()):
            sub = {m: [vals[i] for i in idx] for m, vals in values.items()}
            groups[g] = {"num_items": len(idx),
                         **{m: records.Score.of(*metrics.mean_stderr(v), len(v)).to_json() for m, v in sub.items()},
                         **{m: s.to_json() for m, s in ratio_scores(b, sub, [docs[i] for i in idx]).items()}}
    result = records.TaskResult(paper_row=b.spec.paper_row, version=b.spec.version, primary=b.spec.primary,
                                metrics=scores, num_items=len(docs), provenance={})
    if b.spec.macro_by:
        result.aggregation, result.groups = rule.describe(len(groups)), groups
    elif b.spec.breakdown:
        result.aggregation, result.groups = f"mean over all items; groups: the same metrics over each of {len(groups)} groups", groups
    return result


def ratio_scores(b: BuiltTask, values: dict[str, list[float]], docs: list[dict]) -> dict[str, records.Score]:
    """The kind's metrics that are no mean of per-item values, each with a bootstrap standard error."""
    out = {}
    for m, value in b.kind.ratio_metrics(b.spec, values, docs).items():
        se = metrics.bootstrap_stderr(lambda **cols: b.kind.ratio_metrics(b.spec, cols, docs)[m], values)
        out[m] = records.Score.of(value, se, len(docs))
    return out


def add_deviations(b: BuiltTask, result: records.TaskResult, unscored: list[int], exec_info: dict | None,
                   sampling) -> None:
    """What the report must flag: unscored items, how code ran, decoding changed from the task's setting."""
    deviations = result.provenance["deviations"]
    result.primary = b.kind.primary(b.spec, sampling)
    if unscored:
        result.unscored_items = unscored
        deviations.append(f"{len(unscored)} items not scored: {b.kind.unscored_why}")
    if b.kind.runs_code(b.spec):
        result.execution = exec_info
        if exec_info and exec_info["sandbox"] == "none":
            deviations.append("generated code ran WITHOUT a sandbox (execution.sandbox=none): rlimits, cgroup and "
                              "timeout only")
        if exec_info and exec_info["containment"]["cgroup"] is None:
            c = exec_info["containment"]
            deviations.append(f"no cgroup for the sandboxes ({c['why_no_cgroup']}); bounds: {c['bounds']}")
    if b.kind.decodes and not sampling.default:
        result.sampling = dataclasses.asdict(sampling)
        deviations.append("decoding changed from the task's setting: "
                          f"{', '.join(f'{k}={v}' for k, v in dataclasses.asdict(sampling).items())}")
