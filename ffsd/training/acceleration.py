"""Speed options of a training run (``trainer.channels_last`` with ``trainer.nhwc_batch_norm``,
``trainer.precision``, ``trainer.compile``), applied to a method after it is built.

An option is on by default only where one step of it was measured as close to a float64 step as
eager NCHW fp32's (benchmarks/numerics.py): ``channels_last`` with precise BatchNorm statistics,
on CPU. tests/test_acceleration.py checks that every option's losses and updates stay within a
stated tolerance of the eager fp32 path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ffsd.methods.base import OnlineMethod
from ffsd.models.batch_norm import PreciseBatchNorm2d

log = logging.getLogger("ffsd")

#: trainer.precision -> autocast dtype (None: plain fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: trainer.channels_last=auto, by device type (absent: off). CPU: NHWC networks with precise
#: BatchNorm statistics land as close to a float64 step as NCHW does and step 1.2x faster
#: (benchmarks/README.md, numerics.py and step.py). CUDA: not measured yet, so NCHW.
CHANNELS_LAST_AUTO: dict[str, bool] = {"cpu": True}
#: trainer.channels_last's values.
CHANNELS_LAST_CHOICES = (True, False, "auto")
#: trainer.nhwc_batch_norm: how training BatchNorm computes its statistics for channels_last
#: CPU tensors (ffsd.models.batch_norm), or PyTorch's own NHWC kernel.
NHWC_BATCH_NORMS = ("precise", "native")


def accelerate(
    method: OnlineMethod,
    *,
    channels_last: bool | str = False,
    nhwc_batch_norm: str = "precise",
    precision: str = "fp32",
    compile: Mapping[str, Any] | None = None,
) -> list[str]:
    """Apply every speed option to ``method``; returns a short description of each one applied.

    A data-parallel run applies the two halves separately, :func:`set_numerics` before and
    :func:`compile_forward` after ``ffsd.training.distributed.data_parallel``: DDP must see the
    networks in their final memory format, and torch.compile must wrap DDP, not the other way round.
    """
    numerics = set_numerics(
        method, channels_last=channels_last, nhwc_batch_norm=nhwc_batch_norm, precision=precision
    )
    return numerics + compile_forward(method, compile)


def set_numerics(
    method: OnlineMethod,
    *,
    channels_last: bool | str = False,
    nhwc_batch_norm: str = "precise",
    precision: str = "fp32",
) -> list[str]:
    """``trainer.channels_last`` (true, false or auto, with ``trainer.nhwc_batch_norm``) and
    ``trainer.precision``: memory format, BatchNorm statistics and autocast dtype."""
    applied = []
    if nhwc_batch_norm not in NHWC_BATCH_NORMS:
        raise ValueError(
            f"trainer.nhwc_batch_norm={nhwc_batch_norm!r} is not valid; choose one of: "
            f"{', '.join(NHWC_BATCH_NORMS)}"
        )
    if resolve_channels_last(channels_last, method.device):
        method.set_memory_format(torch.channels_last)
        applied.append(
            f"channels_last (auto on {method.device.type})"
            if channels_last == "auto"
            else "channels_last"
        )
        if method.device.type == "cpu" and nhwc_batch_norm == "precise":
            # PyTorch's NHWC kernel sums the statistics sequentially: 2.4-3.7x further from a
            # float64 step than NCHW (benchmarks/README.md); GPUs keep their own kernels.
            layers = sum(PreciseBatchNorm2d.convert(m) for m in method.modules().values())
            applied.append(f"precise NHWC BatchNorm statistics ({layers} layers)")
    if precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}"
        )
    dtype = PRECISIONS[precision]
    if dtype is not None:
        if method.device.type == "cpu":
            if cpu_has_native_bf16():
                log.info("trainer.precision=%s: this CPU computes bf16 natively", precision)
            else:
                log.warning(
                    "trainer.precision=%s on a CPU without AVX512-BF16 or AMX: oneDNN emulates "
                    "bf16, measured 10x slower than fp32 on an AVX2 CPU (benchmarks/README.md); "
                    "use trainer.precision=fp32 here",
                    precision,
                )
        method.autocast_dtype = dtype
        applied.append(f"autocast {precision}")
    return applied


def resolve_channels_last(value: bool | str, device: torch.device) -> bool:
    """``trainer.channels_last``: true or false as given; auto by :data:`CHANNELS_LAST_AUTO`."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return CHANNELS_LAST_AUTO.get(device.type, False)
    shown = ", ".join(str(c).lower() for c in CHANNELS_LAST_CHOICES)
    raise ValueError(f"trainer.channels_last={value!r} is not valid; choose one of: {shown}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) for oneDNN to use.

    PyTorch exposes the check only privately (``torch.cpu._is_*_supported``); an older or newer
    build without it counts as "no", which at worst shows the warning on a bf16 CPU.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def compile_forward(method: OnlineMethod, compile: Mapping[str, Any] | None) -> list[str]:
    """``trainer.compile``: torch.compile of the method's training forward (all losses)."""
    if not compile or not compile.get("enabled"):
        return []
    kwargs = {k: v for k, v in compile.items() if k != "enabled" and v is not None}
    method.wrap_forward(lambda fn: torch.compile(fn, **kwargs))
    return [f"torch.compile({', '.join(f'{k}={v}' for k, v in kwargs.items())})"]
