"""Files that are not what they claim: a dataset file that would run code, CIFAR files that are not
the official ones, checkpoints with flipped bytes or non-finite weights, and the run's own files
(permissions, atomic replacement, what a kill mid-write leaves)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ffsd.data import CIFARData, DataNotFoundError, cifar_files
from ffsd.data.build import build_data
from ffsd.tasks import train as train_task
from ffsd.tasks.weights import read_network_checkpoint
from ffsd.tracking.mlflow_tracker import RUN_RECORD, MLflowTracker
from ffsd.training import checkpoint as ckpt
from ffsd.training.checkpoint import CheckpointError, atomic_save, atomic_write_text, safe_load

from .checkpoints import run_task, write_release
from .conftest import TINY_RUN, make_cfg, write_tiny_cifar100

RECORDING = "logger._target_=tests.checkpoints.RecordingTracker"


# -- dataset files ------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker`` (a directory): proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def plant(root: Path, marker: Path) -> Path:
    """A tiny CIFAR-100 whose ``train`` file runs code when unpickled."""
    write_tiny_cifar100(root, n_train=4, n_test=4)
    train = root / "cifar-100-python" / "train"
    entry = pickle.loads(train.read_bytes())
    entry["batch_label"] = Payload(marker)
    train.write_bytes(pickle.dumps(entry))
    return train


def cifar_cfg(root: Path, *overrides: str):
    return make_cfg(
        "dataset=cifar100", f"dataset.root={root}", "trainer.output_dir=/unused", *overrides
    )


def read_split(data, split: str) -> DataNotFoundError | None:
    """Read ``data``'s split; the error it stops with, if any."""
    try:
        getattr(data, split)
    except DataNotFoundError as err:
        return err
    return None


def test_a_planted_cifar_file_runs_no_code_and_is_refused_by_name(tmp_path):
    marker = tmp_path / "code-ran"
    train = plant(tmp_path / "data", marker)
    data = build_data(cifar_cfg(tmp_path / "data", "dataset.verify_checksums=false"))
    err = read_split(data, "train_set")
    assert not marker.exists(), "reading the dataset ran the file's code"
    assert err is not None and str(train) in str(err) and "posix.mkdir" in str(err)


def test_cifar_files_are_checked_against_the_official_checksums_by_default(tmp_path):
    marker = tmp_path / "code-ran"
    train = plant(tmp_path / "data", marker)
    cfg = cifar_cfg(tmp_path / "data")
    assert cfg.dataset.verify_checksums is True
    err = read_split(build_data(cfg), "train_set")
    assert not marker.exists(), "reading the dataset ran the file's code"
    msg = str(err)
    assert str(train) in msg and "16019d7e3df5f24257cddd939b257f8d" in msg  # the official md5
    assert "dataset.verify_checksums=false" in msg


def test_files_with_the_official_checksums_are_read(tmp_path, monkeypatch):
    write_tiny_cifar100(tmp_path, n_train=6, n_test=3)
    folder = tmp_path / "cifar-100-python"
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setitem(cifar_files.OFFICIAL_MD5, "cifar100", sums)
    data = build_data(cifar_cfg(tmp_path))
    assert len(data.train_set) == 6 and len(data.test_set) == 3
    assert cifar_files.OFFICIAL_MD5["cifar10"]["data_batch_1"] == "c99cafc152244af753f735de768cd75f"


def write_py2_style_cifar10(root: Path, n: int = 5) -> np.ndarray:
    """CIFAR-10 as the official archive holds it: protocol-2 pickles, numpy's old globals."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data if first is None else first
        entry = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": data,
            "filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "label_names": [f"class_{i}" for i in range(10)],
        "num_vis": 3072,
        "num_cases_per_batch": n,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return first


def test_the_safe_reader_reads_the_official_layouts(tmp_path):
    first = write_py2_style_cifar10(tmp_path / "c10")
    data = build_data(
        make_cfg(
            "dataset=cifar10",
            f"dataset.root={tmp_path / 'c10'}",
            "dataset.verify_checksums=false",
            "trainer.output_dir=/unused",
        )
    )
    assert isinstance(data, CIFARData) and len(data.train_set) == 25 and len(data.test_set) == 5
    assert data.train_set.classes == [f"class_{i}" for i in range(10)]
    np.testing.assert_array_equal(
        data.train_set.data[0], first[0].reshape(3, 32, 32).transpose(1, 2, 0)
    )


def test_a_cifar_file_of_another_shape_is_refused_by_name(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=4, n_test=4)
    test = tmp_path / "cifar-100-python" / "test"
    entry = pickle.loads(test.read_bytes())
    entry["fine_labels"] = entry["fine_labels"][:2]  # fewer labels than images
    test.write_bytes(pickle.dumps(entry))
    data = build_data(cifar_cfg(tmp_path, "dataset.verify_checksums=false"))
    with pytest.raises(DataNotFoundError, match=rf"{test}.*4 images but 2 labels"):
        data.test_set  # noqa: B018


# -- checkpoints --------------------------------------------------------------------------------
def flip_tensor_bytes(path: Path, count: int = 64) -> str:
    """Invert ``count`` bytes inside the largest tensor record of a torch.save archive."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start : start + count] = bytes(b ^ 0xFF for b in raw[start : start + count])
    path.write_bytes(bytes(raw))
    return info.filename


