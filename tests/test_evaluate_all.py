"""``task.network=all``: the whole method of a run state, rebuilt from its own config; the files
it cannot read are refused naming the file and what to give instead. (Every method's run state
is evaluated this way against its own epoch line in tests/test_methods_e2e.py.)"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import ffsd
from ffsd.config import ConfigError
from ffsd.tasks.evaluate_all import evaluate_run_state, format_all
from ffsd.tasks.weights import read_network_checkpoint
from ffsd.training.acceleration import set_numerics
from ffsd.training.checkpoint import STATE_FORMAT, CheckpointError, atomic_save

from .checkpoints import write_release
from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused")


def run_state(path, cfg, method, **extra):
    state = {"format": STATE_FORMAT, "epoch": 3, "method": method.state_dict()}
    state["config"] = OmegaConf.to_yaml(cfg)
    atomic_save(state | extra, path)
    return path


def test_every_network_of_a_run_state_is_evaluated_by_its_own_method(tmp_path):
    cfg = make_cfg(*BASE, "distill=one")
    torch.manual_seed(0)
    trained = ffsd.build_method(cfg, 10, "cpu")
    # in the layout and precision the run trains and evaluates in (task=train's set_numerics)
    applied = set_numerics(
        trained,
        channels_last=cfg.trainer.channels_last,
        nhwc_batch_norm=cfg.trainer.nhwc_batch_norm,
        precision=cfg.trainer.precision,
    )
    assert applied[0] == "channels_last (auto on cpu)"
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 16, 16, generator=g), torch.randint(10, (8,), generator=g))
    trained.train_step(*batch, 1)
    path = run_state(tmp_path / "last.pt", cfg, trained)
    # evaluated with another method's config in effect: the file's own config decides
    metrics, target, epoch = evaluate_run_state(
        make_cfg(*BASE, "distill=dml"), path, [batch], 10, torch.device("cpu")
    )
    assert (target, epoch) == ("ffsd.methods.ONE", 3)
    assert metrics == trained.evaluate([batch])
    assert {"teacher/top1", "branch2/top1", "ensemble/top1", "deploy/top1"} <= set(metrics)
    text = format_all("title", metrics)
    assert text.splitlines()[3].split()[0] == "deploy"  # the deployed network first


def test_a_one_network_file_or_a_run_state_without_config_is_refused(tmp_path):
    release = tmp_path / "model_leader_best.pth"
    write_release(release)
    with pytest.raises(ConfigError, match=r"is not one \(it holds one network's weights\)"):
        evaluate_run_state(make_cfg(*BASE), release, [], 10, torch.device("cpu"))
    cfg = make_cfg(*BASE, "distill=one")
    old = tmp_path / "old.pt"
    run_state(old, cfg, ffsd.build_method(cfg, 10, "cpu"))
    blob = torch.load(old, weights_only=True)
    del blob["config"]
    atomic_save(blob, old)
    with pytest.raises(CheckpointError, match="without the config it was trained with"):
        evaluate_run_state(make_cfg(*BASE), old, [], 10, torch.device("cpu"))
    with pytest.raises(ConfigError, match="is read one network at a time here"):
        read_network_checkpoint(release, "all")


def test_a_class_count_the_run_state_does_not_have_is_refused(tmp_path):
    cfg = make_cfg(*BASE, "distill=cl_ilr")
    path = run_state(tmp_path / "last.pt", cfg, ffsd.build_method(cfg, 10, "cpu"))
    with pytest.raises(CheckpointError, match=r"does not fit its own method .* with 100 classes"):
        evaluate_run_state(make_cfg(*BASE), path, [], 100, torch.device("cpu"))
