"""What every FFSD network shares: the output type, the release's initialization, the leader head.

Networks return their tap features from ``forward`` (spec, "Tap features") instead of writing them
into a shared dict from forward hooks as the released code does (spec, Quirks 5): the data flow is
explicit, and it stays correct under DDP, ``torch.compile`` and TorchScript.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ffsd.models.fusion import TransFusionModule
from ffsd.models.init import init_released


class NetOutput(NamedTuple):
    """One forward pass of a student or the leader.

    ``taps`` runs shallow to deep; ``taps[-1]`` is the last feature map (the input of global
    pooling). ``trans`` is the leader's trans-fusion output t_L, ``None`` for a student.
    """

    logits: Tensor
    taps: tuple[Tensor, ...]
    trans: Tensor | None


class TapNet(nn.Module):
    """Base of every architecture: ``forward(x) -> NetOutput``.

    A subclass builds its layers, sets ``tap_channels`` (channels of each tap, shallow to deep)
    and implements ``features`` (the taps) and ``classify`` (last tap -> logits). With
    ``leader=True`` it gains the trans-fusion head on its last tap, named ``trans_fusion_module``
    as in the release so that released leader checkpoints load with no renaming.
    """

    tap_channels: tuple[int, ...]
    #: Side of the square input the architecture is built for (32 for CIFAR, 224 for ImageNet).
    input_size: int = 32
    #: The ordered stages S0..S4 as names of this network's modules, applied in order
    #: (``ffsd.models.branches`` splits a backbone there); None where no split is specified.
    stage_modules: tuple[tuple[str, ...], ...] | None = None
    #: The modules of the head H (global pooling + classifier), applied by ``classify``.
    head_modules: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.leader = False

    def _finish(self, leader: bool, num_students: int) -> None:
        """Attach the leader head (if any) and initialize; called last by each subclass."""
        self.leader = leader
        if leader:
            self.trans_fusion_module = TransFusionModule(self.tap_channels[-1], num_students)
        init_released(self)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def classify(self, last_tap: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> NetOutput:
        taps = self.features(x)
        logits = self.classify(taps[-1])
        trans = self.trans_fusion_module(taps[-1]) if self.leader else None
        return NetOutput(logits, taps, trans)

    @property
    def num_taps(self) -> int:
        return len(self.tap_channels)


class LogitsOnly(nn.Module):
    """Wraps a network so that ``forward`` returns logits alone (evaluation, export).

    The trans-fusion head is skipped: inference does not need it.
    """

    def __init__(self, net: TapNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.classify(self.net.features(x)[-1])


def count_parameters(module: nn.Module, *, exclude_prefix: str | None = None) -> int:
    """Trainable parameters of ``module``, optionally leaving out one sub-module by name prefix."""
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if p.requires_grad and not (exclude_prefix and name.startswith(exclude_prefix))
    )
