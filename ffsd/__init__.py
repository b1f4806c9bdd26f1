"""ffsd: online knowledge distillation with FFSD, composed by Hydra.

Public API::

    import ffsd
    method = ffsd.build_method(cfg, num_classes)      # cfg: a composed conf/config.yaml
    terms = method.train_step(images, labels, epoch)  # dict[str, float], every loss term
    metrics = method.evaluate(test_loader)            # dict[str, float], top-k per network
    method.students, method.leader, method.fusion, method.decoders, method.leader_decoder
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from ffsd.methods.base import OnlineMethod


def build_method(
    cfg: DictConfig, num_classes: int, device: torch.device | str | None = None
) -> OnlineMethod:
    """Instantiate ``cfg.distill`` with the model, optimizers and schedule of ``cfg``.

    ``device`` defaults to ``cfg.trainer.device`` (``auto`` picks CUDA when available).
    """
    # Imported here so that ``import ffsd`` (and ``python -m ffsd.report``) stays torch-free.
    from ffsd.methods.build import instantiate_method
    from ffsd.training.runtime import resolve_device

    if device is None:
        device = resolve_device(cfg.trainer.device)
    return instantiate_method(cfg, num_classes, device)


__all__ = ["__version__", "build_method"]
