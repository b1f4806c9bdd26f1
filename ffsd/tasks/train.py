"""``task=train`` (``conf/task/train.yaml``): build one run's parts and hand them to the engine."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ffsd.data.build import build_data
from ffsd.methods.build import instantiate_method
from ffsd.tasks.validation import validate, validate_data
from ffsd.tracking.base import NullTracker
from ffsd.training import distributed
from ffsd.training.acceleration import compile_forward, set_numerics
from ffsd.training.distributed import DistContext
from ffsd.training.engine import Trainer
from ffsd.training.runtime import resolve_device, seed_everything, set_threads, tune_host_malloc

log = logging.getLogger("ffsd")


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
    validate_data(cfg, data, ctx.world_size)
    seed_everything(int(cfg.trainer.seed))
    method = instantiate_method(cfg, data.num_classes, ctx.device)
    applied = set_numerics(
        method,
        channels_last=cfg.trainer.channels_last,
        nhwc_batch_norm=str(cfg.trainer.nhwc_batch_norm),
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
    log.info("%s: %s", type(method).__name__, method.describe())
    log.info("speed options: %s", ", ".join(applied) if applied else "none (eager fp32)")
    log.info(
        "host malloc: %s",
        ", ".join(f"{k}={v}" for k, v in malloc.items()) if malloc else "the C library's defaults",
    )
    return Trainer(cfg, method, data, run_dir=run_dir, tracker=tracker, dist=ctx)


def run(cfg: DictConfig) -> float:
    """Train ``cfg.distill`` and return the best value of its primary metric (for sweepers).

    Runs as one process or as one rank of a torchrun/SLURM process group
    (:mod:`ffsd.training.distributed`).
    """
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    with distributed.session(cfg.trainer.distributed.backend, device) as ctx:
        summary = build_trainer(cfg, ctx).fit()
    return float(summary["best"]["value"]) if summary["best"]["value"] is not None else 0.0
