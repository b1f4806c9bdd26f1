"""CIFAR ResNet-20/32/56 (3 stages of 16/32/64 channels); taps: outputs of layer1..layer3.

Module names follow the release (``conv1``, ``bn1``, ``layer<s>.<b>.conv1``, ..., ``fc``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ffsd.models.base import TapNet
from ffsd.models.pool import global_pool


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(TapNet):
    """ResNet-(6n+2) for 32x32 inputs; ``blocks`` is n, the number of blocks per stage."""

    input_size = 32
    # Baselines spec, "Backbones as stage lists": S0 = conv1, bn1, relu; S1..S3 = layer1..3;
    # no S4; the head is global pooling + fc.
    stage_modules = (("conv1", "bn1", "relu"), ("layer1",), ("layer2",), ("layer3",), ())
    head_modules = ("fc",)

    def __init__(
        self, blocks: int, num_classes: int = 100, leader: bool = False, num_students: int = 2
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(64, num_classes)
        self.tap_channels = (16, 32, 64)
        self._finish(leader, num_students)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return f1, f2, f3

    def classify(self, last_tap: Tensor) -> Tensor:
        return self.fc(global_pool(last_tap))


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(3, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(5, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(9, **kwargs)
