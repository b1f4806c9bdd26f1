"""The config tree composes, defaults are the paper's, and bad values stop before any work."""

from __future__ import annotations

import subprocess

import pytest
from hydra.utils import instantiate

from ffsd.config import ConfigError, group_options
from ffsd.tasks.validation import validate

from .conftest import make_cfg, run_launch

PRESETS = group_options("experiment")


def test_default_config_is_the_papers_cifar100_resnet32():
    cfg = make_cfg("trainer.output_dir=/unused")
    assert cfg.dataset.name == "cifar100" and cfg.model.name == "resnet32"
    d = cfg.distill
    assert (d.num_students, d.temperature, d.lambda_div, d.lambda_sd, d.lambda_fusion) == (
        2,
        2.0,
        1e-5,
        1000.0,
        10.0,
    )
    assert d.lambda_student_sd == d.lambda_div  # spec, Quirks 1
    assert d.lambda_warmup_epochs == 5
    net, fusion, dec = cfg.optim.networks, cfg.optim.fusion, cfg.optim.decoders
    assert (net.lr, net.momentum, net.nesterov, net.weight_decay) == (0.1, 0.9, True, 1e-4)
    assert fusion.weight_decay == 1e-5
    assert dec._target_ == "torch.optim.Adam" and (dec.lr, dec.weight_decay) == (1e-3, 1e-4)
    assert list(cfg.schedule.milestones) == [150, 225] and cfg.schedule.gamma == 0.1
    assert cfg.trainer.epochs == 299 and cfg.trainer.batch_size == 128  # spec, Quirks 3
    validate(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_builds(preset):
    cfg = make_cfg(f"experiment={preset}", "trainer.output_dir=/unused")
    validate(cfg)
    schedule = instantiate(cfg.schedule)
    # End of the first epoch: full rate, or 1/W of it under a W-epoch warm-up.
    assert schedule.factor(0, progress=1.0) == pytest.approx(1.0 / max(1, schedule.warmup_epochs))


def test_presets_cover_every_paper_setting():
    for arch in (
        "resnet20",
        "resnet32",
        "resnet56",
        "wrn16_2",
        "wrn40_2",
        "densenet40",
        "googlenet",
    ):
        assert f"cifar100_{arch}" in PRESETS
    assert {"imagenet_resnet18", "imagenet_resnet34", "quickstart"} <= set(PRESETS)
    cfg = make_cfg("experiment=imagenet_resnet18", "trainer.output_dir=/unused")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.schedule.warmup_epochs) == (90, 256, 5)
    assert list(cfg.dataset.topk) == [1, 5]


def test_every_model_option_matches_its_class():
    for name in group_options("model"):
        cfg = make_cfg(f"model={name}", "trainer.output_dir=/unused")
        cls_size = instantiate(cfg.model.net, _partial_=True).func  # the factory function
        assert cfg.model.name == name == cls_size.__name__


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("distill.num_students=1", ["distill.num_students=1", ">= 2"]),
        ("distill.lambda_div=-1", ["distill.lambda_div=-1", ">= 0"]),
        ("distill.lambda_fusion=-0.5", ["distill.lambda_fusion=-0.5", ">= 0"]),
        ("distill.temperature=0", ["distill.temperature=0", "> 0"]),
        ("trainer.batch_size=0", ["trainer.batch_size=0", ">= 1"]),
        ("trainer.batch_size=abc", ["trainer.batch_size='abc'", "integer"]),
        ("trainer.device=tpu", ["trainer.device='tpu'", "auto, cpu, cuda"]),
        (
            "trainer.host_malloc.mmap_threshold_mb=4096",
            ["trainer.host_malloc.mmap_threshold_mb=4096", "<= 2047"],
        ),
        (
            "trainer.host_malloc.trim_threshold_mb=0",
            ["trainer.host_malloc.trim_threshold_mb=0", ">= 1"],
        ),
        ("dataset.topk=[1,200]", ["dataset.topk", "<= dataset.num_classes"]),
        (
            "model=resnet18",
            ["model=resnet18", "224x224", "dataset=cifar100", "32x32", "resnet32", "wrn40_2"],
        ),
    ],
)
def test_invalid_values_name_key_value_and_choices(override, fragments):
    cfg = make_cfg(override, "trainer.output_dir=/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_all_problems_reported_together():
    cfg = make_cfg("distill.num_students=1", "trainer.batch_size=0", "trainer.output_dir=/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "num_students" in str(err.value) and "batch_size" in str(err.value)


def _launch(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_launch(*args, cwd=cwd, timeout=120)


def test_launch_rejects_unknown_group_option_with_the_choices(tmp_path):
    res = _launch("model=resnet99", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode != 0
    assert "model/resnet99" in res.stderr and "resnet32" in res.stderr and "wrn40_2" in res.stderr


def test_launch_stops_on_bad_value_before_any_work(tmp_path):
    run = tmp_path / "run"
    res = _launch(
        "distill.num_students=1", "dataset=synthetic", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert res.returncode != 0
    assert "distill.num_students=1" in res.stderr
    assert not run.exists()  # not even the run directory Hydra made for it


def test_launch_reports_missing_cifar_clearly(tmp_path):
    res = _launch(
        f"dataset.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert res.returncode != 0
    err = res.stderr
    assert (
        "cifar-100-python" in err
        and str(tmp_path / "nowhere") in err
        and "dataset.download=true" in err
    )
    assert "urllib" not in err
    assert list(tmp_path.iterdir()) == []  # no run directory left behind
