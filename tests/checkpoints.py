"""Test helpers: checkpoint files in the release's format, running a task as launch.py does."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

import ffsd.models as M
from ffsd.tracking.base import Tracker


def randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a load that drops or
    mixes up buffers changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(1000)
    return net.eval()


def write_release(
    path: Path,
    arch: str = "resnet20",
    *,
    num_classes: int = 10,
    leader: bool = True,
    num_students: int = 2,
    index: str | None = None,
    epoch: int = 7,
    seed: int = 0,
) -> nn.Module:
    """Build a network, randomize it, save it as the released code does; return the network."""
    torch.manual_seed(seed)
    net = getattr(M, arch)(num_classes=num_classes, leader=leader, num_students=num_students)
    randomize_bn(net, seed)
    index = index if index is not None else ("leader" if leader else "0")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": net.state_dict(), "epoch": epoch, "cfg": arch, "index": index}, path)
    return net


def run_task(cfg: DictConfig) -> Any:
    """What launch.py does: bind the task node's options, call the task with the config."""
    return instantiate(cfg.task, _partial_=True)(cfg)


class RecordingTracker(Tracker):
    """Records every call; select it with ``logger._target_=tests.checkpoints.RecordingTracker``."""

    #: The calls of the latest instance (the task builds its own from the config).
    calls: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, **_: Any) -> None:
        RecordingTracker.calls = []

    def start(self, cfg, run_dir, resume_run_id=None, parent=None) -> None:
        self.calls.append(("start", str(run_dir)))

    def log_metrics(self, metrics, step) -> None:
        self.calls.append(("log_metrics", dict(metrics)))

    def log_summary(self, metrics) -> None:
        self.calls.append(("log_summary", dict(metrics)))

    def log_artifact(self, path, artifact_path=None) -> None:
        self.calls.append(("log_artifact", Path(path).name))

    def finish(self, status: str = "FINISHED") -> None:
        self.calls.append(("finish", status))
