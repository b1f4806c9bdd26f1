"""task=eval end to end: release files and this project's checkpoints, reports, failure paths."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from ffsd.config import ConfigError
from ffsd.tasks import train as train_task
from ffsd.training.checkpoint import CheckpointError

from .checkpoints import RecordingTracker, run_task, write_release
from .conftest import ROOT, make_cfg, write_tiny_cifar100

TINY_TRAIN = (
    "dataset=synthetic",
    "dataset.train_size=48",
    "dataset.test_size=20",
    "model=resnet20",
    "trainer.batch_size=16",
    "trainer.test_batch_size=16",
    "trainer.progress=false",
    "schedule.milestones=[1]",
)


def eval_cfg(tmp_path, checkpoint, *overrides):
    return make_cfg(
        "task=eval",
        f"checkpoint={checkpoint}",
        f"trainer.output_dir={tmp_path / 'eval'}",
        f"task.output_dir={tmp_path / 'eval'}",  # not beside the (shared) checkpoint
        "trainer.progress=false",
        "trainer.device=cpu",
        *overrides,
    )


def direct_metrics(net, cfg):
    """Top-1/top-5 and mean CE of ``net`` on the whole test set in one batch, independently."""
    data = instantiate(cfg.dataset, _convert_="all")
    xs = torch.stack([data.test_set[i][0] for i in range(len(data.test_set))])
    ys = torch.tensor([int(data.test_set[i][1]) for i in range(len(data.test_set))])
    with torch.no_grad():
        logits = net.eval()(xs).logits
    top5 = logits.topk(5, 1).indices
    return {
        "top1": (logits.argmax(1) == ys).double().mean().item() * 100,
        "top5": (top5 == ys[:, None]).any(1).double().mean().item() * 100,
        "ce": F.cross_entropy(logits, ys).item(),
        "labels": ys,
        "pred": logits.argmax(1),
    }


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_tiny_cifar100(tmp_path_factory.mktemp("data"), n_train=8, n_test=48)


def test_release_leader_evaluates_like_the_network_in_memory(tmp_path, cifar, capsys):
    path = tmp_path / "modelleader_best.pth"
    net = write_release(path, num_classes=100, num_students=3)
    cfg = eval_cfg(
        tmp_path,
        path,
        "model=resnet20",
        "dataset=cifar100",
        f"dataset.root={cifar}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.loader.num_workers=0",
        "task.batch_size=16",  # 3 batches
        "logger._target_=tests.checkpoints.RecordingTracker",
    )
    top1 = run_task(cfg)
    want = direct_metrics(net, cfg)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    m = report["metrics"]
    assert top1 == m["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert m["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert m["ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert m["images"] == 48 and m["images_per_s"] > 0 and m["model_images_per_s"] > 0
    assert report["inferred"] | {"checkpoint": None} == {
        "checkpoint": None,
        "kind": "release",
        "network": "leader",
        "leader": True,
        "num_students": 3,
        "num_classes": 100,
        "epoch": 7,
        "recorded_model": "resnet20",
    }
    # per_class.csv: every class, names from the dataset, counts matching the predictions
    with open(tmp_path / "eval" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and rows[3]["name"] == "class_3"
    labels, pred = want["labels"], want["pred"]
    for c in (int(labels[0]), int(labels[1])):
        assert int(rows[c]["images"]) == int((labels == c).sum())
        assert int(rows[c]["correct"]) == int(((labels == c) & (pred == c)).sum())
    assert sum(int(r["correct"]) for r in rows) == round(want["top1"] * 48 / 100)
    out = capsys.readouterr().out
    assert "top1 (%)" in out and "top5 (%)" in out and "mean loss (CE)" in out
    assert "images/s" in out and "Worst 10 of 100 classes" in out
    # the tracker got the metrics and both files
    calls = RecordingTracker.calls
    assert calls[0][0] == "start" and calls[-1] == ("finish", "FINISHED")
    summary = dict(calls)["log_summary"]
    assert summary["eval/top1"] == m["top1"] and summary["eval/ce"] == m["ce"]
    assert ("log_artifact", "eval.json") in calls and ("log_artifact", "per_class.csv") in calls


def test_release_student_evaluates_like_the_network_in_memory(tmp_path):
    path = tmp_path / "model1_best.pth"
    net = write_release(path, leader=False, index="1", num_classes=10, seed=3)
    cfg = eval_cfg(
        tmp_path,
        path,
        "model=resnet20",
        "dataset=synthetic",
        "dataset.test_size=40",
        "task.batch_size=16",
    )
    top1 = run_task(cfg)
    want = direct_metrics(net, cfg)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert top1 == pytest.approx(want["top1"], abs=1e-9)
    assert report["metrics"]["ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert report["inferred"]["network"] == "student1" and not report["inferred"]["leader"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_store):
    """A one-epoch tiny FFSD run: its last.pt, model_leader_best.pth and metrics."""
    run_dir = tmp_path_factory.mktemp("run")
    # The autouse store fixture is per test: a module fixture names the tests' store itself (its
    # evaluations log to the run's store), or it would write to ./outputs/mlflow.db.
    store = f"logger.tracking_uri={mlflow_store}"
    train_task.run(
        make_cfg(*TINY_TRAIN, f"trainer.output_dir={run_dir}", "trainer.epochs=1", store)
    )
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return run_dir, metrics


@pytest.mark.parametrize("network", ["auto", "leader", "student0", "student1"])
def test_run_state_networks_match_the_training_evaluation(tmp_path, trained, network):
    run_dir, metrics = trained
    cfg = eval_cfg(
        tmp_path,
        run_dir / "checkpoints" / "last.pt",
        *TINY_TRAIN,
        f"task.network={network}",
        "task.topk=[1]",
    )
    top1 = run_task(cfg)
    name = "leader" if network == "auto" else network
    assert top1 == pytest.approx(metrics[f"test/{name}/top1"], abs=1e-9)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["metrics"]["ce"] == pytest.approx(metrics[f"test/{name}/ce"], rel=1e-5)
    inferred = report["inferred"]
    assert inferred["kind"] == "run-state" and inferred["network"] == name
    assert inferred["num_students"] == 2 and inferred["epoch"] == 1
    assert inferred["leader"] == (name == "leader")


def test_best_leader_file_matches_the_best_epoch(tmp_path, trained):
    run_dir, metrics = trained
    cfg = eval_cfg(tmp_path, run_dir / "checkpoints" / "model_leader_best.pth", *TINY_TRAIN)
    assert run_task(cfg) == pytest.approx(metrics["test/leader/top1"], abs=1e-9)


def test_run_state_without_that_student(tmp_path, trained):
    run_dir, _ = trained
    last = run_dir / "checkpoints" / "last.pt"
    cfg = eval_cfg(tmp_path, last, *TINY_TRAIN, "task.network=student5")
    with pytest.raises(CheckpointError, match=f"{last} has no network 'student5'.*student1"):
        run_task(cfg)


def test_missing_checkpoint_setting_is_a_config_error(tmp_path):
    cfg = make_cfg("task=eval", f"trainer.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"checkpoint=None: task=eval needs"):
        run_task(cfg)
    assert not (tmp_path / "eval.json").exists()


def test_topk_larger_than_the_classes_is_refused_before_loading(tmp_path):
    cfg = eval_cfg(
        tmp_path, tmp_path / "nothing.pth", "dataset=digits", "model=resnet20", "task.topk=[1,20]"
    )
    with pytest.raises(ConfigError, match=r"task\.topk=\[1, 20\].*<= 10"):
        run_task(cfg)


def test_launch_reports_a_mismatched_checkpoint_without_a_traceback(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, "resnet56", num_classes=10)
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "task=eval",
            f"checkpoint={path}",
            "model=resnet20",
            "dataset=digits",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("Error executing job with overrides")
    assert lines[1] == f"CheckpointError: {path} does not fit model=resnet20 " + (
        "(a leader for 2 students with 10 classes, dataset=digits):"
    )
    assert "layer1.3.conv1.weight" in res.stderr
    assert "this looks like a resnet56 checkpoint: try model=resnet56" in res.stderr
