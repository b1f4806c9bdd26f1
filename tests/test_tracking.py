"""MLflow tracking in-process: params, store location, experiment races, and store failures.

The launches through Hydra (sweeps, a tracking server, a killed job) are in test_mlflow_runs.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from ffsd.config import ConfigError
from ffsd.tasks import train as train_task
from ffsd.tracking.base import TrackedRun, Tracker
from ffsd.tracking.mlflow_tracker import (
    HTTP_SETTINGS,
    OVERFLOW_ARTIFACT,
    MLflowTracker,
    TrackingError,
    artifact_location,
    bound_http_calls,
    describe_records,
    flatten_config,
    get_or_create_experiment,
    refused,
    resolve_tracking_uri,
    split_params,
)
from ffsd.tracking.sender import Record, Sender

from .conftest import TINY_RUN, make_cfg

TINY = TINY_RUN


def runs_of(uri: str, run_dir: Path):
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(ids, f"tags.`ffsd.run_dir` = '{run_dir.resolve()}'")


def steps(client: MlflowClient, run_id: str, key: str = "test/leader/top1") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# -- pure functions --------------------------------------------------------------------------
def test_config_is_flattened_to_dotted_keys_resolved_where_possible():
    cfg = OmegaConf.create(
        {
            "a": {"b": 1, "c": [1, 5], "d": None, "e": True, "f": "x"},
            "g": 1e-5,
            "h": "${a.b}",
            "out": "${hydra:runtime.output_dir}",  # no Hydra app here: kept as written
        }
    )
    flat = flatten_config(cfg)
    assert flat == {
        "a.b": "1",
        "a.c": "[1, 5]",
        "a.d": "null",
        "a.e": "true",
        "a.f": "x",
        "g": "1e-05",
        "h": "1",
        "out": "${hydra:runtime.output_dir}",
    }


def test_the_whole_composed_config_becomes_params():
    cfg = make_cfg(*TINY, "trainer.output_dir=/somewhere")
    flat = flatten_config(cfg)
    assert flat["distill.lambda_fusion"] == "10.0" and flat["model.name"] == "resnet20"
    assert flat["distill.lambda_student_sd"] == flat["distill.lambda_div"] == "1e-05"
    assert flat["logger._target_"] == "ffsd.tracking.mlflow_tracker.MLflowTracker"
    leaves = OmegaConf.to_container(cfg, resolve=True)

    def count(node):
        return sum(count(v) if isinstance(v, dict) else 1 for v in node.values())

    assert len(flat) == count(leaves)


def test_too_long_values_point_to_an_artifact_and_nothing_is_cut():
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 1)
    long_key = "k" * (MAX_ENTITY_KEY_LENGTH + 1)
    params, overflow = split_params({"ok": "1", "big": long_value, long_key: "2"})
    assert params["ok"] == "1"
    assert OVERFLOW_ARTIFACT in params["big"] and str(len(long_value)) in params["big"]
    assert long_key not in params
    assert overflow == {"big": long_value, long_key: "2"}


def test_store_location(tmp_path):
    launch = tmp_path / "launch"
    assert resolve_tracking_uri(None, "outputs/mlflow.db", launch) == (
        f"sqlite:///{launch / 'outputs' / 'mlflow.db'}"
    )
    assert resolve_tracking_uri(None, "/abs/m.db", launch) == "sqlite:////abs/m.db"
    # a relative sqlite URI is relative to the launch directory, not to a job's cwd
    assert resolve_tracking_uri("sqlite:///x/m.db", "unused", launch) == (
        f"sqlite:///{launch / 'x' / 'm.db'}"
    )
    assert resolve_tracking_uri("http://127.0.0.1:5000", "unused", launch) == (
        "http://127.0.0.1:5000"
    )
    assert artifact_location(f"sqlite:///{launch}/outputs/mlflow.db", "ffsd/a b") == (
        (launch / "outputs" / "mlartifacts" / "ffsd" / "a_b").as_uri()
    )
    assert artifact_location("http://127.0.0.1:5000", "ffsd/x") is None


def test_logger_config_values_are_checked():
    with pytest.raises(ConfigError, match=r"logger\.on_missing_run='maybe'.*error, new"):
        MLflowTracker(on_missing_run="maybe")
    for bad in (-1, "soon", True, float("inf")):
        with pytest.raises(ConfigError, match=r"logger\.flush_timeout_s=.*non-negative number"):
            MLflowTracker(flush_timeout_s=bad)
    with pytest.raises(ConfigError, match=r"logger\.connect_timeout_s=0 must be a positive"):
        MLflowTracker(connect_timeout_s=0)
    assert instantiate(make_cfg().logger).flush_timeout_s == 60
    assert MLflowTracker(flush_timeout_s=0).flush_timeout_s == 0


def test_one_http_call_is_bounded_unless_the_environment_says_otherwise(monkeypatch):
    for key in HTTP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    bound_http_calls("sqlite:///x.db")
    assert not [k for k in HTTP_SETTINGS if k in os.environ]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    bound_http_calls("http://127.0.0.1:5000")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's choice is kept
    retries = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    assert os.environ[retries] == HTTP_SETTINGS[retries]


# -- the background sender -------------------------------------------------------------------
def test_the_sender_keeps_order_retries_and_never_blocks_the_caller():
    hung, sent, failures = threading.Event(), [], {"left": 2}

    def record(i: int) -> Record:
        def send() -> None:
            if i == 0:
                hung.wait(10)  # a store that does not answer
            if i == 1 and failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("refused")
            sent.append(i)

        return Record(f"record {i}", send)

    sender = Sender("test://store", retry_first_s=0.01, retry_max_s=0.05)
    began = time.monotonic()
    for i in range(5):
        sender.submit(record(i))
    assert time.monotonic() - began < 0.5, "submitting waited on the store"
    assert [r.what for r in sender.pending()] == [f"record {i}" for i in range(5)]
    hung.set()
    assert sender.close(10) == []
    assert sent == [0, 1, 2, 3, 4] and sender.failures == 2 and sender.sent == 5


def test_closing_waits_at_most_its_timeout_and_returns_what_is_left(caplog):
    def down() -> None:
        raise ConnectionError("connection refused")

    sender = Sender("test://down", retry_first_s=5.0, retry_max_s=30.0)
    with caplog.at_level(logging.WARNING, logger="ffsd"):
        for step in (2, 3):
            sender.submit(Record(f"metrics of step {step}", down, kind="metrics", step=step))
        began = time.monotonic()
        left = sender.close(0.5)
        elapsed = time.monotonic() - began
    assert 0.4 < elapsed < 3, elapsed
    assert [r.step for r in left] == [2, 3] and sender.failures >= 1
    assert caplog.text.count("failed to record") == 1, "one warning per outage"
    assert "test://down" in caplog.text and "retried in the background" in caplog.text


def test_a_refused_record_is_set_aside_and_the_others_go_on():
    sent = []

    def refuse() -> None:
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad value"})

    def transient() -> None:
        raise MlflowException("connection refused")  # INTERNAL_ERROR: worth another try

    assert refused(_raised(refuse)) and not refused(_raised(transient))
    sender = Sender("test://store", retry_first_s=0.01, permanent=refused)
    sender.submit(Record("bad", refuse))
    sender.submit(Record("good", lambda: sent.append("good")))
    assert [r.what for r in sender.close(5)] == ["bad"] and sent == ["good"]


def _raised(fn) -> Exception:
    try:
        fn()
    except Exception as err:
        return err
    raise AssertionError("did not raise")


def test_what_was_not_sent_is_named():
    def nothing() -> None:
        pass

    left = [
        *(Record(f"metrics of step {e}", nothing, kind="metrics", step=e) for e in (2, 3, 4, 6)),
        Record("the summary metrics", nothing, kind="summary", step=0),
        Record("artifact /r/metrics.jsonl", nothing, kind="artifact"),
        Record("artifact /r/summary.json", nothing, kind="artifact"),
        Record("the run's status (FINISHED)", nothing, kind="status"),
    ]
    assert describe_records(left) == (
        "the metrics of epochs 2-4, 6, the summary metrics, 2 artifacts (metrics.jsonl, "
        "summary.json), the run's status (FINISHED)"
    )
    assert describe_records(left[:1]) == "the metrics of epoch 2"


# -- the experiment is created once, even when jobs race for it ------------------------------
def test_concurrent_jobs_share_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store's tables exist before the race
    ids, errors = [], []

    def job():
        try:
            ids.append(get_or_create_experiment(MlflowClient(uri), "ffsd/race", None))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(ids) == 6
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert names.count("ffsd/race") == 1


def test_losing_the_creation_race_reads_the_winners_experiment():
    class Client:
        tracking_uri = "fake"
        calls = 0

        def get_experiment_by_name(self, name):
            self.calls += 1
            if self.calls == 1:
                return None  # not there yet ...

            class Exp:
                experiment_id, lifecycle_stage = "7", "active"

            return Exp()

        def create_experiment(self, name, artifact_location=None):
            # ... but another job created it meanwhile
            raise MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS)

    assert get_or_create_experiment(Client(), "ffsd/x", None) == "7"


# -- store failures --------------------------------------------------------------------------
def test_unreachable_server_stops_before_any_training(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        *TINY,
        f"trainer.output_dir={run_dir}",
        "trainer.epochs=1",
        "logger.tracking_uri=http://127.0.0.1:9",  # nothing listens on the discard port
        "logger.connect_timeout_s=2",
    )
    with pytest.raises(TrackingError) as err:
        train_task.run(cfg)
    message = str(err.value)
    assert "http://127.0.0.1:9" in message and "logger=none" in message
    assert "Nothing was trained" in message
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_store_failures_mid_run_never_stop_training_nor_lose_metrics(
    tmp_path, mlflow_store, monkeypatch, caplog
):
    """Epoch 1's metrics fail once (the sender retries them); then the store stays down to the
    end: training finishes anyway, within flush_timeout_s, naming what it could not send; the
    same command, relaunched, sends it."""
    run_dir = tmp_path / "run"
    real = MlflowClient.log_batch
    calls = {"metrics": 0, "down": True}

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            calls["metrics"] += 1
            if calls["down"] and calls["metrics"] != 2:
                raise MlflowException("connection reset by peer (simulated)")
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    overrides = (*TINY, f"trainer.output_dir={run_dir}", "trainer.epochs=2")
    with caplog.at_level(logging.WARNING, logger="ffsd"):
        train_task.run(make_cfg(*overrides, "logger.flush_timeout_s=2"))
    assert "retried in the background" in caplog.text
    assert (
        "not sent: the metrics of epoch 2, the summary metrics, 3 artifacts (metrics.jsonl, "
        "summary.json, model_leader_best.pth), the run's status (FINISHED)"
    ) in caplog.text
    assert "relaunch the same command" in caplog.text
    client, runs = runs_of(mlflow_store, run_dir)
    assert len(runs) == 1 and steps(client, runs[0].info.run_id) == [1]
    assert "best/leader/top1" not in runs[0].data.metrics
    assert runs[0].info.status == "RUNNING", "its status was queued behind the metrics"
    calls["down"] = False  # the store is back: the same command resumes (nothing to train)
    train_task.run(make_cfg(*overrides))
    client, runs = runs_of(mlflow_store, run_dir)
    assert len(runs) == 1, "the relaunch continued the run"
    run = runs[0]
    assert steps(client, run.info.run_id) == [1, 2]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "train/leader/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        r["train/leader/loss"] for r in records
    ]
    assert run.data.metrics["best/leader/top1"] == max(r["test/leader/top1"] for r in records)
    assert run.info.status == "FINISHED"


def test_resume_with_a_run_missing_from_the_store_is_a_clear_error(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = (*TINY, f"trainer.output_dir={run_dir}")
    train_task.run(make_cfg(*overrides, "trainer.epochs=1"))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with pytest.raises(TrackingError, match="on_missing_run=new") as err:
        train_task.run(make_cfg(*overrides, "trainer.epochs=2"))
    assert other in str(err.value)
    # opting in starts a new run that holds every epoch, the first one from metrics.jsonl
    train_task.run(make_cfg(*overrides, "trainer.epochs=2", "logger.on_missing_run=new"))
    client, runs = runs_of(other, run_dir)
    assert len(runs) == 1 and steps(client, runs[0].info.run_id) == [1, 2]


class _Recording(Tracker):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def start(self, cfg, run_dir, resume_run_id=None, parent=None) -> None:
        self.calls.append(("start", parent))

    def finish(self, status: str = "FINISHED") -> None:
        self.calls.append(("finish", status))


@pytest.mark.parametrize(
    ("raised", "status"),
    [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")],
)
def test_a_tracked_block_closes_its_run_with_how_the_block_ended(raised, status):
    tracker, parent = _Recording(), TrackedRun(uri=None, experiment=None, run_id="p")
    with (
        contextlib.suppress(KeyboardInterrupt, ValueError),
        tracker.run(OmegaConf.create({}), Path("unused"), parent) as inside,
    ):
        assert inside is tracker and tracker.calls == [("start", parent)]
        if raised is not None:
            raise raised
    assert tracker.calls == [("start", parent), ("finish", status)]
