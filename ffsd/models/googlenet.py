"""GoogLeNet for 32x32 inputs (the release's CIFAR variant).

Taps: outputs of inception b3 (480 ch, 32x32), e4 (832 ch, 16x16) and b5 (1024 ch, 8x8).
Module names follow the release (``pre_layers``, ``inception_<x>.branch1x1/3x3/5x5/pool``,
``linear``). Every convolution carries a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ffsd.models.base import TapNet
from ffsd.models.pool import global_pool

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) per inception block, as in the
# release: its "5x5" branch is two 3x3 convolutions, the middle one as wide as the output.
_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "a3": (64, 96, 128, 16, 32, 32),
    "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64),
    "b4": (160, 112, 224, 24, 64, 64),
    "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64),
    "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128),
    "b5": (384, 192, 384, 48, 128, 128),
}


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    def __init__(self, in_planes: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int):
        super().__init__()
        self.branch1x1 = nn.Sequential(*_conv_bn_relu(in_planes, n1, 1))
        self.branch3x3 = nn.Sequential(
            *_conv_bn_relu(in_planes, n3r, 1), *_conv_bn_relu(n3r, n3, 3)
        )
        self.branch5x5 = nn.Sequential(
            *_conv_bn_relu(in_planes, n5r, 1), *_conv_bn_relu(n5r, n5, 3), *_conv_bn_relu(n5, n5, 3)
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_planes, pool, 1)
        )
        self.out_channels = n1 + n3 + n5 + pool

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1
        )


class GoogLeNet(TapNet):
    input_size = 32

    def __init__(self, num_classes: int = 100, leader: bool = False, num_students: int = 2):
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu(3, 192, 3))
        planes = 192
        for name, spec in _BLOCKS.items():
            block = Inception(planes, *spec)
            setattr(self, f"inception_{name}", block)
            planes = block.out_channels
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.linear = nn.Linear(planes, num_classes)
        self.tap_channels = (
            self.inception_b3.out_channels,
            self.inception_e4.out_channels,
            self.inception_b5.out_channels,
        )
        self._finish(leader, num_students)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        f1 = self.inception_b3(self.inception_a3(self.pre_layers(x)))
        x = self.maxpool1(f1)
        for name in ("a4", "b4", "c4", "d4"):
            x = getattr(self, f"inception_{name}")(x)
        f2 = self.inception_e4(x)
        f3 = self.inception_b5(self.inception_a5(self.maxpool2(f2)))
        return f1, f2, f3

    def classify(self, last_tap: Tensor) -> Tensor:
        return self.linear(global_pool(last_tap))


def googlenet(**kwargs) -> GoogLeNet:
    return GoogLeNet(**kwargs)
