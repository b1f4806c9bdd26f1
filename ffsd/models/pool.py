"""Global average pooling shared by every classifier head and the fusion module."""

from __future__ import annotations

from torch import Tensor


def global_pool(x: Tensor) -> Tensor:
    """Average over the whole map then flatten (the release's avgpool(8) on 8x8, view(B, -1)).

    Written as a sum over H, W divided by H·W rather than a mean or adaptive pooling: their
    backward materializes the spread gradient in NCHW order, which turns every later op of a
    ``channels_last`` network into a slow mixed-layout one; a sum's backward stays a broadcast view.
    """
    return x.sum(dim=(2, 3)) / (x.size(2) * x.size(3))
