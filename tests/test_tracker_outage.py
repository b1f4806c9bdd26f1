"""A tracking server that goes down mid-run never stalls training, and nothing is lost.

A real ``mlflow server`` on 127.0.0.1 is killed (SIGKILL, as a crash) while a tiny job trains
against it. The job runs through ``launch.py`` in a child process that prints, with the clock
both processes share (``time.monotonic``), when each epoch's ``last.pt`` is written and how long
each ``tracker.log_metrics`` call held the training loop; each epoch is paced by a short sleep,
so that its length hardly depends on how loaded the machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from .conftest import ROOT, TINY_RUN
from .test_mlflow_runs import MlflowServer, clean_env

pytestmark = pytest.mark.slow  # a tracking server started three times, three tiny jobs

#: Seconds of sleep added to every epoch (the epoch's own compute comes on top).
PACE_S = 2.0
#: Outage epochs may take this much longer than those before it: ratio and seconds.
SLACK = (1.5, 4.0)

CHILD = f"""
import os, runpy, sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.argv = ["launch.py", *sys.argv[1:]]
from ffsd.tracking.mlflow_tracker import MLflowTracker
from ffsd.training.engine import Trainer
pace = float(os.environ["FFSD_TEST_PACE_S"])
train_epoch, save_state = Trainer.train_epoch, Trainer.save_state
log_metrics = MLflowTracker.log_metrics
def paced(self, epoch):
    time.sleep(pace)
    return train_epoch(self, epoch)
def saved(self, epoch, partial=None):
    save_state(self, epoch, partial)
    if partial is None:
        print(f"@@ saved epoch={{epoch}} t={{time.monotonic():.4f}}", flush=True)
def timed(self, metrics, step):
    began = time.monotonic()
    log_metrics(self, metrics, step)
    print(f"@@ tracker step={{step}} s={{time.monotonic() - began:.6f}}", flush=True)
Trainer.train_epoch, Trainer.save_state, MLflowTracker.log_metrics = paced, saved, timed
runpy.run_path({str(ROOT / "launch.py")!r}, run_name="__main__")
"""
SAVED = re.compile(r"@@ saved epoch=(\d+) t=([\d.]+)")
CALL = re.compile(r"@@ tracker step=(\d+) s=([\d.]+)")


class Job:
    """``launch.py`` in a child process; its output is read line by line as it comes."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = clean_env() | {"PYTHONUNBUFFERED": "1", "FFSD_TEST_PACE_S": str(PACE_S)}
        self.began = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.saved: dict[int, float] = {}
        self.calls: dict[int, float] = {}
        self.ended: float | None = None
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                if m := SAVED.match(line):
                    self.saved[int(m[1])] = float(m[2])
                elif m := CALL.match(line):
                    self.calls[int(m[1])] = float(m[2])
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def saved_by(self, epoch: int, timeout_s: float) -> bool:
        """Wait until epoch ``epoch``'s checkpoint is written; False on timeout or job end."""
        with self._cond:
            return self._cond.wait_for(lambda: epoch in self.saved or self._eof, timeout_s) and (
                epoch in self.saved
            )

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"the job ran over {timeout_s} s:\n{self.output[-5000:]}")
        self.ended = time.monotonic()
        self._reader.join(timeout=30)
        return rc

    def interval(self, epoch: int) -> float:
        """Wall seconds from epoch ``epoch - 1``'s checkpoint to epoch ``epoch``'s."""
        return self.saved[epoch] - self.saved[epoch - 1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("outage_server"), lifetime_s=1200)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def job_args(server: MlflowServer, run_dir: Path, epochs: int, flush_timeout_s: float):
    return (
        *TINY_RUN,
        "trainer.threads=1",
        f"trainer.epochs={epochs}",
        f"hydra.run.dir={run_dir}",
        f"logger.tracking_uri={server.uri}",
        f"logger.flush_timeout_s={flush_timeout_s}",
        "logger.experiment_name=ffsd/outage",
    )


def the_run(server: MlflowServer, run_dir: Path):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("ffsd/outage")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`ffsd.run_dir` = '{run_dir}'")
    return client, run


def logged_epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, "time/epoch_s")})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_epoch(run_dir: Path) -> int:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return int(state["epoch"])


