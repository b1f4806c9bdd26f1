"""Speed options of a training run (``trainer.channels_last``, ``trainer.precision``,
``trainer.compile``), applied to a method after it is built.

Each option is off by default where it changes numerics; tests/test_acceleration.py checks that
every option's losses after a few steps stay within a stated tolerance of the eager fp32 path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ffsd.methods.base import OnlineMethod

log = logging.getLogger("ffsd")

#: trainer.precision -> autocast dtype (None: plain fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def accelerate(
    method: OnlineMethod,
    *,
    channels_last: bool = False,
    precision: str = "fp32",
    compile: Mapping[str, Any] | None = None,
) -> list[str]:
    """Apply every speed option to ``method``; returns a short description of each one applied.

    A data-parallel run applies the two halves separately, :func:`set_numerics` before and
    :func:`compile_forward` after ``ffsd.training.distributed.data_parallel``: DDP must see the
    networks in their final memory format, and torch.compile must wrap DDP, not the other way round.
    """
    return set_numerics(method, channels_last=channels_last, precision=precision) + (
        compile_forward(method, compile)
    )


def set_numerics(
    method: OnlineMethod, *, channels_last: bool = False, precision: str = "fp32"
) -> list[str]:
    """``trainer.channels_last`` and ``trainer.precision``: memory format and autocast dtype."""
    applied = []
    if channels_last:
        method.set_memory_format(torch.channels_last)
        applied.append("channels_last")
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
