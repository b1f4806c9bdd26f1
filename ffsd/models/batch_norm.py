"""BatchNorm2d whose training statistics stay as precise in NHWC (channels_last) as in NCHW.

PyTorch's CPU kernel for channels_last BatchNorm sums each channel's batch statistics
sequentially, row after row of the (N·H·W, C) matrix: at 131,072 rows (batch 128, 32 x 32) its
output lands about 1e-5 from float64, against 4e-8 for the NCHW kernel, and a FFSD step with
``channels_last`` lands 2.4 to 3.7x further from a float64 step than NCHW fp32
(benchmarks/README.md, ``benchmarks/numerics.py --ops``). :class:`PreciseBatchNorm2d` computes
the mean and the biased variance in two passes of ``Tensor.sum(0)`` over that matrix (PyTorch's
cascade summation, vectorised across the contiguous channels), then normalises with the
eval-mode kernel and differentiates with PyTorch's own training-mode backward, given those
statistics. Anything else (NCHW input, eval mode, GPU, low-precision input) takes
``nn.BatchNorm2d``'s own path, and the module holds the same parameters and buffers, so
checkpoints and optimizers do not see the difference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _NHWCStatistics(torch.autograd.Function):
    """Training-mode batch norm of a channels_last tensor, statistics summed in two passes."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.size(1)
        rows = x.numel() // channels
        # A free view for a channels_last tensor: row = (n, h, w), column = channel.
        x2d = x.permute(0, 2, 3, 1).reshape(rows, channels)
        mean = x2d.sum(0) / rows
        var = (x2d - mean).square_().sum(0) / rows
        invstd = (var + eps).rsqrt()
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _mean: Tensor, _var: Tensor) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_b]
        )
        return grad_x, grad_w, grad_b, None


def precise_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of a channels_last ``x``: (output, batch mean, biased variance).

    Differentiable in ``x``, ``weight`` and ``bias``; the statistics are not. Running statistics
    are the caller's (:class:`PreciseBatchNorm2d`).
    """
    return _NHWCStatistics.apply(x, weight, bias, eps)


class PreciseBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with precise training statistics for channels_last CPU input."""

    @staticmethod
    def takes_precise_path(x: Tensor, training: bool) -> bool:
        """Training on a CPU float tensor laid out NHWC (and not also NCHW, as H = W = 1 is)."""
        return (
            training
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )

    def forward(self, x: Tensor) -> Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not self.takes_precise_path(x, use_batch_stats):
            return super().forward(x)
        self._check_input_dim(x)
        # The running-average factor exactly as nn.BatchNorm2d.forward derives it.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        y, mean, var = precise_batch_norm(x, self.weight, self.bias, self.eps)
        if self.training and self.running_mean is not None and self.running_var is not None:
            rows = x.numel() // x.size(1)
            with torch.no_grad():
                # The running variance is the unbiased one, as PyTorch's kernels keep it.
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * (rows / max(rows - 1, 1)), factor)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> int:
        """Turn every plain ``nn.BatchNorm2d`` below ``module`` into this class, in place.

        The instances keep their parameters and buffers (the same tensor objects), so an
        optimizer built before, a state dict and a checkpoint stay valid. Returns how many
        were converted.
        """
        count = 0
        for child in module.modules():
            if type(child) is nn.BatchNorm2d:
                child.__class__ = cls
                count += 1
        return count
