"""One live process per run directory: a lock on ``<run dir>/.run.lock`` for the whole run.

Two jobs writing one run directory (the same ``trainer.output_dir``) would mix their
``last.pt``, ``metrics.jsonl`` and ``mlflow_run.json``, and one run's results would be lost. The
engine's main process therefore holds an exclusive ``fcntl.flock`` on this file from before it
reads ``last.pt`` until the run ends; a second process is refused with :class:`RunDirBusy`, which
names the holder (pid, host, start time, command, written into the file once it is held).

The kernel drops an flock when the process holding it ends, however it ends (``kill -9``
included), so a killed job never leaves its directory locked. The file itself stays: deleting a
lock file on release lets a process that opened the old one and one that creates a new one both
"hold" it. Linux's NFS client maps flock onto NFS byte-range locks, so the lock also holds
between the nodes of a cluster sharing the run directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ffsd")

LOCK_NAME = ".run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""


class RunDirLock:
    """The held lock of one run directory; :meth:`release` (or the process's end) frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        record = json.loads(os.pread(fd, 65536, 0).decode())
    except (OSError, ValueError):
        return None  # the holder is between taking the lock and writing its record
    return record if isinstance(record, dict) else None


def _busy(folder: Path, holder: dict[str, Any] | None) -> str:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, running since {holder.get('since')}: "
        f"{holder.get('command')}"
        if holder
        else "a process that is just starting"
    )
    return (
        f"trainer.output_dir={folder} is in use by another live job ({who}). Two jobs in one run "
        "directory would mix their checkpoints, metrics and logs. Wait for that job to end (or "
        "stop it; the lock goes with its process), or give this job another trainer.output_dir."
    )


def hold_run_dir(folder: str | Path) -> RunDirLock:
    """Lock ``folder`` (created if needed) for this process, or raise :class:`RunDirBusy`.

    On a file system without locks (``ENOLCK``, ``EOPNOTSUPP``) the run goes on unlocked, with a
    warning: refusing would stop every run there.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirBusy(_busy(folder, holder)) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning(
            "cannot lock %s (%s): a second job given this trainer.output_dir would not be stopped",
            path,
            err.strerror,
        )
        return RunDirLock(path, None)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
    return RunDirLock(path, fd)
