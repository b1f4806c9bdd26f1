"""End-to-end training runs on tiny data: files, checkpoints, resume, summary, failure paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ffsd.models as M
from ffsd.tasks import train as train_task
from ffsd.training.checkpoint import CheckpointError, safe_load
from ffsd.training.runtime import has_glibc_malloc

from .conftest import ROOT, make_cfg, write_tiny_cifar100

TINY = (
    "dataset=synthetic",
    "dataset.train_size=48",
    "dataset.test_size=20",
    "model=resnet20",
    "trainer.batch_size=16",
    "trainer.test_batch_size=16",
    "trainer.progress=false",
    "schedule.milestones=[1]",
)


def run(tmp, *overrides):
    cfg = make_cfg(*TINY, f"trainer.output_dir={tmp}", *overrides)
    best = train_task.run(cfg)
    return cfg, best


def final_params(run_dir):
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    return state["method"]["modules"]["nets"]


def test_training_run_writes_every_promised_file(tmp_path, capsys):
    _, best = run(tmp_path, "trainer.epochs=2")
    ck = tmp_path / "checkpoints"
    assert (ck / "last.pt").is_file() and (ck / "model_leader_best.pth").is_file()
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    for key in (
        "train/leader/loss",
        "train/student1/diversity",
        "train/decoder1/loss",
        "test/leader/top1",
        "test/ensemble/top1",
        "test/oracle/top1",
        "lr/networks",
        "time/epoch_s",
        "throughput/train_img_s",
    ):
        assert key in history[-1], key
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["metric"] == "leader/top1" and summary["best"]["value"] == best
    assert summary["metrics"]["leader/top1"]["final"] == history[-1]["test/leader/top1"]
    out = capsys.readouterr().out
    assert "leader/top1" in out and "best" in out and "final" in out


def test_best_leader_is_in_the_release_format_and_loads(tmp_path):
    _, best = run(tmp_path, "trainer.epochs=2")
    blob = safe_load(tmp_path / "checkpoints" / "model_leader_best.pth")
    assert set(blob) == {"weight", "epoch", "cfg", "index"}
    assert blob["index"] == "leader" and blob["cfg"] == "resnet20"
    leader = M.resnet20(num_classes=10, leader=True, num_students=2)
    leader.load_state_dict(blob["weight"])  # strict: every name matches, none renamed
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[blob["epoch"] - 1]["test/leader/top1"] == best


def test_resume_continues_to_identical_parameters(tmp_path):
    run(tmp_path / "straight", "trainer.epochs=3")
    run(tmp_path / "split", "trainer.epochs=2")
    run(tmp_path / "split", "trainer.epochs=3")  # resume=auto picks up last.pt
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_finished_run_relaunched_does_no_work(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    before = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    run(tmp_path, "trainer.epochs=1")
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_resume_never_refuses_to_overwrite(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    with pytest.raises(CheckpointError, match=r"trainer\.resume=never"):
        run(tmp_path, "trainer.epochs=2", "trainer.resume=never")


def test_corrupt_checkpoint_is_a_clear_error_never_a_fresh_start(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    last = tmp_path / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated copy
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, "trainer.epochs=2")
    assert str(last) in str(err.value) and "truncated" in str(err.value)
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(last)):
        run(tmp_path, "trainer.epochs=2")


def test_mismatched_checkpoint_names_what_differs(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, "trainer.epochs=2", "distill.num_students=3")
    assert "num_students: checkpoint 2, this run 3" in str(err.value)


def test_release_file_is_not_a_run_state(tmp_path):
    run(tmp_path, "trainer.epochs=1")
    with pytest.raises(CheckpointError, match="released-format"):
        run(
            tmp_path / "other",
            "trainer.epochs=2",
            f"trainer.resume={tmp_path / 'checkpoints' / 'model_leader_best.pth'}",
        )


def test_eval_every_and_last_epoch_always_evaluated(tmp_path):
    run(tmp_path, "trainer.epochs=3", "trainer.eval_every=2")
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["test/leader/top1" in h for h in history] == [False, True, True]


def test_three_students_ten_classes_end_to_end(tmp_path):
    _, best = run(tmp_path, "trainer.epochs=1", "distill.num_students=3")
    assert 0.0 <= best <= 100.0
    assert "test/student2/top1" in (tmp_path / "metrics.jsonl").read_text()


def test_launch_trains_on_tiny_cifar100_through_the_real_loader(tmp_path):
    data = write_tiny_cifar100(tmp_path / "data", n_train=32, n_test=16)
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "model=resnet20",
            "dataset=cifar100",
            f"dataset.root={data}",
            "dataset.verify_checksums=false",  # tiny files, not the official ones
            "dataset.loader.num_workers=1",
            "trainer.epochs=1",
            "schedule.milestones=[1]",
            "trainer.batch_size=16",
            "trainer.progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "leader/top1" in res.stdout
    if has_glibc_malloc():
        assert "host malloc: mmap_threshold_mb=1024, trim_threshold_mb=1024" in res.stdout
    assert (run_dir / "checkpoints" / "model_leader_best.pth").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
    """README's first command: two ResNet-20 students and a leader on digits, CPU."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "experiment=quickstart",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["leader/top1"]["final"] >= 95.0
    assert summary["best"]["value"] >= 95.0