def test_a_server_down_for_epochs_costs_no_training_time_and_loses_nothing(server, tmp_path):
    epochs, kill_after, back_after = 8, 3, 6
    run_dir = (tmp_path / "run").resolve()
    job = Job(*job_args(server, run_dir, epochs, flush_timeout_s=180), cwd=tmp_path)
    assert job.saved_by(kill_after, timeout_s=300), job.output[-5000:]
    server.kill()
    killed = time.monotonic()
    # The outage lasts three epochs, or a minute where a tracker call stalls the loop.
    job.saved_by(back_after, timeout_s=60)
    restarting = time.monotonic()
    restart_s = server.start()
    assert job.wait(timeout_s=600) == 0, job.output[-5000:]

    before = [job.interval(e) for e in range(2, kill_after + 1)]
    reference = statistics.median(before)
    during = {e: job.interval(e) for e in range(kill_after + 1, epochs + 1) if e in job.saved}
    # The epochs that began while the server was down (it was back some seconds after this).
    outage = {e: s for e, s in during.items() if job.saved[e - 1] < restarting}
    in_loop = {e: job.calls[e] for e in outage}
    print(
        f"\nepoch wall s before the outage {[round(s, 2) for s in before]}, during it "
        f"{ {e: round(s, 2) for e, s in outage.items()} }, after "
        f"{ {e: round(s, 2) for e, s in during.items() if e not in outage} }; "
        f"tracker.log_metrics held the loop {in_loop} s; outage {restarting - killed:.1f} s "
        f"+ restart {restart_s:.1f} s; job {job.ended - job.began:.1f} s"
    )
    bound = SLACK[0] * reference + SLACK[1]
    assert all(s < bound for s in outage.values()), (outage, reference)
    assert len(outage) >= 2, f"the outage covered epochs {sorted(outage)} only"
    assert all(s < 0.05 * reference for s in in_loop.values()), in_loop
    assert "failed to record" in job.output and "answers again" in job.output
    assert "did not take" not in job.output

    assert len(records(run_dir)) == epochs and last_epoch(run_dir) == epochs
    client, run = the_run(server, run_dir)
    assert logged_epochs(client, run.info.run_id) == list(range(1, epochs + 1))
    history = client.get_metric_history(run.info.run_id, "train/leader/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        r["train/leader/loss"] for r in records(run_dir)
    ]
    assert "best/leader/top1" in run.data.metrics and run.info.status == "FINISHED"
    assert {"results/metrics.jsonl", "results/summary.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "results")
    }


def test_a_server_that_never_returns_costs_the_flush_timeout_then_a_relaunch_sends_all(
    server, tmp_path
):
    epochs, flush_timeout_s = 4, 5
    run_dir = (tmp_path / "run").resolve()
    if server.proc is None:
        server.start()
    args = job_args(server, run_dir, epochs, flush_timeout_s)
    job = Job(*args, cwd=tmp_path)
    assert job.saved_by(1, timeout_s=300), job.output[-5000:]
    server.kill()
    killed = time.monotonic()
    assert job.wait(timeout_s=600) == 0, job.output[-5000:]

    epoch_s = statistics.median(r["time/epoch_s"] for r in records(run_dir))
    after_kill = job.ended - killed
    bound = (epochs - 1) * (SLACK[0] * epoch_s + SLACK[1]) + flush_timeout_s + 20
    out = job.output
    warning = next((line for line in out.splitlines() if "did not take" in line), "")
    print(
        f"\nserver killed after epoch 1: the job ended {after_kill:.1f} s later (bound "
        f"{bound:.1f} s; median epoch {epoch_s:.2f} s, flush_timeout_s={flush_timeout_s}); "
        f"tracker.log_metrics held the loop {job.calls} s; job {job.ended - job.began:.1f} s\n"
        f"{warning}"
    )
    assert after_kill < bound
    assert all(s < 0.05 * epoch_s for s in job.calls.values()), job.calls
    assert "Traceback" not in out and warning, out[-5000:]
    assert f"within logger.flush_timeout_s={flush_timeout_s} s" in warning
    assert "the metrics of epochs 2-4" in warning or "the metrics of epochs 1-4" in warning
    assert "the summary metrics" in warning and "the run's status (FINISHED)" in warning
    assert "relaunch the same command" in warning
    assert len(records(run_dir)) == epochs and last_epoch(run_dir) == epochs
    assert (run_dir / "summary.json").is_file()

    # The server is back: the same command trains nothing more and sends what was missing.
    server.start()
    again = Job(*args, cwd=tmp_path)
    assert again.wait(timeout_s=600) == 0, again.output[-5000:]
    assert not again.saved, "the relaunch trained nothing"
    client, run = the_run(server, run_dir)
    assert logged_epochs(client, run.info.run_id) == list(range(1, epochs + 1))
    assert "best/leader/top1" in run.data.metrics and run.info.status == "FINISHED"
    assert run.data.tags["ffsd.resume_count"] == "1"
