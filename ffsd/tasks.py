"""Entry points selected by ``task=...`` (``conf/task/*.yaml``); each takes the composed config.

``launch.py`` calls ``hydra.utils.call(cfg.task, cfg)``: the task node's other keys (its options)
arrive as keyword arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ffsd
from ffsd.acceleration import accelerate
from ffsd.config import validate
from ffsd.data.base import DataModule
from ffsd.engine import Trainer
from ffsd.runtime import resolve_device, seed_everything, set_threads

log = logging.getLogger("ffsd")


def build_data(cfg: DictConfig) -> DataModule:
    """Instantiate ``cfg.dataset`` and check the files are there (fast, before any work)."""
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    data.check()
    return data


def train(cfg: DictConfig) -> float:
    """Train ``cfg.distill`` and return the best value of its primary metric (for sweepers)."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    set_threads(cfg.trainer.threads)
    data = build_data(cfg)
    seed_everything(int(cfg.trainer.seed))
    method = ffsd.build_method(cfg, data.num_classes, device)
    applied = accelerate(
        method,
        channels_last=bool(cfg.trainer.channels_last),
        precision=str(cfg.trainer.precision),
        compile=OmegaConf.to_container(cfg.trainer.compile, resolve=True),
    )
    tracker = instantiate(cfg.logger)
    run_dir = Path(cfg.trainer.output_dir)
    log.info("run directory: %s", run_dir)
    log.info("%s on %s; %s", cfg.model.name, device, data.describe())
    log.info("speed options: %s", ", ".join(applied) if applied else "none (eager fp32)")
    trainer = Trainer(cfg, method, data, run_dir=run_dir, tracker=tracker)
    summary = trainer.fit()
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
