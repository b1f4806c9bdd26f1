"""Test-only task and tracker for runs launched in subprocesses (torchrun, submitit).

``task._target_=tests.dist_task.train_and_dump`` trains exactly like ``ffsd.tasks.train.run``
and then writes what this rank holds (every network's parameters and buffers) to
``<run dir>/rank<r>_state.pt``, so a test can compare the ranks' replicas after the run.
``logger._target_=tests.dist_task.RecordingTracker`` appends every tracker call, tagged with the
process's rank, to ``<run dir>/tracker_calls.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ffsd.tasks import train as train_task
from ffsd.tasks.validation import validate
from ffsd.tracking.base import Tracker
from ffsd.training import distributed
from ffsd.training.runtime import resolve_device


def train_and_dump(cfg: DictConfig) -> float:
    validate(cfg)
    with distributed.session(
        cfg.trainer.distributed.backend, resolve_device(cfg.trainer.device)
    ) as ctx:
        trainer = train_task.build_trainer(cfg, ctx)
        summary = trainer.fit()
        state = {k: m.state_dict() for k, m in trainer.method.modules().items()}
        torch.save(state, trainer.run_dir / f"rank{ctx.rank}_state.pt")
    return float(summary["best"]["value"] or 0.0)


class RecordingTracker(Tracker):
    def __init__(self, **_: Any) -> None:
        self.path: Path | None = None

    def _record(self, call: str, **fields: Any) -> None:
        assert self.path is not None, f"{call} before start"
        with open(self.path, "a") as f:
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
            f.write(json.dumps({"call": call, "rank": rank, "pid": os.getpid()} | fields) + "\n")

    def start(self, cfg: DictConfig, run_dir: Path, resume_run_id: str | None = None) -> None:
        self.path = Path(run_dir) / "tracker_calls.jsonl"
        self.run_id = resume_run_id or f"run-{os.getpid()}"
        self._record("start", resume_run_id=resume_run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._record("log_metrics", step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self._record("log_summary")

    def finish(self, status: str = "FINISHED") -> None:
        self._record("finish", status=status)
