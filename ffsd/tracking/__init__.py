"""Experiment tracking: where a run's parameters, metrics and files are recorded.

Owns the tracker interface the engine calls (:mod:`~ffsd.tracking.base`: :class:`Tracker`,
:class:`NullTracker`, :class:`TrackingError`), the MLflow implementation
(:mod:`~ffsd.tracking.mlflow_tracker`), the background thread that sends its records so that
training never waits on the store (:mod:`~ffsd.tracking.sender`), the creation of the default
SQLite store, one job at a time (:mod:`~ffsd.tracking.sqlite_store`) and the provenance a run
records (:mod:`~ffsd.tracking.provenance`: git state, packages, host, overrides).

May import: :mod:`ffsd.config` only. Never the training run, the methods or the tasks, so the
engine can depend on the interface without pulling MLflow in (this ``__init__`` imports only
:mod:`~ffsd.tracking.base`).
"""

from ffsd.tracking.base import NullTracker, TrackedRun, Tracker, TrackingError

__all__ = ["NullTracker", "TrackedRun", "Tracker", "TrackingError"]
