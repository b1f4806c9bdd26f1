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

    from ffsd.method import OnlineMethod


def build_method(
    cfg: DictConfig, num_classes: int, device: torch.device | str | None = None
) -> OnlineMethod:
    """Instantiate ``cfg.distill`` with the model, optimizers and schedule of ``cfg``.

    ``device`` defaults to ``cfg.trainer.device`` (``auto`` picks CUDA when available).
    """
    from hydra.utils import instantiate

    from ffsd.runtime import resolve_device

    if device is None:
        device = resolve_device(cfg.trainer.device)
    make = instantiate(cfg.distill, _partial_=True)
    return make(
        net=instantiate(cfg.model.net, _partial_=True),
        optim={name: instantiate(node, _partial_=True) for name, node in cfg.optim.items()},
        schedule=instantiate(cfg.schedule),
        num_classes=num_classes,
        topk=list(cfg.dataset.topk),
        device=device,
    )


__all__ = ["__version__", "build_method"]
