"""Learning-rate schedules as closed-form multipliers of each optimizer's base learning rate.

A schedule maps training progress to a factor: lr = base_lr · factor. Closed form (rather than
PyTorch's chainable schedulers) means the learning rate at any point follows from the epoch alone,
so a resumed run needs no scheduler state and cannot drift.

``epoch`` below counts *completed* epochs (0 during the first epoch). The CIFAR schedule of the
spec ("multiply by 0.1 after epochs 150 and 225", stepped once per epoch) is
``MultiStep(milestones=[150, 225])``. ``warmup_epochs`` adds the ImageNet schedule's linear
warm-up, applied per iteration to the networks and not to the decoders (as in the release).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


class Schedule:
    """Base class: ``factor(epoch, progress, warmup)``; subclasses implement ``decay``."""

    def __init__(self, warmup_epochs: int = 0) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"schedule.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = int(warmup_epochs)

    def decay(self, epoch: int) -> float:
        raise NotImplementedError

    def factor(self, epoch: int, progress: float = 0.0, warmup: bool = True) -> float:
        """Multiplier during epoch ``epoch`` (completed epochs), ``progress`` in [0, 1) within it.

        The linear warm-up reaches 1 at the end of epoch ``warmup_epochs``; with ``progress``
        measured per iteration it starts at 1 / (warmup_epochs · iterations per epoch).
        """
        f = self.decay(epoch)
        if warmup and epoch < self.warmup_epochs:
            f *= (epoch + progress) / self.warmup_epochs
        return f


class MultiStep(Schedule):
    """Multiply by ``gamma`` after each milestone epoch."""

    def __init__(
        self, milestones: Sequence[int], gamma: float = 0.1, warmup_epochs: int = 0
    ) -> None:
        super().__init__(warmup_epochs)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def decay(self, epoch: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)


class Cosine(Schedule):
    """Half a cosine from 1 to ``min_factor`` over ``epochs`` epochs, stepped once per epoch."""

    def __init__(self, epochs: int, min_factor: float = 0.0, warmup_epochs: int = 0) -> None:
        super().__init__(warmup_epochs)
        if epochs < 1:
            raise ValueError(f"schedule.epochs must be >= 1, got {epochs}")
        self.epochs = int(epochs)
        self.min_factor = float(min_factor)

    def decay(self, epoch: int) -> float:
        t = min(epoch, self.epochs) / self.epochs
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