def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_file_and_the_record(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path)
    record = flip_tensor_bytes(path)
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(path)  # what task=eval and task=export read
    msg = str(err.value)
    assert str(path) in msg and record in msg and "checksum" in msg


def tiny_run(run_dir: Path, *overrides: str):
    cfg = make_cfg(
        *TINY_RUN, "trainer.device=cpu", RECORDING, f"trainer.output_dir={run_dir}", *overrides
    )
    return train_task.run(cfg)


def test_resume_refuses_a_damaged_last_pt_and_one_with_non_finite_weights(tmp_path):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, "trainer.epochs=1")
    last = run_dir / "checkpoints" / "last.pt"
    good = last.read_bytes()
    flip_tensor_bytes(last)
    with pytest.raises(CheckpointError, match=rf"{last}.*checksum"):
        tiny_run(run_dir, "trainer.epochs=2")
    last.write_bytes(good)
    state = safe_load(last)
    nets = state["method"]["modules"]["nets"]
    key = next(k for k, v in nets.items() if v.is_floating_point() and v.dim() == 4)
    nets[key][0, 0, 0, 0] = float("nan")
    atomic_save(state, last)  # a well-formed file whose weights are not finite
    with pytest.raises(CheckpointError, match=rf"{last}.*{key}.*NaN or infinite"):
        tiny_run(run_dir, "trainer.epochs=2")


def test_eval_reports_non_finite_weights(tmp_path, caplog):
    path = tmp_path / "model0_best.pth"
    write_release(path, leader=False)
    blob = torch.load(path, weights_only=True)
    blob["weight"]["fc.weight"][0, 0] = float("inf")
    torch.save(blob, path)
    ckpt_read = read_network_checkpoint(path)
    assert "fc.weight" in " ".join(ckpt_read.notes)  # printed by describe()
    assert ckpt_read.inferred()["nonfinite_weights"] == ["fc.weight"]  # eval.json's "inferred"
    cfg = make_cfg(
        "task=eval",
        f"checkpoint={path}",
        "dataset=synthetic",
        "dataset.test_size=8",
        "model=resnet20",
        "trainer.device=cpu",
        "trainer.progress=false",
        f"trainer.output_dir={tmp_path / 'eval'}",
        "logger=none",
    )
    with caplog.at_level("WARNING", logger="ffsd"):
        run_task(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("fc.weight" in m and "not finite" in m for m in warned), warned
    (report,) = tmp_path.rglob("eval.json")
    assert json.loads(report.read_text())["inferred"]["nonfinite_weights"] == ["fc.weight"]


# -- the run's own files ------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_save({"w": torch.zeros(2)}, tmp_path / "last.pt")
        atomic_write_text("{}", tmp_path / "summary.json")
    finally:
        os.umask(old)
    for name in ("last.pt", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_text_files_reach_the_disk_before_they_replace_the_old_one(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    atomic_write_text("{}\n", tmp_path / "summary.json")
    assert events == ["fsync", "replace", "fsync"]  # the data, the rename, the directory entry


def test_mlflow_run_json_is_replaced_whole(tmp_path):
    tracker = MLflowTracker()
    tracker.run_dir, tracker.uri, tracker.experiment = tmp_path, "sqlite:///x.db", "e"
    tracker.run_id = "old"
    tracker._record_location()
    with open(tmp_path / RUN_RECORD) as reader:  # a reader that opened the file before
        tracker.run_id = "new"
        tracker._record_location()
        assert json.loads(reader.read())["run_id"] == "old"  # still the whole old file
    assert json.loads((tmp_path / RUN_RECORD).read_text())["run_id"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_RECORD]


def test_temporary_files_a_killed_write_left_are_removed_at_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    left = [
        run_dir / "checkpoints" / ".last.pt.a8x2k1.tmp",
        run_dir / "checkpoints" / ".model_leader_best.pth.q0w9e8.tmp",
        run_dir / ".metrics.jsonl.zz11yy.tmp",
    ]
    kept = run_dir / "checkpoints" / "notes.tmp"  # not a name the writers use
    for p in [*left, kept]:
        p.write_bytes(b"partial")
    tiny_run(run_dir, "trainer.epochs=1")
    assert [p for p in left if p.exists()] == [] and kept.exists()
    assert ckpt.TMP_PATTERN.match(left[0].name)
