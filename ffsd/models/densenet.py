"""DenseNet-40 (growth rate 12, no compression) for 32x32 inputs.

Taps: outputs of dense block 1 (168 ch), dense block 2 (312 ch) and the final BN+ReLU (456 ch).
Module names follow the release (``dense<i>.<j>.bn1/conv1``, ``trans<i>``, ``bn``, ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffsd.models.base import TapNet
from ffsd.models.pool import global_pool


class DenseBasicBlock(nn.Module):
    def __init__(self, in_planes: int, growth: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseNet(TapNet):
    input_size = 32

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 12,
        num_classes: int = 100,
        leader: bool = False,
        num_students: int = 2,
    ) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        taps = []
        for i in (1, 2, 3):
            block = []
            for _ in range(n):
                block.append(DenseBasicBlock(planes, growth_rate))
                planes += growth_rate
            setattr(self, f"dense{i}", nn.Sequential(*block))
            taps.append(planes)
            if i < 3:
                setattr(self, f"trans{i}", Transition(planes, planes))
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(planes, num_classes)
        self.tap_channels = tuple(taps)
        self._finish(leader, num_students)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        f1 = self.dense1(self.conv1(x))
        f2 = self.dense2(self.trans1(f1))
        f3 = self.relu(self.bn(self.dense3(self.trans2(f2))))
        return f1, f2, f3

    def classify(self, last_tap: Tensor) -> Tensor:
        return self.fc(global_pool(last_tap))


def densenet40(**kwargs) -> DenseNet:
    return DenseNet(40, 12, **kwargs)
