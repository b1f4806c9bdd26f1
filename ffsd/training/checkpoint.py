"""Checkpoint files: atomic writes, safe loads, the run-state format and the release's format.

Two formats:

* **Run state** (``checkpoints/last.pt``), written at the end of every epoch: ``{"format":
  "ffsd-state", "version", "epoch" (completed), "method" (every network and optimizer),
  "rng", "best", "history", "tracking_run_id", "fingerprint", "config" (YAML)}``.
* **Release** (``model<index>_best.pth``): ``{"weight": state_dict, "epoch", "cfg": model name,
  "index": "0" | "1" | "fusion" | "leader"}``, as the paper's code writes; the best leader is
  saved this way so that it loads wherever the released weights do.

Every load uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FORMAT = "ffsd-state"
STATE_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, of another kind, or does not match this run."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename.

    A reader (or a resumed run) sees the old file or the new one, never a partial one, even if
    the process dies mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``, turning every failure into a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(_load_failure(path, err)) from err


def _load_failure(path: Path, err: Exception) -> str:
    """Why ``path`` did not load, from its first bytes: torch's own message for a file that is
    not a checkpoint suggests ``weights_only=False``, which we never do."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    text = str(err)
    first = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    needs = re.search(r"GLOBAL ([\w.]+)", text)
    if needs:
        return (
            f"{path} holds Python objects besides tensors (it needs {needs.group(1)}); ffsd reads "
            "checkpoints with torch.load(weights_only=True), which runs no code from the file. "
            "Save a state_dict (or the release's {'weight': state_dict, ...}) instead."
        )
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{path} ({size} bytes) is a damaged or truncated torch.save archive (a copy that "
            f"did not finish?): {type(err).__name__}: {first}"
        )
    if head[:1] == b"\x80":
        return (
            f"{path} ({size} bytes) is a pickle that torch.load(weights_only=True) cannot read: "
            "a plain pickle.dump file, or a truncated or damaged legacy torch.save file"
        )
    return (
        f"{path} ({size} bytes, starting {head!r}) is not a PyTorch checkpoint: neither a "
        "torch.save archive nor a pickle. It may be truncated or damaged, or another kind of file."
    )


def save_release(model: nn.Module, path: str | Path, *, epoch: int, cfg: str, index: str) -> Path:
    """Save ``model`` in the released code's format (see module docstring)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"weight": state, "epoch": epoch, "cfg": cfg, "index": index}, path)


def load_state(path: str | Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load a run-state checkpoint and check it belongs to a run like this one."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        kind = "a released-format weights file" if "weight" in (state or {}) else "not a run state"
        raise CheckpointError(
            f"{path} is {kind}, not an ffsd run-state checkpoint (format {STATE_FORMAT!r}); "
            "to evaluate weights use task=eval"
        )
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has run-state version {state.get('version')}, this ffsd reads "
            f"version {STATE_VERSION}"
        )
    theirs = state.get("fingerprint", {})
    diffs = [
        f"{k}: checkpoint {theirs.get(k)!r}, this run {v!r}"
        for k, v in fingerprint.items()
        if theirs.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"{path} was written by a different run configuration ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another output directory "
            "(or trainer.resume=never after moving the file away)."
        )
    return state
