"""Compose a method from the config: ``cfg.distill`` with the model, optimizers and schedule."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ffsd.methods.base import OnlineMethod


def instantiate_method(
    cfg: DictConfig, num_classes: int, device: torch.device | str
) -> OnlineMethod:
    """Build ``cfg.distill`` with ``cfg.model``, ``cfg.optim``, ``cfg.schedule`` on ``device``."""
    make = instantiate(cfg.distill, _partial_=True)
    return make(
        net=instantiate(cfg.model.net, _partial_=True),
        optim={name: instantiate(node, _partial_=True) for name, node in cfg.optim.items()},
        schedule=instantiate(cfg.schedule),
        num_classes=num_classes,
        topk=list(cfg.dataset.topk),
        device=device,
    )
