"""Reports of one or more runs against the published numbers, as Markdown and one self-contained HTML.

    python -m evalsuite.report <run dir> [<run dir> ...] [--format md,html] [--out DIR]
                               [--published-model gemma-2-9b]

Per task: our primary metric ± 95% CI (1.96 standard errors), the published value, the difference,
whether the published value lies inside our interval, and flags where our protocol differs from
the published one (shots, a limit, exemplars from the evaluation split, decoding, sandbox). Several
runs become columns side by side. The HTML has inline SVG charts (matplotlib) and, per task, a
drill-down into the first samples.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from functools import lru_cache
from pathlib import Path

import jinja2

from . import tasks
from .metrics import NOT_SHARES
from .records import load_run, read_samples

REPORTS_DIR = Path(__file__).resolve().parents[1] / "reports"
# Which source a report uses when several published the same (model, benchmark, shots): the first match.
SOURCE_ORDER = ("arXiv:2408.00118", "arXiv:2503.19786", "arXiv:2403.08295", "HF model card")
SAMPLES_SHOWN = 20


@lru_cache(maxsize=None)
def registry() -> tuple[dict, ...]:
    with open(REPORTS_DIR / "published_numbers.csv", newline="") as fh:
        rows = tuple(csv.DictReader(fh))
    for r in rows:  # a few human-evaluation rows carry "24.3 ± 1.9" or "57.5 (53/9/38)": the leading number
        r["text"] = r["value"]
        lead = re.match(r"-?\d+(\.\d+)?", r["value"].strip())
        r["value"] = float(lead.group()) if lead else None
    return rows


def published_row(task: str) -> dict | None:
    """The published row our task reproduces (its spec's `published:`), or None (an unknown task)."""
    try:
        pub = tasks.load_spec(task).published
    except tasks.TaskError:
        return None
    return ({"benchmark": pub.benchmark, "shots": pub.shots, "ours": pub.ours, "protocol_stated": pub.protocol_stated}
            if pub else None)


def _source_rank(source: str) -> int:
    return next((i for i, s in enumerate(SOURCE_ORDER) if source.startswith(s) or s in source[:40]), len(SOURCE_ORDER))


def published_model(run: dict) -> tuple[str, str] | None:
    """(model, variant) in the registry's names from the run's model settings: preset gemma2_9b ->
    (gemma-2-9b, pt); `variant: it` (the -it presets) -> the instruction-tuned column; `published:`
    names the registry model where the preset cannot (gemma1_2b_it is gemma-1.1-2b)."""
    cfg = run.get("config", {}).get("model") or {}
    m = re.fullmatch(r"gemma(\d)_([a-z0-9_]+?)(_it)?", cfg.get("preset") or "")  # gemma4_26b_a4b -> gemma-4-26b-a4b
    model = cfg.get("published") or (f"gemma-{m.group(1)}-{m.group(2).replace('_', '-')}" if m else None)
    variant = cfg.get("variant") or ("it" if m and m.group(3) else "pt")
    return (model, variant) if model else None


def lookup(model: str, variant: str, task: str) -> dict | None:
    """The published row the report uses for our task on this model, plus the other sources' values."""
    spec = published_row(task)
    if spec is None:
        return None
    rows = [r for r in registry() if r["model"] == model and r["variant"] == variant and r["benchmark"] == spec["benchmark"] and r["value"] is not None]
    if not rows:
        return None
    same_shots = [r for r in rows if r["shots"] == spec["shots"]]
    pool = same_shots or rows
    used = min(pool, key=lambda r: _source_rank(r["source"]))
    others = [{"value": r["value"], "shots": r["shots"], "metric": r["metric"], "source": r["source"]}
              for r in rows if r is not used]
    return {"value": used["value"], "shots": used["shots"], "metric": used["metric"], "source": used["source"],
            "shots_match": bool(same_shots), "others": others}


def _flags(task: dict, spec: dict | None, pub: dict | None) -> list[str]:
    flags = []
    shots = str(task.get("num_fewshot"))
    if spec and shots != spec["shots"] and not (spec["shots"] == "3-5" and shots in ("3-5", "3", "4", "5")):
        flags.append(f"shots {shots} (paper {spec['shots']})")
    if pub and not pub["shots_match"]:
        flags.append(f"published row has shots {pub['shots']!r}")
    for d in task.get("deviations", []):
        if d.startswith("limit="):
            flags.append(d)
        elif "evaluation split" in d:
            flags.append("exemplars from the evaluation split")
        elif "decoding changed" in d:
            flags.append(d)
        elif "WITHOUT a sandbox" in d:
            flags.append("code ran without a sandbox")
        elif d.startswith("no cgroup for the sandboxes") or "items not scored" in d:
            flags.append(d)
    if task.get("chat_format"):
        flags.append("chat format")
    if spec and not spec["protocol_stated"]:
        flags.append("protocol not stated in the paper" + (f" (ours: {spec['ours']})" if spec["ours"] else ""))
    return flags


def group_rows(task: dict) -> list[dict]:
    """The primary metric per group (a macro average's subtasks, or a breakdown: bias type, category,
    gender) for the drill-down, in percent."""
    out = []
    for g, row in (task.get("groups") or {}).items():
        m = row.get(task["primary"]) or {}
        value = math.nan if m.get("value") is None else 100 * m["value"]
        ci = math.nan if m.get("stderr") is None else 196 * m["stderr"]
        out.append({"group": g, "num_items": row["num_items"], "value": value, "ci95": ci})
    return out


def task_rows(run: dict, model: tuple[str, str] | None) -> list[dict]:
    rows = []
    for name, t in run["tasks"].items():
        m = t["metrics"][t["primary"]]
        se = math.nan if m["stderr"] is None else 100 * m["stderr"]  # null: not computable (one item)
        value = math.nan if m["value"] is None else 100 * m["value"]
        lo, hi = value - 1.96 * se, value + 1.96 * se
        pub = lookup(*model, name) if model else None
        spec = published_row(name)
        rows.append({
            "task": name, "metric": t["primary"], "num_items": t["num_items"], "value": value, "ci95": 1.96 * se,
            "published": pub, "delta": value - pub["value"] if pub else None,
            "inside": (lo <= pub["value"] <= hi) if pub and not math.isnan(se) else None,
            "flags": _flags(t, spec, pub), "benchmark": spec["benchmark"] if spec else name,
            "groups": group_rows(t), "aggregation": t.get("aggregation"),
        })
    return rows


def samples(run: dict, task: str, n: int = SAMPLES_SHOWN) -> list[dict]:
    """The first n records of a task as the report shows them."""
    if not (Path(run["_dir"]) / f"samples_{task}.jsonl").exists():
        return []
    out = []
    for _, rec in read_samples(run, task):
        out.append(_shown(rec, run["tasks"][task]["primary"]))
        if len(out) >= n:
            break
    return out


def _shown(rec: dict, primary: str) -> dict:
    prompt = rec.get("prompt", "")
    shown = {"index": rec["index"], "prompt_tail": prompt[-600:], "prompt_cut": len(prompt) > 600}
    if "generation" in rec:
        gen = rec["generation"]
        shown.update(answer=gen if isinstance(gen, str) else gen[0], gold=str(rec.get("target", "")),
                     scores=rec["scores"])
        if "execution" in rec:
            ex = rec["execution"] if isinstance(rec["execution"], dict) else rec["execution"][0]
            shown["execution"] = f"{ex['status']} {ex['detail']}".strip()
    elif "scores" in rec:  # a kind whose score is not one right choice (MC2 mass, BBQ's answers)
        pred = rec["predictions"].get(primary, max(range(len(rec["logprobs"])), key=rec["logprobs"].__getitem__))
        golds = rec["gold"] if isinstance(rec["gold"], list) else [rec["gold"]]
        shown.update(answer=f"{rec['choices'][pred]} (choice {pred})",
                     gold="; ".join(f"{rec['choices'][g]} (choice {g})" for g in golds), scores=rec["scores"],
                     logprobs=[round(x, 3) for x in rec["logprobs"]])
    else:
        pred = rec["predictions"].get(primary)
        shown.update(answer=f"{rec['choices'][pred]} (choice {pred})", gold=f"{rec['choices'][rec['gold']]} "
                     f"(choice {rec['gold']})", scores={"correct": float(pred == rec["gold"])},
                     logprobs=[round(x, 3) for x in rec["logprobs"]])
    return shown


def chart_svg(label: str, rows: list[dict]) -> str:
    """Ours (with 95% CI) against the published value per task, as inline SVG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["task"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["value"] for r in rows], height=0.4, label="ours",
            xerr=[0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows], color="#3b6fb6", capsize=2)
    ax.barh([i - 0.2 for i in y], [r["published"]["value"] if r["published"] else 0 for r in rows], height=0.4,
            label="published", color="#d9822b")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("score (%)")
    ax.set_title(label, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})  # no timestamp: same runs, same file
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(REPORTS_DIR), undefined=jinja2.StrictUndefined,
                             autoescape=autoescape, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=2: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    env.filters["signed"] = lambda v: "–" if v is None else f"{v:+.2f}"
    return env


def engine(model: dict) -> str:
    """How the numbers were computed: dtype and device for our network and transformers; for a
    served model its name and the parity gate's outcome."""
    if model.get("backend") != "openai":
        return ", ".join(str(model[k]) for k in ("dtype", "device") if model.get(k))
    p = model.get("parity") or {}
    if p.get("status") != "passed":
        return f"served model {model.get('served_model')}; parity gate {str(p.get('status', 'not run')).upper()}: " \
               "numbers NOT checked against our network"
    return (f"served model {model.get('served_model')}; parity gate passed: max |delta log-prob| "
            f"{p['max_abs_delta']:.2e} <= {p['tolerance']} on {p['tokens_compared']} probe tokens vs {p['reference']}")


def context(runs: list[dict], published: tuple[str, str] | None = None) -> dict:
    cols = []
    for i, run in enumerate(runs):
        model = published or published_model(run)
        rows = task_rows(run, model)
        label = f"run {i + 1}: {Path(run['_dir']).name}"
        cols.append({"label": label, "dir": run["_dir"], "model": run["model"], "engine": engine(run["model"]),
                     "created": run.get("created", ""),
                     "published_model": " ".join(model) if model else None, "rows": {r["task"]: r for r in rows},
                     "row_list": rows, "timing": run["timing"], "skipped": run.get("skipped_tasks", {}),
                     "samples": {r["task"]: samples(run, r["task"]) for r in rows}})
    tasks = []
    for c in cols:
        tasks += [t for t in c["rows"] if t not in tasks]
    return {"runs": cols, "tasks": tasks, "source_order": SOURCE_ORDER}


def render(runs: list[dict], fmt: str, published: tuple[str, str] | None = None) -> str:
    ctx = context(runs, published)
    if fmt == "html":
        for c in ctx["runs"]:
            c["chart"] = chart_svg(c["label"], c["row_list"])
        return _env(True).get_template("report.html.j2").render(**ctx)
    if fmt == "md":
        return _env(False).get_template("report.md.j2").render(**ctx)
    raise ValueError(f"--format {fmt!r}: expected md or html")


def write(run_dirs: list[str | Path], formats=("md", "html"), out: str | Path | None = None,
          published: tuple[str, str] | None = None) -> list[Path]:
    runs = [load_run(d) for d in run_dirs]
    out = Path(out or run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out / f"report.{fmt}"
        path.write_text(render(runs, fmt, published))
        written.append(path)
    return written


def summary_markdown(res: dict) -> str:
    """The table the command line prints after a run (and summary.md)."""
    def pct(v, metric):
        return "–" if v is None else f"{v:.3f}" if metric in NOT_SHARES else f"{100 * v:.2f}"
    lines = [f"Model: {res['model']['source']} ({(res['model']['fingerprint_sha256'] or '')[:12]}, "
             f"backend {res['model']['backend']}; {engine(res['model'])})", "",
             "| task | metric | value | ± stderr | items | shots | notes |", "|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        for m, s in t["metrics"].items():
            mark = " (primary)" if m == t["primary"] else ""
            lines.append(f"| {name} | {m}{mark} | {pct(s['value'], m)} | {pct(s['stderr'], m)} | "
                         f"{t['num_items']} | {t['num_fewshot']} | {'; '.join(t['deviations'])} |")
    for name, why in res.get("skipped_tasks", {}).items():
        lines.append(f"| {name} | not run | | | | | {why} |")
    tm = res["timing"]
    lines += ["", f"{tm['requests']} requests, {tm['tokens_forwarded']} tokens forwarded and "
                  f"{tm.get('tokens_generated', 0)} generated in {tm['scoring_seconds']:.1f}s "
                  f"({tm['tokens_per_second'] or 0:.0f} tokens forwarded/s); wall {tm['wall_seconds']:.1f}s"]
    return "\n".join(lines) + "\n"


def publish(run_dir: Path, res: dict) -> str:
    """summary.md and the report of a finished run; the summary's text. The results are on disk
    already: a report that cannot be drawn must not lose them, so it only warns."""
    summary = summary_markdown(res)
    (Path(run_dir) / "summary.md").write_text(summary)
    try:
        write([run_dir])
    except Exception as e:  # noqa: BLE001
        print(f"warning: report not written ({type(e).__name__}: {e}); "
              f"retry with python -m evalsuite.report {run_dir}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalsuite.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with results.json)")
    ap.add_argument("--format", default="md,html", help="comma-separated: md, html")
    ap.add_argument("--out", help="directory for report.md / report.html (default: the first run's)")
    ap.add_argument("--published-model", help="registry model to compare with, e.g. gemma-2-9b or gemma-2-9b:it "
                                              "(default: from each run's model preset)")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "html")]
    if bad:
        print(f"--format: {', '.join(bad)} not supported; expected md and/or html", file=sys.stderr)
        return 2
    published = None
    if args.published_model:
        model, _, variant = args.published_model.partition(":")
        if not any(r["model"] == model for r in registry()):
            print(f"--published-model {model!r}: not in reports/published_numbers.csv; models: "
                  f"{', '.join(sorted({r['model'] for r in registry() if r['model'].startswith('gemma-')}))}", file=sys.stderr)
            return 2
        published = (model, variant or "pt")
    try:
        for path in write(args.runs, formats, args.out, published):
            print(path)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
