"""Wide ResNets WRN-d-w for 32x32 inputs (16-2, 40-2, 28-10).

Taps: outputs of layer1, layer2 and of the final BN+ReLU. Convolutions carry a bias, the
classifier is ``linear`` and the final BN ``bn1`` (release names). The release builds that final
BN with ``momentum=0.9`` (spec, Quirks 6: running statistics follow the latest batch almost
entirely); ``final_bn_momentum`` reproduces it by default and 0.1 gives PyTorch's usual value.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ffsd.models.base import TapNet
from ffsd.models.pool import global_pool


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(TapNet):
    input_size = 32
    # Baselines spec, "Backbones as stage lists": S0 = conv1; S1..S3 = layer1..3 (pre-activation
    # blocks); S4 = the final bn1 + relu1; the head is global pooling + linear.
    stage_modules = (("conv1",), ("layer1",), ("layer2",), ("layer3",), ("bn1", "relu1"))
    head_modules = ("linear",)

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        dropout: float = 0.0,
        num_classes: int = 100,
        leader: bool = False,
        num_students: int = 2,
        final_bn_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        stages = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, stages[0], 3, padding=1, bias=True)
        in_planes = stages[0]
        for s, stride in enumerate((1, 2, 2), start=1):
            layers = []
            for b in range(n):
                layers.append(WideBasic(in_planes, stages[s], dropout, stride if b == 0 else 1))
                in_planes = stages[s]
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.bn1 = nn.BatchNorm2d(stages[3], momentum=final_bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear = nn.Linear(stages[3], num_classes)
        self.tap_channels = (stages[1], stages[2], stages[3])
        self._finish(leader, num_students)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        f1 = self.layer1(self.conv1(x))
        f2 = self.layer2(f1)
        f3 = self.relu1(self.bn1(self.layer3(f2)))
        return f1, f2, f3

    def classify(self, last_tap: Tensor) -> Tensor:
        return self.linear(global_pool(last_tap))


def wrn16_2(**kwargs) -> WideResNet:
    return WideResNet(16, 2, 0.0, **kwargs)


def wrn40_2(**kwargs) -> WideResNet:
    return WideResNet(40, 2, 0.0, **kwargs)


def wrn28_10(**kwargs) -> WideResNet:
    return WideResNet(28, 10, 0.3, **kwargs)
