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

Every load uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code. Before it,
every record of a torch.save archive is checked against the CRC-32 stored with it
(:func:`verify_archive`): ``torch.load`` does not, so flipped bytes inside a tensor would load as
other weights without a word. A run state whose weights are not finite is refused by
:func:`load_state` (resume); readers of one network report them (:func:`nonfinite_tensors`).

Every write goes through a temporary file ``.<name>.<random>.tmp`` beside the target, fsync and a
rename (:func:`atomic_save`, :func:`atomic_write_text`), created with the user's umask; one that
a kill left behind is removed when the run directory is next started
(:func:`remove_stale_temporaries`, under the run directory's lock).
"""

from __future__ import annotations

import errno
import fnmatch
import math
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

STATE_FORMAT = "ffsd-state"
STATE_VERSION = 1
#: The temporary files of the writers below (``.last.pt.3f9a1c07.tmp``), and of earlier versions
#: (``tempfile.mkstemp``'s ``.last.pt.k2j_x9qa.tmp``, ``.summary.json.tmp``).
TMP_PATTERN = re.compile(r"^\..+?(\.[A-Za-z0-9_]+)?\.tmp$")
#: How many non-finite tensors a message names.
SHOW_TENSORS = 5


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


def _temporary(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path``, open for writing.

    Created with mode 0o666 so that the kernel applies the umask (and a directory's default ACL)
    as for any file the user creates: ``tempfile.mkstemp`` makes 0o600 files, which the rename
    would keep, unreadable by the project's group on a shared directory.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _replace(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a temporary file with ``write``, fsync it, rename it to ``path``, fsync the folder.

    A reader (or a resumed run) sees the old file or the new one, never a partial one, even if
    the process or the machine dies mid-write: the data is on disk before the rename, and the
    rename before this returns.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path``, replaced atomically (see :func:`_replace`)."""
    return _replace(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """``path.write_text(text)`` (UTF-8), replaced atomically like :func:`atomic_save`."""
    return _replace(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Remove the writers' temporary files (:data:`TMP_PATTERN`) in ``folders``; return them.

    Only a kill during a write leaves one (a failed write removes its own). Call it only while
    holding the run directory (:mod:`ffsd.training.run_lock`): another live writer's file would
    go too.
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if TMP_PATTERN.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``, turning every failure into a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    verify_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(_load_failure(path, err)) from err


def verify_archive(path: Path) -> None:
    """Check every record of the torch.save archive ``path`` against its stored CRC-32.

    ``torch.load`` reads the records without checking them. One pass over the file (zlib's
    CRC-32, faster than the disk). Files that are not zip archives (legacy ``torch.save``, a
    plain pickle) carry no checksum and are left to ``torch.load``, as is an archive too damaged
    to list its records: :func:`_load_failure` says what it is.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return
    if bad is not None:
        raise CheckpointError(
            f"{path} is damaged: its record {bad!r} does not match the CRC-32 checksum stored "
            "with it (bytes changed on disk, in a copy or in a transfer since it was written), "
            "so it was not used. Take the file from a good copy; a run's checkpoints/last.pt can "
            "be moved away to start the run over."
        )


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the floating-point tensors in ``tree`` (nested dicts and lists) that hold
    NaN or infinite values."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return [] if bool(torch.isfinite(tree).all()) else [prefix or "(tensor)"]
        return []
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [prefix]
    items: Any = ()
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    return [
        key for k, v in items for key in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    ]


def name_tensors(keys: list[str]) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``."""
    shown = ", ".join(keys[:SHOW_TENSORS])
    return shown if len(keys) <= SHOW_TENSORS else f"{shown} and {len(keys) - SHOW_TENSORS} more"


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
    # The weights and optimizer state (momentum buffers) the run would continue from.
    bad = nonfinite_tensors(state.get("method"), "method")
    if bad:
        raise CheckpointError(
            f"{path} cannot be resumed: {name_tensors(bad)} hold NaN or infinite values, so "
            "training would go on from broken networks. Resume from an earlier copy of the "
            "file, or start over (move the file away)."
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
    "trainer.nhwc_batch_norm",
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
