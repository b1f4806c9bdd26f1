"""Several jobs at once: a fresh MLflow store raced by its jobs, run directories two jobs would
share (same-second launches, one trainer.output_dir), and a sweep whose later job is invalid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ffsd.tasks import train as train_task
from ffsd.training.checkpoint import safe_load
from ffsd.training.run_lock import RunDirBusy, hold_run_dir

from .conftest import ROOT, TINY_RUN, make_cfg, run_launch

#: One epoch of the tiniest run, one thread per process: four of them share two cores.
ONE_EPOCH = (*TINY_RUN, "trainer.epochs=1", "trainer.device=cpu", "trainer.threads=1")


def job_env() -> dict[str, str]:
    """This environment without the tests' MLflow store: jobs use the default SQLite file."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_jobs_started_together_on_a_fresh_store_all_finish_in_their_own_directories(
    tmp_path,
):
    # No hydra.run.dir: the default run directories, all created within a second or two.
    procs = [start(*ONE_EPOCH, cwd=tmp_path) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    db = tmp_path / "outputs" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")  # the store opens afterwards
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    records = sorted((tmp_path / "outputs").glob("*/*/mlflow_run.json"))
    assert len(records) == 4, records  # four run directories, one run in each
    assert {json.loads(r.read_text())["run_id"] for r in records} == {r.info.run_id for r in runs}
    assert all((r.parent / "summary.json").is_file() for r in records)
    assert not list(db.parent.glob(".mlflow.db.*"))  # no half-built store left beside it


#: Two processes that resolve the default run and sweep directories with the clock stopped at
#: one second, as two jobs started together see it.
SAME_SECOND = """
import datetime, json
import hydra.core.utils
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
import ffsd.config

class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 1, 2, 3, 4, 5)

hydra.core.utils.datetime = Frozen
with initialize_config_dir(config_dir=str(ffsd.config.CONF_DIR), version_base="1.3"):
    cfg = compose("config", return_hydra_config=True)
print(json.dumps([OmegaConf.select(cfg, k) for k in ("hydra.run.dir", "hydra.sweep.dir")]))
"""


def test_jobs_started_in_the_same_second_get_distinct_run_and_sweep_directories():
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAME_SECOND], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(2)
    ]
    (a_run, a_sweep), (b_run, b_sweep) = (json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert a_run.startswith("outputs/2024-01-02/03-04-05") and a_run != b_run
    assert a_sweep.startswith("multirun/2024-01-02/03-04-05") and a_sweep != b_sweep


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_run_directory_is_held_by_one_live_job_and_freed_when_it_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    overrides = (*TINY_RUN, "trainer.device=cpu", "logger=none", f"trainer.output_dir={run_dir}")
    holder = start(
        *overrides, "trainer.epochs=100000", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path
    )
    try:
        wait_for(run_dir / "checkpoints" / "last.pt", holder)
        # A second job given the same trainer.output_dir is refused, naming the live holder.
        with pytest.raises(RunDirBusy) as err:
            train_task.run(make_cfg(*overrides, "trainer.epochs=100000"))
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and str(run_dir) in msg and "trainer.output_dir" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    # Killed (no clean-up ran): what it left mid-write is in the way of nothing, nor is its lock.
    stale = run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    done = int(safe_load(run_dir / "checkpoints" / "last.pt")["epoch"])
    train_task.run(make_cfg(*overrides, f"trainer.epochs={done}"))  # resumes, trains no more
    assert not stale.exists()
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == done


def test_a_run_directory_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    lock = hold_run_dir(tmp_path)
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from ffsd.training.run_lock import "
            "RunDirBusy, hold_run_dir\ntry:\n    hold_run_dir(Path(sys.argv[1]))\n"
            "except RunDirBusy as e:\n    print(e)",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert f"pid {os.getpid()}" in other.stdout, other.stderr
    lock.release()
    hold_run_dir(tmp_path).release()  # nobody holds it now


@pytest.mark.slow
def test_a_sweep_validates_every_job_before_the_first_one_starts(tmp_path):
    res = run_launch(
        "-m",
        *ONE_EPOCH,
        "logger=none",
        "optim.networks.lr=0.1,-1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "job #1" in res.stderr and "optim.networks.lr=-1" in res.stderr, res.stderr[-3000:]
    assert "No job was launched" in res.stderr
    assert not (tmp_path / "sweep" / "0" / "checkpoints").exists()  # job #0 never trained
