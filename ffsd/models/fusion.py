"""The fusion module F and the leader's trans-fusion head (spec, "Modules").

Parameter names (``conv1``, ``bn1``, ``conv1_1``, ``bn1_1``, ``fc2``) are the release's.
"""

from __future__ import annotations

from torch import Tensor, nn

from ffsd.models.init import init_released
from ffsd.models.pool import global_pool


class FusionModule(nn.Module):
    """Fuses the students' (detached) last taps and classifies.

    u (B x C·N x H x W) -> depthwise 3x3 -> BN -> ReLU -> 1x1 C·N->C -> BN -> ReLU = g
    -> average pool -> linear C->classes. ``forward`` returns ``(logits, g)``: g is the fused
    feature map the leader learns from (spec, step 4).
    """

    def __init__(self, channels: int, num_students: int, num_classes: int) -> None:
        super().__init__()
        cn = channels * num_students
        self.conv1 = nn.Conv2d(cn, cn, kernel_size=3, padding=1, groups=cn, bias=False)
        self.bn1 = nn.BatchNorm2d(cn)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1_1 = nn.Conv2d(cn, channels, kernel_size=1, bias=False)
        self.bn1_1 = nn.BatchNorm2d(channels)
        self.relu1_1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels, num_classes)
        init_released(self)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu1(self.bn1(self.conv1(u)))
        g = self.relu1_1(self.bn1_1(self.conv1_1(x)))
        logits = self.fc2(global_pool(g))
        return logits, g


class TransFusionModule(nn.Module):
    """The leader's head that predicts the students' fused input u from its own last tap.

    depthwise 3x3 (C groups) -> BN -> ReLU -> 1x1 C->C·N -> BN -> ReLU = t_L. Its convolutions
    get the release's init from the leader network that owns it.
    """

    def __init__(self, channels: int, num_students: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            channels, channels, kernel_size=3, padding=1, groups=channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1_1 = nn.Conv2d(channels, channels * num_students, kernel_size=1, bias=False)
        self.bn1_1 = nn.BatchNorm2d(channels * num_students)
        self.relu1_1 = nn.ReLU(inplace=True)

    @property
    def num_students(self) -> int:
        return self.conv1_1.out_channels // self.conv1_1.in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu1_1(self.bn1_1(self.conv1_1(x)))
