"""python -m evalsuite +tasks=[mmlu,arc_c] model=gemma2_9b limit=100 (Hydra; see conf/config.yaml)."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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
        sys.exit("interrupted. " + (f"Every finished batch is kept in the result cache {where}: run the same "
                                    "command again to compute only what is missing." if where else
                                    "The result cache was off (cache=off), so nothing was kept."))
    except Exception as e:  # noqa: BLE001 -- the one place that turns errors into messages
        if cfg.get("debug"):
            raise
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(rank + error_message(e), file=sys.stderr)
        sys.exit(2)
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
    from . import distributed, evaluate, tasks
    from .cache import check_mode
    from .model import load_model

    check_mode(cfg.cache)  # before the model is loaded
    if "tasks" not in cfg:
        sys.exit("no tasks given: add +tasks=NAME or +tasks=[A,B]; tasks: "
                 f"{', '.join(tasks.available_tasks())}; suites: {', '.join(evaluate.SUITES)}")
    names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    execution = OmegaConf.to_container(cfg.execution, resolve=True)
    try:
        task_names, skipped = evaluate.expand_tasks(names, cfg.data.source, evaluate.execution_problem(execution))
    except (tasks.TaskError, ValueError) as e:  # bad input: exit status 2, as every other
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.fewshot_sampler is not None and cfg.fewshot_sampler not in tasks.SAMPLERS:
        sys.exit(f"fewshot_sampler={cfg.fewshot_sampler!r}: expected null (each task's rule) or one of "
                 f"{', '.join(tasks.SAMPLERS)}")
    try:
        sampling = evaluate.Sampling(**cfg.generation)
    except (TypeError, ValueError) as e:
        sys.exit(f"generation: {e}" if isinstance(e, TypeError) else str(e))
    world = distributed.init(cfg.device, cfg.dist_timeout_minutes)  # a world of one without torchrun
    device = cfg.device
    if world.size > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
        device = f"cuda:{world.local_rank}"  # one GPU per rank
    backend = cfg.model.get("backend", "ours")
    if backend == "ours":
        model = load_model(cfg.model.path, device=device, dtype=cfg.dtype, preset=cfg.model.get("preset"),
                           attention=cfg.attention)
    elif backend == "hf":
        from .backends import HFBackend
        model = HFBackend(cfg.model.path, device=device, dtype=cfg.dtype)
    else:
        sys.exit(f"model.backend={backend!r}: expected 'ours' (our Gemma network) or 'hf' (transformers)")
    run_id = world.broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.get('preset') or 'model'}")
    out_dir = Path(cfg.output_dir) / run_id
    res = evaluate.run(model, task_names, out_dir, limit=cfg.limit, num_fewshot=cfg.num_fewshot, seed=cfg.seed,
                       batch_size=cfg.batch_size, generate_batch_size=cfg.generate_batch_size,
                       token_budget=cfg.token_budget, data_source=cfg.data.source,
                       progress=cfg.progress, chat=cfg.chat, fewshot_sampler=cfg.fewshot_sampler,
                       share_prefix=cfg.share_prefix, sampling=sampling, execution=execution, skipped=skipped,
                       config=OmegaConf.to_container(cfg, resolve=True), cache=cfg.cache, cache_dir=cache_dir(cfg),
                       world=world)
    if world.rank != 0:  # rank 0 writes and prints the results of all ranks
        return
    print(evaluate.summary_markdown(res))
    c = res["cache"]
    if c["mode"] != "off":
        print(f"result cache {c['dir']}: {c['requests_from_cache']} requests read, {c['requests_computed']} computed")
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
