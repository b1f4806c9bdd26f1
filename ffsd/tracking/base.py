"""Experiment tracking: the interface the engine logs through, and the no-op tracker.

A tracker is built from ``conf/logger/*.yaml``. The engine calls it on the main process only:
``start`` once (with the run id to continue when resuming), ``log_metrics`` every epoch,
``log_artifact`` for files, ``finish`` at the end. Before a sweep's jobs start, the launching
process calls ``prepare`` once per job config (``ffsd.tasks.hydra_callbacks``), so that shared
resources (an MLflow experiment) are created once, not raced for by many jobs.

Implementations: :class:`NullTracker` (``logger=none``) and
:class:`ffsd.tracking.mlflow_tracker.MLflowTracker` (``logger=mlflow``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training, with the ways out."""


@dataclass(frozen=True)
class TrackedRun:
    """A run already in a tracking store: where it is and its id (a run directory records it)."""

    uri: str | None
    experiment: str | None
    run_id: str


class Tracker:
    """Base class and no-op implementation of every hook."""

    #: Identifier of the tracking run (saved in checkpoints so that a resumed job continues it).
    run_id: str | None = None

    def prepare(self, cfg: DictConfig) -> None:
        """In the launching process, before the jobs of a sweep start; ``cfg``: one job's config."""

    def start(
        self,
        cfg: DictConfig,
        run_dir: Path,
        resume_run_id: str | None = None,
        parent: TrackedRun | None = None,
    ) -> None:
        """Open (or reopen) the run; ``cfg`` is the whole composed config. ``parent``: the run
        this one belongs to (an evaluation of a tracked run's checkpoint), in whose store and
        experiment it is created as a child run."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final metrics of the run (best and final accuracies)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED."""

    def describe(self) -> str:
        return "no experiment tracking"

    @contextmanager
    def run(
        self, cfg: DictConfig, run_dir: Path, parent: TrackedRun | None = None
    ) -> Iterator[Tracker]:
        """``start``, then the block, then ``finish`` with how the block ended: FINISHED,
        KILLED (Ctrl-C) or FAILED (any other exception, which propagates).

        For a task that is one block of work (an evaluation); training closes its run itself,
        since a stop signal may end the process where no ``finally`` runs.
        """
        self.start(cfg, run_dir, parent=parent)
        try:
            yield self
        except KeyboardInterrupt:
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish("FINISHED")


class NullTracker(Tracker):
    """``logger=none``: nothing is sent anywhere (the run directory still has metrics.jsonl)."""

    def __init__(self, **_: Any) -> None:
        pass
