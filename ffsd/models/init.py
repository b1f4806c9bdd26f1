"""The released code's weight initialization (spec, "Initialization")."""

from __future__ import annotations

import math

from torch import nn


def init_released(module: nn.Module) -> None:
    """Convolutions ~ normal(0, sqrt(2 / (kh * kw * out_channels))); BN weight 1, bias 0.

    Linear layers and convolution biases keep PyTorch's defaults, as in the release. (For the
    ImageNet ResNets the release calls kaiming_normal_(mode='fan_out'), the same distribution.)
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
