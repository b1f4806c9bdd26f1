"""How close a training step is to what the machine can compute: its FLOPs against the host's
matrix-multiply throughput (``benchmarks/step.py --roofline``).

A step's convolutions and matrix products (forward and backward, as ``torch.utils.flop_counter``
counts them at the dispatcher) run at about the rate the host multiplies large dense matrices of
the same dtype and thread count, as fast as its BLAS and oneDNN kernels get. So
``floor_ms = GFLOP / peak`` is about the least time any iteration of the same networks can take,
and the released code's step time over that floor about the most any can gain on it. It is an
estimate, not a proof: a convolution kernel tuned to its shape may beat the square product by a
few percent (with ``--profile``, ``convolution_gflop_per_s`` shows the convolutions' own rate).
It is generous too: it leaves out everything that is not a product (BatchNorm, ReLU, the losses'
elementwise ops, the optimizers), which moves memory rather than computing, and which no option
removes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

#: Side of the square matrices whose product measures the host's peak.
PEAK_SIZE = 2048


def count_flops(run_one_step: Callable[[], object]) -> dict:
    """Exact FLOPs of one call of ``run_one_step`` (a full training step): total and by op.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix products
    and attention, forward and backward; a multiply-add counts as 2).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_one_step()
    by_op = counter.get_flop_counts().get("Global", {})
    return {
        "flops": counter.get_total_flops(),
        "flops_by_op": {
            str(op).removeprefix("aten."): n
            for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
    }


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = PEAK_SIZE
) -> float:
    """The host's dense matrix-multiply throughput in GFLOP/s (median of timed products).

    At the process's current thread count, so it is the peak of the same cores the step uses.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    for _ in range(3):
        once()
    repeats = 7 if device.type == "cpu" else 50
    return 2 * size**3 / statistics.median(once() for _ in range(repeats)) / 1e9


def floor_ms(gflop: float, peak_gflop_per_s: float) -> float:
    """The least time ``gflop`` can take at ``peak_gflop_per_s``, in milliseconds."""
    return 1e3 * gflop / peak_gflop_per_s


def convolution_rate(gflop_by_op: dict[str, float], families_ms: dict[str, float]) -> float | None:
    """GFLOP/s of the step's convolutions alone: their counted FLOPs over their profiled time
    (``benchmarks/step.py``'s profile families); ``None`` without convolution time."""
    conv_gflop = sum(n for op, n in gflop_by_op.items() if op.startswith("convolution"))
    conv_ms = families_ms.get("convolution forward", 0.0) + families_ms.get(
        "convolution backward", 0.0
    )
    return conv_gflop / (conv_ms / 1e3) if conv_ms > 0 else None
