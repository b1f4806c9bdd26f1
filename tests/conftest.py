"""Shared fixtures: composing configs from conf/ without launching Hydra, and tiny data on disk."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent

# Two batches per epoch, 8 test images: the smallest run that exercises every hook.
TINY_RUN = (
    "dataset=synthetic",
    "dataset.train_size=16",
    "dataset.test_size=8",
    "model=resnet20",
    "trainer.batch_size=8",
    "trainer.test_batch_size=8",
    "trainer.progress=false",
    # A milestone must lie within the run (validation); 1 fits every run, and decays in longer ones.
    "schedule.milestones=[1]",
)


def run_launch(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python launch.py *args`` in a fresh process, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2-core CI machines: keep PyTorch from oversubscribing.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _tracking_store(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # logger=mlflow is the default: keep every test's runs out of the repository's outputs/.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)


def make_cfg(*overrides: str) -> DictConfig:
    """Compose conf/config.yaml with overrides, as launch.py would (without a run directory)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str) -> DictConfig:
        return make_cfg(
            f"trainer.output_dir={tmp_path / 'run'}", "trainer.progress=false", *overrides
        )

    return factory


def write_tiny_cifar100(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A CIFAR-100 in the official python-pickle layout: root/cifar-100-python/{train,test,meta}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return root
