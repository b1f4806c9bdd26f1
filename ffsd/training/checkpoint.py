"""Checkpoint files: atomic writes, safe loads, the run-state format and the release's format.

Two formats:

* **Run state** (``checkpoints/last.pt``), written at the end of every epoch: ``{"format":
  "ffsd-state", "version", "epoch" (completed), "method" (every network and optimizer),
  "rng", "best", "history", "tracking_run_id", "fingerprint", "config" (YAML),
  "resume_changes" (the config changes resumes were allowed to make)}``.

A resume compares the stored config with the new one (:func:`config_changes`): besides the
fingerprint, which must match, every key that changes what the run computes is compared, and
the engine refuses differences unless ``trainer.resume_changes=allow``.
* **Release** (``model<index>_best.pth``): ``{"weight": state_dict, "epoch", "cfg": model name,
  "index": "0" | "1" | "fusion" | "leader"}``, as the paper's code writes; the best leader is
  saved this way so that it loads wherever the released weights do.

Every load uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

STATE_FORMAT = "ffsd-state"
STATE_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, of another kind, or does not match this run."""


class OutputWriteError(RuntimeError):
    """A file of the run could not be written (full disk, no permission); names file and space."""


#: torch.save's own words for a failed write: a RuntimeError that carries no errno.
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|file write failed")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_space(folder: Path) -> str:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return f"the free space of {folder} is unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the file system of {folder}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` into an :class:`OutputWriteError` with the free space.

    Without it a full disk surfaces as torch's ``enforce fail at inline_container.cc`` or a bare
    ``OSError`` deep in a traceback, naming neither the file nor the disk.
    """
    path = Path(path)
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (the disk or the quota is full)"
        raise OutputWriteError(_write_message(path, reason)) from err
    except RuntimeError as err:
        if isinstance(err, OutputWriteError) or not _TORCH_WRITE_FAILURE.search(str(err)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OutputWriteError(_write_message(path, f"torch.save failed ({first})")) from err


def _write_message(path: Path, reason: str) -> str:
    return (
        f"could not write {path}: {reason}; {_free_space(path.parent)}. Free some space (or fix "
        "the permissions) and run the same command again to continue from the last checkpoint, "
        "which is intact (files are replaced atomically), or set trainer.output_dir elsewhere."
    )


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename.

    A reader (or a resumed run) sees the old file or the new one, never a partial one, even if
    the process dies mid-write.
    """
    path = Path(path)
    with writing(path):
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


def atomic_write_text(text: str, path: str | Path) -> Path:
    """``path.write_text(text)`` through a temporary file and a rename, failures as above."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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


#: Config keys (``fnmatch`` patterns) whose value does not change what a run computes: where it
#: writes and reads, how it shows progress, on what hardware and with which kernels it runs
#: (numerics may differ in the last bits, as on another GPU), how it is evaluated and tracked.
#: A resume ignores changes to them; every other key is compared. ``trainer.epochs`` is the
#: run's length, see :func:`config_changes`.
RUN_NEUTRAL_KEYS: tuple[str, ...] = (
    "trainer.output_dir",
    "trainer.resume",
    "trainer.resume_changes",
    "trainer.progress",
    "trainer.log_every",
    "trainer.threads",
    "trainer.device",
    "trainer.host_malloc.*",
    "trainer.channels_last",
    "trainer.compile.*",
    "trainer.distributed.*",
    "trainer.preempt_signal",
    "trainer.stop_signals",
    "trainer.eval_every",
    "trainer.test_batch_size",
    "optim.*.foreach",
    "optim.*.fused",
    "dataset.root",
    "dataset.download",
    "dataset.verify_checksums",
    "dataset.loader.*",
    "dataset.topk",
    "logger.*",
    "task.*",
    "checkpoint",
    # Labels: the values a protocol sets are compared where they land (optim.*, schedule.*, ...).
    "protocol.*",
    "hydra.*",
)

_ABSENT = "(absent)"


def _neutral(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RUN_NEUTRAL_KEYS)


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> resolved value of every leaf that may change the run (lists are leaves).

    Neutral keys are skipped before resolving: they hold the interpolations that only resolve in
    a live Hydra job (``${hydra:runtime.output_dir}``) or from the environment. A value that
    does not resolve is compared as written.
    """
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, raw in node.items():
            key = f"{prefix}{k}"
            if _neutral(key):
                continue
            if isinstance(raw, dict) and raw:
                walk(raw, key + ".")
                continue
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=False)
                if isinstance(value, DictConfig | ListConfig):
                    value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # an interpolation of another process's environment
                value = raw
            out[key] = value

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def config_changes(stored: str | DictConfig | None, current: DictConfig) -> dict[str, list[Any]]:
    """``{key: [stored value, current value]}`` of every run-changing key that differs.

    ``stored``: the run state's ``config`` (YAML, as the engine writes it). Keys of
    :data:`RUN_NEUTRAL_KEYS` are ignored; a key on one side only shows ``(absent)`` on the
    other. Interpolations resolve within each config, so cosine's ``schedule.epochs:
    ${trainer.epochs}`` shows as a change of ``schedule.epochs``.
    """
    if stored is None:
        return {}
    old_cfg = OmegaConf.create(stored) if isinstance(stored, str) else stored
    old, new = _leaves(old_cfg), _leaves(current)
    changes: dict[str, list[Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b or (type(a) is bool) != (type(b) is bool):  # true is 1 to Python
            changes[key] = [a, b]
    return changes
