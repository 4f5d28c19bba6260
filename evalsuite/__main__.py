"""python -m evalsuite +tasks=[mmlu,arc_c] model=gemma2_9b limit=100 (Hydra; see conf/config.yaml)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from . import evaluate, tasks
    from .model import load_model

    if "tasks" not in cfg:
        sys.exit("no tasks given: add +tasks=NAME or +tasks=[A,B]; tasks: "
                 f"{', '.join(tasks.available_tasks())}; suites: {', '.join(evaluate.SUITES)}")
    names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    execution = OmegaConf.to_container(cfg.execution, resolve=True)
    try:
        task_names, skipped = evaluate.expand_tasks(names, cfg.data.source, evaluate.execution_problem(execution))
    except (tasks.TaskError, ValueError) as e:
        sys.exit(str(e))
    if cfg.fewshot_sampler is not None and cfg.fewshot_sampler not in tasks.SAMPLERS:
        sys.exit(f"fewshot_sampler={cfg.fewshot_sampler!r}: expected null (each task's rule) or one of "
                 f"{', '.join(tasks.SAMPLERS)}")
    try:
        sampling = evaluate.Sampling(**cfg.generation)
    except (TypeError, ValueError) as e:
        sys.exit(f"generation: {e}" if isinstance(e, TypeError) else str(e))
    backend = cfg.model.get("backend", "ours")
    if backend == "ours":
        model = load_model(cfg.model.path, device=cfg.device, dtype=cfg.dtype, preset=cfg.model.get("preset"))
    elif backend == "hf":
        from .backends import HFBackend
        model = HFBackend(cfg.model.path, device=cfg.device, dtype=cfg.dtype)
    else:
        sys.exit(f"model.backend={backend!r}: expected 'ours' (our Gemma network) or 'hf' (transformers)")
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.get('preset') or 'model'}"
    out_dir = Path(cfg.output_dir) / run_id
    res = evaluate.run(model, task_names, out_dir, limit=cfg.limit, num_fewshot=cfg.num_fewshot, seed=cfg.seed,
                       batch_size=cfg.batch_size, token_budget=cfg.token_budget, data_source=cfg.data.source,
                       progress=cfg.progress, chat=cfg.chat, fewshot_sampler=cfg.fewshot_sampler,
                       share_prefix=cfg.share_prefix, sampling=sampling, execution=execution, skipped=skipped, config=OmegaConf.to_container(cfg, resolve=True))
    print(evaluate.summary_markdown(res))
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
