"""Process-level set-up: device choice, seeding, CPU threads, and capturing/restoring RNG state."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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
