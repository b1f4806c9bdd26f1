"""protocol=<ref>: each reference's own protocol, as the baselines spec's table gives it."""

from __future__ import annotations

import math

import pytest
from hydra.utils import instantiate

from ffsd.config import ConfigError, group_options
from ffsd.tasks.validation import validate

from .conftest import make_cfg

# (epochs, lr, nesterov, wd, schedule, milestones or None for cosine, batch, pad, mean, std):
# shared/baselines-spec.md, "Reference protocols".
TABLE = {
    "ffsd": (299, 0.1, True, 1e-4, "MultiStep", [150, 225], 128, "reflect",
             [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "one": (300, 0.1, False, 1e-4, "MultiStep", [151, 225], 128, "zero",
            [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "okddip": (300, 0.1, True, 5e-4, "MultiStep", [150, 225], 128, "zero",
               [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "mcl_okd": (300, 0.1, True, 5e-4, "Cosine", None, 128, "zero",
                [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
    "pcl": (300, 0.1, True, 5e-4, "MultiStep", [150, 225], 128, "zero",
            [0.5071, 0.4866, 0.4409], [0.2675, 0.2565, 0.2761]),
    "kdcl": (240, 0.05, False, 5e-4, "MultiStep", [150, 180, 210], 64, "zero",
             [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
}  # fmt: skip


def test_every_preset_is_in_the_table():
    assert set(group_options("protocol")) == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_sets_the_references_protocol(name):
    base = ["experiment=cifar100_resnet32"] if name == "ffsd" else []
    cfg = make_cfg(*base, f"protocol={name}", "trainer.output_dir=/unused")
    epochs, lr, nesterov, wd, schedule, milestones, batch, pad, mean, std = TABLE[name]
    net = cfg.optim.networks
    assert cfg.protocol.name == name and cfg.trainer.epochs == epochs
    assert (net.lr, net.momentum, net.nesterov, net.weight_decay) == (lr, 0.9, nesterov, wd)
    assert cfg.schedule._target_ == f"ffsd.schedules.{schedule}"
    if milestones is None:  # lr = 0.05 (1 + cos(pi e0 / 300)): half a cosine over the run
        assert cfg.schedule.epochs == epochs and cfg.schedule.min_factor == 0.0
    else:
        assert list(cfg.schedule.milestones) == milestones and cfg.schedule.gamma == 0.1
    assert cfg.trainer.batch_size == batch and cfg.dataset.pad_mode == pad
    assert list(cfg.dataset.mean) == mean and list(cfg.dataset.std) == std
    validate(cfg)


def test_protocol_comes_after_an_experiment_preset():
    cfg = make_cfg("experiment=cifar100_resnet32", "protocol=okddip", "distill=dml")
    assert cfg.trainer.epochs == 300 and cfg.optim.networks.weight_decay == 5e-4
    assert cfg.model.name == "resnet32" and cfg.distill._target_ == "ffsd.methods.DML"


def test_cosine_schedule_of_mcl_okd_is_its_formula():
    cfg = make_cfg("protocol=mcl_okd")
    schedule = instantiate(cfg.schedule)
    for e0 in (0, 1, 150, 299):  # lr = 0.05 (1 + cos(pi e0 / 300)) = 0.1 * factor
        assert 0.1 * schedule.factor(e0) == pytest.approx(0.05 * (1 + math.cos(math.pi * e0 / 300)))


def test_a_reference_protocol_needs_cifar():
    with pytest.raises(ConfigError, match="protocol=okddip reproduces a CIFAR reference protocol"):
        validate(make_cfg("experiment=quickstart", "protocol=okddip", "trainer.output_dir=/x"))
    validate(make_cfg("experiment=quickstart", "protocol=ffsd", "trainer.output_dir=/x"))
