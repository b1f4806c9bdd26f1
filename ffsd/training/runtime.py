"""Process-level set-up: device choice, seeding, CPU threads, the C allocator, RNG state."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")

# mallopt(3) parameter numbers (glibc's malloc.h) and its value range: a C int of bytes.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOPT_MAX_MB = (2**31 - 1) >> 20


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` fails clearly when there is no GPU."""
    if choice not in DEVICE_CHOICES and not str(choice).startswith("cuda:"):
        raise ValueError(
            f"trainer.device={choice!r} is not valid; choose one of {', '.join(DEVICE_CHOICES)}"
        )
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(choice).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.device={choice!r} but torch.cuda.is_available() is False on this machine; "
            "use trainer.device=cpu or trainer.device=auto"
        )
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    """Intra-op CPU threads; ``None`` or 0 keeps PyTorch's choice (one per core)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))


def has_glibc_malloc() -> bool:
    """Whether this process's C library is glibc on Linux, whose ``mallopt`` host_malloc sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_host_malloc(
    mmap_threshold_mb: int | None, trim_threshold_mb: int | None
) -> dict[str, int]:
    """Make glibc's malloc keep freed CPU tensor memory for the next step (``trainer.host_malloc``).

    PyTorch takes every CPU tensor from malloc. With glibc's defaults, a block above the mmap
    threshold (dynamic, at most 32 MB) gets its own mapping, unmapped when freed, and free memory at
    the heap's top beyond the trim threshold goes back to the kernel: each training step then
    page-faults its activations in again, up to 75,000 minor faults per ResNet-32 step at
    batch 128 (benchmarks/README.md), each one a trap plus a zeroed page. With both thresholds
    raised, steps reuse the heap as a caching allocator would, and the resident set stays near
    the step's peak, which the step reaches anyway (ResNet-32, WRN-40-2: the same peak as with
    glibc's defaults). The heap takes a few steps to settle: PyTorch asks for 64-byte aligned
    blocks, so a freed block is a little short for the same request until its neighbours merge
    (a loop over one 64 MB tensor holds up to 8 copies before it does, then never grows).
    ``None`` leaves glibc's setting.

    Returns the settings applied, in MB; empty where the C library is not glibc.
    """
    wanted = {"mmap_threshold_mb": mmap_threshold_mb, "trim_threshold_mb": trim_threshold_mb}
    for key, mb in wanted.items():
        if mb is not None and not (
            isinstance(mb, int) and not isinstance(mb, bool) and 1 <= mb <= MALLOPT_MAX_MB
        ):
            raise ValueError(
                f"trainer.host_malloc.{key}={mb!r} is not valid; "
                f"give an integer from 1 to {MALLOPT_MAX_MB} (MB), or null for glibc's default"
            )
    wanted = {key: mb for key, mb in wanted.items() if mb is not None}
    if not wanted:
        return {}
    if not has_glibc_malloc():
        log.debug("trainer.host_malloc: the C library is not glibc; left as it is")
        return {}
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    params = {"mmap_threshold_mb": _M_MMAP_THRESHOLD, "trim_threshold_mb": _M_TRIM_THRESHOLD}
    for key, mb in wanted.items():
        if mallopt(params[key], mb << 20) != 1:
            raise RuntimeError(f"glibc's mallopt refused trainer.host_malloc.{key}={mb}")
    return wanted


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from, for checkpoints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # As plain types and a tensor, so that checkpoints load with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1
