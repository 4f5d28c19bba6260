"""python -m evalsuite +tasks=[mmlu,arc_c] model=gemma2_9b limit=100 (Hydra; see conf/config.yaml)."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import settings as settings_schema

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BAD_INPUT = 2  # every bad input (config, task, model, data): one paragraph on stderr and this status
INTERRUPTED = 130


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    handle(cfg)


def handle(cfg: DictConfig) -> None:
    """Errors end the run with one paragraph naming the culprit and exit status 2 (debug=true: the
    traceback); Ctrl-C says where the finished work is kept."""
    try:
        run(cfg)
    except KeyboardInterrupt:
        where = cache_dir(cfg) if cfg.cache != "off" else None
        print("interrupted. " + (f"Every finished batch is kept in the result cache {where}: run the same "
                                 "command again to compute only what is missing." if where else
                                 "The result cache was off (cache=off), so nothing was kept."), file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as e:  # noqa: BLE001 -- the one place that turns errors into messages
        if cfg.get("debug"):
            raise
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(rank + error_message(e), file=sys.stderr)
        sys.exit(BAD_INPUT)
    finally:
        from .distributed import close
        close()


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"


def error_message(e: BaseException) -> str:
    from .data import DataError
    from .execution import SandboxError
    from .model.tokenizer import TokenizerError
    from .model.weights import WeightsError
    from .runner import NumericsError

    known = (ValueError, DataError, WeightsError, TokenizerError, SandboxError, NumericsError, FileNotFoundError,
             PermissionError)
    if isinstance(e, known):
        return f"error: {e}\n(debug=true shows the traceback)"
    if isinstance(e, torch.OutOfMemoryError):
        return ("error: out of memory even for a batch of one request (batches are halved and retried before "
                "this): use a smaller model or dtype=bfloat16 on a GPU, or a device with more memory\n"
                "(debug=true shows the traceback)")
    return (f"internal error: {type(e).__name__}: {e}\nThis is a bug in evalsuite, or a case it does not handle; "
            "run again with debug=true for the traceback and report it.")


def run(cfg: DictConfig) -> None:
    from . import distributed, evaluate, report, tasks
    from .backends import load_backend

    settings: settings_schema.Settings = OmegaConf.to_object(cfg)  # ranges checked: ValueError naming the key
    settings.cache_dir = str(cache_dir(cfg))  # beside the runs, shared by them (evaluate's default: in the run)
    names = settings.task_names()
    if not names:
        raise ValueError("no tasks given: add tasks=NAME or tasks=[A,B]; tasks: "
                         f"{', '.join(tasks.available_tasks())}; suites: {', '.join(tasks.suites())}")
    from .toxicity import problem

    tx = settings.toxicity
    task_names, skipped = evaluate.expand_tasks(names, settings.data.source,
                                                evaluate.execution_problem(settings.execution),
                                                lambda: problem(tx.classifier, tx.revision))
    world = distributed.init(settings.device, settings.dist_timeout_minutes)  # a world of one without torchrun
    device = settings.device
    if world.size > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
        device = f"cuda:{world.local_rank}"  # one GPU per rank
    model = load_backend(settings.model, device=device, dtype=settings.dtype, attention=settings.attention,
                         server=settings.server, progress=settings.progress)
    run_id = world.broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{settings.model.preset or 'model'}")
    out_dir = Path(settings.output_dir) / run_id
    res = evaluate.run(model, task_names, out_dir, settings, skipped=skipped,
                       config=OmegaConf.to_container(cfg, resolve=True), world=world)
    if world.rank != 0:  # rank 0 writes and prints the results of all ranks
        return
    print(report.publish(out_dir, res))
    c = res["cache"]
    if c["mode"] != "off":
        print(f"result cache {c['dir']}: {c['requests_from_cache']} requests read, {c['requests_computed']} computed")
    print(f"results: {out_dir / 'results.json'}")
    if settings.export == "lm_eval":
        from .export import lm_eval
        print(f"lm-eval results: {lm_eval(out_dir)[0]}")


def cli() -> None:
    """The command line: Hydra composes the settings (a bad override, an unknown key or preset is
    its one-paragraph error), then `handle` runs them."""
    sys.argv = settings_schema.normalize_overrides(sys.argv)
    try:
        main()
    except SystemExit as e:
        # Hydra ends with status 1 when it cannot compose the config (a wrong type, an unknown key or
        # config group option); `handle` never exits 1, so this is always bad input.
        if e.code == 1:
            sys.exit(BAD_INPUT)
        raise


if __name__ == "__main__":
    cli()
