"""The self-distillation decoder D (spec, "Modules", "Decoder D").

k taps -> k-1 layers of ConvTranspose2d(3, stride 2, padding 1, output_padding 1, no bias) -> BN
-> ReLU, each doubling the resolution. Fed a last tap, its outputs in reverse order line up in
shape with taps 1..k-1. Layer m holds ``layer<m>.convtranpose`` (sic) and ``layer<m>.norm`` as in
the release; the release leaves these layers at PyTorch's default initialization.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DecoderLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convtranpose = nn.ConvTranspose2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            output_padding=1,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        x = self.convtranpose(x)
        if frozen:
            # Eval-mode BN (running statistics, no update) whatever the module's mode: the
            # students' and the leader's SD terms use the decoder "in eval mode" (spec, step 2)
            # in the same pass that trains it, without toggling train()/eval().
            n = self.norm
            x = F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            x = self.norm(x)
        return self.relu(x)


class Decoder(nn.Module):
    """Maps a last tap back up through the tap resolutions.

    ``channels`` lists the decoder's channel path from the last tap down, e.g. ``(64, 32, 16)``
    for the CIFAR ResNets, ``(456, 312, 168)`` for DenseNet-40: that is the tap channels of the
    network, reversed.

    ``forward`` returns the outputs aligned with taps 1..k-1 (already reversed: index 0 is the
    highest resolution, matching the shallowest tap). ``frozen=True`` runs its BatchNorms in
    eval mode.
    """

    def __init__(self, channels: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"a decoder needs at least two taps, got channels={channels}")
        self.num_layers = len(channels) - 1
        for m in range(self.num_layers):
            setattr(self, f"layer{m}", DecoderLayer(channels[m], channels[m + 1]))

    def forward(self, x: Tensor, frozen: bool = False) -> tuple[Tensor, ...]:
        outs = []
        for m in range(self.num_layers):
            x = getattr(self, f"layer{m}")(x, frozen)
            outs.append(x)
        return tuple(reversed(outs))
