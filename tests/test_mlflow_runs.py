"""Sweeps launched through ``launch.py -m`` log to MLflow: to the default SQLite store and to a
real ``mlflow server`` on 127.0.0.1; the report reads them back; a killed job resumes its run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from ffsd.report import summary as report
from ffsd.tracking.mlflow_tracker import flatten_config
from ffsd.tracking.provenance import git_state

from .conftest import ROOT, TINY_RUN, make_cfg, run_launch

pytestmark = pytest.mark.slow  # each fixture below trains two tiny jobs in a fresh process

TINY = (*TINY_RUN, "trainer.epochs=2")
#: A two-job sweep through the seeds sweep definition, narrowed to two seeds.
SWEEP = ("+sweep=seeds", "trainer.seed=0,1", *TINY)


def launch(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    res = run_launch(*args, cwd=cwd, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def clean_env() -> dict[str, str]:
    """This environment without MLFLOW_TRACKING_URI (the tests' autouse store)."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@dataclass
class Sweep:
    uri: str
    sweep_dir: Path

    def runs(self):
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name("ffsd/seeds")
        assert exp is not None, [e.name for e in client.search_experiments()]
        return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def sqlite_sweep(tmp_path_factory) -> Sweep:
    """No tracking URI anywhere: the runs go to <launch dir>/outputs/mlflow.db."""
    root = tmp_path_factory.mktemp("sqlite")
    launch("-m", *SWEEP, f"hydra.sweep.dir={root / 'sweep'}", cwd=root, env=clean_env())
    assert (root / "outputs" / "mlflow.db").is_file()
    return Sweep(f"sqlite:///{root / 'outputs' / 'mlflow.db'}", root / "sweep")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with an SQLite backend, as README shows for clusters.

    ``start`` and ``kill`` may alternate (an outage); a restart keeps the port and the store.
    Each server lives at most ``lifetime_s`` (coreutils ``timeout``), so none outlives a test
    process that dies without its teardown.
    """

    def __init__(self, root: Path, port: int | None = None, lifetime_s: int = 900) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.lifetime_s = lifetime_s
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        began = time.monotonic()
        exe = Path(sys.executable).with_name("mlflow")
        cmd = ["timeout", "-k", "5", str(self.lifetime_s)]
        cmd += [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        cmd += [
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        self.starts += 1
        log = self.root / f"server.{self.starts}.log"
        env = clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = began + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - began
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()}")
            time.sleep(0.25)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server and the workers it started (SIGKILL: as a crash would)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def server_sweep(mlflow_server, tmp_path_factory) -> Sweep:
    root = tmp_path_factory.mktemp("served")
    launch(
        "-m",
        *SWEEP,
        f"logger.tracking_uri={mlflow_server}",
        f"hydra.sweep.dir={root / 'sweep'}",
        cwd=root,
        env=clean_env(),
    )
    assert not (root / "outputs" / "mlflow.db").exists()
    return Sweep(mlflow_server, root / "sweep")


STORES = ("sqlite_sweep", "server_sweep")


@pytest.mark.parametrize("store", STORES)
def test_each_job_is_one_run_with_params_tags_metrics_and_artifacts(store, request, tmp_path):
    sweep: Sweep = request.getfixturevalue(store)
    client, runs = sweep.runs()
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    commit, dirty = git_state()
    for run in sorted(runs, key=lambda r: r.data.tags["ffsd.job_num"]):
        tags, params = run.data.tags, run.data.params
        num = int(tags["ffsd.job_num"])
        run_dir = sweep.sweep_dir / str(num)
        assert tags["ffsd.sweep_dir"] == str(sweep.sweep_dir.resolve())
        assert tags["ffsd.run_dir"] == str(run_dir.resolve())
        overrides = json.loads(tags["ffsd.overrides"])
        assert f"trainer.seed={num}" in overrides and "+sweep=seeds" in overrides
        assert run.info.run_name == f"trainer.seed={num}"  # the swept key's value
        assert tags["ffsd.git_commit"] == tags["mlflow.source.git.commit"] == commit
        assert tags["ffsd.git_dirty"] == str(dirty).lower()
        assert tags["ffsd.hostname"] == socket.gethostname() and tags["ffsd.world_size"] == "1"
        # params: the whole composed config of this job
        job_cfg = make_cfg(*[o for o in overrides], f"trainer.output_dir={run_dir}")
        expected = flatten_config(job_cfg)
        expected["logger.tracking_uri"] = params["logger.tracking_uri"]  # resolved in the job
        # less the per-run path, a tag: MLflow's compare view then shows only real differences
        assert expected.pop("trainer.output_dir") == tags["trainer.output_dir"] == str(run_dir)
        assert params == expected
        assert params["trainer.seed"] == str(num) and params["distill.lambda_fusion"] == "10.0"
        # metrics: every epoch with step=epoch, equal to the run directory's record
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for key in ("test/leader/top1", "train/student1/diversity", "lr/networks"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [
                (r["epoch"], r[key]) for r in records
            ]
        summary = json.loads((run_dir / "summary.json").read_text())
        leader = summary["metrics"]["leader/top1"]
        assert run.data.metrics["best/leader/top1"] == leader["best"]
        assert run.data.metrics["best_epoch/leader/top1"] == leader["best_epoch"]
        assert run.data.metrics["final/leader/top1"] == leader["final"]
        # artifacts
        paths = {
            a.path
            for d in ("config", "environment", "logs", "results", "checkpoints")
            for a in client.list_artifacts(run.info.run_id, d)
        }
        assert {
            "config/config.yaml",
            "config/overrides.yaml",
            "config/hydra.yaml",
            "environment/pip_freeze.txt",
            "logs/launch.log",
            "results/metrics.jsonl",
            "results/summary.json",
            "checkpoints/model_leader_best.pth",
        } <= paths
        got = Path(
            client.download_artifacts(
                run.info.run_id, "checkpoints/model_leader_best.pth", str(tmp_path)
            )
        )
        assert got.read_bytes() == (run_dir / "checkpoints" / "model_leader_best.pth").read_bytes()


def table_rows(md: str) -> list[list[str]]:
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines[1:]]  # after the header


@pytest.mark.parametrize("store", STORES)
def test_report_numbers_are_the_logged_metrics(store, request, tmp_path):
    sweep: Sweep = request.getfixturevalue(store)
    _, runs = sweep.runs()
    out = tmp_path / "report"
    # a sweep directory finds its store by itself; an experiment name is given the store
    args = [str(sweep.sweep_dir)] if store == "sqlite_sweep" else ["ffsd/seeds"]
    args += ["--tracking-uri", sweep.uri] if store == "server_sweep" else []
    assert report.main([*args, "--out", str(out)]) == 0
    rows = table_rows((out / "report.md").read_text())
    assert len(rows) == 1  # the seeds are averaged into one configuration
    row = rows[0]
    for col, (_, metric) in enumerate(report.COLUMNS):
        values = [r.data.metrics[metric] for r in runs]
        digits = 1 if metric.startswith("best_epoch/") else 2
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert row[col] == f"{mean:.{digits}f} ± {std:.{digits}f}", metric
    assert row[-1] == "2"
    with Image.open(out / "curves.png") as img:
        img.verify()
        assert img.format == "PNG"


def test_killed_job_resumes_its_mlflow_run(tmp_path, mlflow_store):
    """SIGKILL right after epoch 1's checkpoint; the relaunch continues the same MLflow run."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=3", f"hydra.run.dir={run_dir}"]
    die_after_epoch_1 = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
sys.argv = ["launch.py", *{args!r}]
from ffsd.training.engine import Trainer
save = Trainer.save_state
def save_then_die(self, epoch, *a, **k):
    save(self, epoch, *a, **k)
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer.save_state = save_then_die
import runpy
runpy.run_path({str(ROOT / "launch.py")!r}, run_name="__main__")  # Hydra finds conf/ beside it
"""
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_store}
    killed = subprocess.run(
        [sys.executable, "-c", die_after_epoch_1], cwd=tmp_path, env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client = MlflowClient(mlflow_store)
    ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`ffsd.run_dir` = '{run_dir.resolve()}'"
    (run,) = client.search_runs(ids, query)
    assert run.info.status == "RUNNING"  # nobody could mark it
    launch(*args, cwd=tmp_path, env=env)
    (after,) = client.search_runs(ids, query)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test/leader/top1")
    assert sorted({m.step for m in history}) == [1, 2, 3]
    assert after.data.tags["ffsd.resume_count"] == "1"
    assert after.data.params["trainer.epochs"] == "3"


def test_a_store_unreachable_at_start_stops_the_job_with_its_message_alone(tmp_path):
    closed = free_port()  # bound and closed again: nothing listens there
    uri = f"http://127.0.0.1:{closed}"
    run_dir = tmp_path / "run"
    res = run_launch(
        *TINY,
        f"logger.tracking_uri={uri}",
        "logger.connect_timeout_s=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=clean_env(),
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"TrackingError: MLflow tracking store {uri} is not reachable" in res.stderr
    assert "Nothing was trained" in res.stderr and "logger=none" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (run_dir / "checkpoints").exists()
