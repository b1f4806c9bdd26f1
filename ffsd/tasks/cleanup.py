"""The run directory of a command stopped before any work (a config or data error): removed.

Hydra makes the job's directory (``outputs/<date>/<time>/``, with ``.hydra/`` and the job's log)
before the task runs, so a command refused by validation, missing data or an unusable checkpoint
would leave one empty-looking run directory per try. :func:`remove_untouched_run_dir` removes it
when it holds nothing but Hydra's own files, then each parent left empty up to the launch
directory; a directory with anything else in it (a checkpoint to resume, metrics) is kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ffsd.training.run_lock import LOCK_NAME

log = logging.getLogger("ffsd")

#: What Hydra writes into a job's directory before the task runs.
HYDRA_DIR = ".hydra"
HYDRA_LOG_SUFFIX = ".log"


def only_hydra_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but ``.hydra/``, the job's ``*.log`` and the run
    directory's lock file (:mod:`ffsd.training.run_lock`)."""
    return all(
        (p.name == HYDRA_DIR and p.is_dir())
        or (p.is_file() and (p.suffix == HYDRA_LOG_SUFFIX or p.name == LOCK_NAME))
        for p in run_dir.iterdir()
    )


def remove_untouched_run_dir(run_dir: Path, stop_at: Path) -> bool:
    """Remove ``run_dir`` if only Hydra wrote into it, and its parents left empty below
    ``stop_at`` (the launch directory); returns whether it was removed."""
    run_dir, stop_at = run_dir.resolve(), stop_at.resolve()
    if not run_dir.is_dir() or run_dir == stop_at or not only_hydra_files(run_dir):
        return False
    try:
        shutil.rmtree(run_dir)
        parent = run_dir.parent
        while parent != stop_at and stop_at in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError as err:  # a leftover directory is untidy, not worth a second error
        log.debug("could not remove %s: %s", run_dir, err)
        return False
    return True
