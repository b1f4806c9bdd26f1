"""Entry points selected by ``task=...`` (``conf/task/*.yaml``); each takes the composed config.

``launch.py`` calls ``hydra.utils.call(cfg.task, cfg)``: the task node's other keys (its options)
arrive as keyword arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ffsd
from ffsd import distributed
from ffsd.acceleration import compile_forward, set_numerics
from ffsd.config import validate
from ffsd.data.base import DataModule
from ffsd.distributed import DistContext
from ffsd.engine import Trainer
from ffsd.runtime import resolve_device, seed_everything, set_threads, tune_host_malloc
from ffsd.tracking import NullTracker

log = logging.getLogger("ffsd")


def build_data(cfg: DictConfig) -> DataModule:
    """Instantiate ``cfg.dataset`` and check the files are there (fast, before any work)."""
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    data.check()
    return data


def build_trainer(cfg: DictConfig, ctx: DistContext) -> Trainer:
    """Data, method (data-parallel over ``ctx``), tracker and run directory of one run."""
    if not ctx.is_main:
        log.setLevel(logging.WARNING)  # one voice per run: rank 0's
    threads = cfg.trainer.threads
    if not threads and ctx.local_world_size > 1:  # share the node's cores between its ranks
        threads = distributed.default_threads(ctx.local_world_size)
    set_threads(threads)
    malloc = tune_host_malloc(**cfg.trainer.host_malloc)
    data = build_data(cfg)
    seed_everything(int(cfg.trainer.seed))
    method = ffsd.build_method(cfg, data.num_classes, ctx.device)
    applied = set_numerics(
        method,
        channels_last=bool(cfg.trainer.channels_last),
        precision=str(cfg.trainer.precision),
    )
    distributed.data_parallel(method, ctx, sync_bn=bool(cfg.trainer.sync_bn))
    applied += compile_forward(method, OmegaConf.to_container(cfg.trainer.compile, resolve=True))
    distributed.seed_rank_streams(int(cfg.trainer.seed), ctx.rank)
    tracker = instantiate(cfg.logger) if ctx.is_main else NullTracker()
    hydra_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    run_dir = distributed.shared_run_dir(ctx, Path(cfg.trainer.output_dir), hydra_dir)
    log.info("run directory: %s", run_dir)
    log.info("%s on %s; %s", cfg.model.name, ctx.device, data.describe())
    log.info("speed options: %s", ", ".join(applied) if applied else "none (eager fp32)")
    log.info(
        "host malloc: %s",
        ", ".join(f"{k}={v}" for k, v in malloc.items()) if malloc else "the C library's defaults",
    )
    return Trainer(cfg, method, data, run_dir=run_dir, tracker=tracker, dist=ctx)


def train(cfg: DictConfig) -> float:
    """Train ``cfg.distill`` and return the best value of its primary metric (for sweepers).

    Runs as one process or as one rank of a torchrun/SLURM process group (``ffsd.distributed``).
    """
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    with distributed.session(cfg.trainer.distributed.backend, device) as ctx:
        summary = build_trainer(cfg, ctx).fit()
    return float(summary["best"]["value"]) if summary["best"]["value"] is not None else 0.0


def evaluate(cfg: DictConfig, **options: Any) -> float:
    """``task=eval``: evaluate one network of ``cfg.checkpoint``; returns its top-1.

    ``options`` are ``conf/task/eval.yaml``'s keys (``launch.py`` passes them; see
    :func:`ffsd.evaluation.evaluate_checkpoint`).
    """
    from ffsd.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(cfg, **options)


def export(cfg: DictConfig, **options: Any) -> float:
    """``task=export``: export one network of ``cfg.checkpoint``; returns the largest difference.

    ``options`` are ``conf/task/export.yaml``'s keys (see :func:`ffsd.export.export_checkpoint`).
    """
    from ffsd.export import export_checkpoint

    return export_checkpoint(cfg, **options)
