"""Sweep definitions (sweeps/*.yaml, ``python launch.py -m +sweep=<name>``) list the right jobs.

Job lists come from Hydra's basic sweeper on the composed sweep config (what
``ffsd.tasks.hydra_callbacks`` does before a sweep starts); one sweep is launched for real through
``launch.py`` with a task that trains nothing, and its jobs must match.
"""

from __future__ import annotations

import itertools
import re
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ffsd.config import group_options
from ffsd.tasks.hydra_callbacks import sweep_job_overrides

from .conftest import CONF, ROOT, make_cfg, run_launch

SWEEPS = {
    "lambda_grid": {
        "distill.lambda_div": ["1e-6", "1e-5", "1e-4"],
        "distill.lambda_fusion": ["1", "10", "100"],
        "distill.lambda_sd": ["100", "1000", "10000"],
    },
    "seeds": {"trainer.seed": ["0", "1", "2"]},
    "paper_cifar100": {
        "experiment": [p for p in group_options("experiment") if p.startswith("cifar100_")],
        "trainer.seed": ["0", "1", "2"],
    },
    "num_students": {"distill.num_students": ["2", "3", "4"]},
    "methods": {
        "distill": ["ffsd", "independent", "dml", "kdcl", "one", "cl_ilr", "okddip", "pcl"],
        "trainer.seed": ["0", "1", "2"],
    },
}


def sweep_config(*fixed: str, swept: tuple[str, ...] = ()):
    """The config a multirun composes: without the sweep overrides, which it only records."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(fixed), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [*fixed, *swept]
    return cfg


def value(text: str) -> float | str:
    try:
        return float(text)  # Hydra writes 1e-6 back as 1e-06
    except ValueError:
        return text


def as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


def test_sweeps_folder_is_the_sweep_group():
    assert (ROOT / "sweeps").is_dir()
    assert sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")) == sorted(SWEEPS)
    assert group_options("sweep") == sorted(SWEEPS)
    assert len(SWEEPS["paper_cifar100"]["experiment"]) == 7  # every CIFAR architecture


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_lists_the_full_product_of_its_values(name):
    jobs = sweep_job_overrides(sweep_config(f"+sweep={name}"))
    grid = SWEEPS[name]
    expected = {
        tuple((k, value(v)) for k, v in zip(grid, values, strict=True))
        for values in itertools.product(*grid.values())
    }
    got = {tuple((k, value(as_dict(job)[k])) for k in grid) for job in jobs}
    assert len(jobs) == len(expected) and got == expected
    for job in jobs:
        assert as_dict(job)["+sweep"] == name


def test_each_job_composes_to_its_values():
    jobs = sweep_job_overrides(sweep_config("+sweep=lambda_grid"))
    for job in (jobs[0], jobs[-1]):
        cfg = make_cfg(*job, "trainer.output_dir=/unused")
        values = as_dict(job)
        assert cfg.distill.lambda_div == float(values["distill.lambda_div"])
        assert cfg.distill.lambda_student_sd == cfg.distill.lambda_div  # release quirk 1
        assert cfg.distill.lambda_fusion == float(values["distill.lambda_fusion"])
        assert cfg.distill.lambda_sd == float(values["distill.lambda_sd"])
        assert cfg.logger.experiment_name == "ffsd/lambda_grid"
    seen = set()
    for job in sweep_job_overrides(sweep_config("+sweep=paper_cifar100")):
        preset = as_dict(job)["experiment"]
        if preset in seen:
            continue
        seen.add(preset)
        cfg = make_cfg(*job, "trainer.output_dir=/unused")
        assert f"cifar100_{cfg.model.name}" == preset and cfg.dataset.name == "cifar100"
        assert cfg.trainer.epochs == 299  # the paper's setting (spec, Quirks 3)
        assert cfg.logger.experiment_name == "ffsd/paper_cifar100"


def test_each_method_job_trains_its_method_on_the_command_lines_setting():
    # A preset's `override /distill: ffsd` must not turn every method back into FFSD.
    jobs = sweep_job_overrides(sweep_config("+sweep=methods", "experiment=quickstart"))
    targets = {}
    for job in jobs:
        if as_dict(job)["trainer.seed"] != "0":
            continue
        cfg = make_cfg(*job, "trainer.output_dir=/unused")
        method = as_dict(job)["distill"]
        assert method in group_options("distill")
        assert cfg.dataset.name == "digits" and cfg.model.name == "resnet20"
        assert cfg.logger.experiment_name == "ffsd/methods"
        targets[method] = cfg.distill._target_
    assert list(targets) == SWEEPS["methods"]["distill"]
    assert len(set(targets.values())) == len(targets)
    assert targets["ffsd"] == "ffsd.methods.FFSD"


def launch(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_launch(*args, cwd=cwd, timeout=300)


def test_hydra_launches_exactly_the_listed_jobs_and_the_command_line_adjusts_them(tmp_path):
    # One swept key narrowed to two values, another added: 2 x 2 jobs. builtins.len as the
    # task: each job composes and runs, nothing is trained.
    fixed = ("+sweep=num_students", "task._target_=builtins.len", "logger=none")
    swept = ("distill.num_students=2,4", "trainer.seed=0,1")
    res = launch("-m", *fixed, *swept, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    launched = [sorted(o.split()) for _, o in re.findall(r"#(\d+) : (.*)", res.stdout + res.stderr)]
    listed = [sorted(j) for j in sweep_job_overrides(sweep_config(*fixed, swept=swept))]
    assert launched == listed
    assert sorted(
        (as_dict(j)["distill.num_students"], as_dict(j)["trainer.seed"]) for j in listed
    ) == [
        ("2", "0"),
        ("2", "1"),
        ("4", "0"),
        ("4", "1"),
    ]
    assert (tmp_path / "sweep" / "3").is_dir()


def test_the_method_sweep_launches_every_method_with_every_seed(tmp_path):
    fixed = ("+sweep=methods", "task._target_=builtins.len", "logger=none")
    res = launch("-m", *fixed, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    launched = [sorted(o.split()) for _, o in re.findall(r"#(\d+) : (.*)", res.stdout + res.stderr)]
    assert launched == [sorted(j) for j in sweep_job_overrides(sweep_config(*fixed))]
    pairs = sorted((as_dict(j)["distill"], as_dict(j)["trainer.seed"]) for j in launched)
    grid = SWEEPS["methods"]
    assert len(launched) == 24
    assert pairs == sorted(itertools.product(grid["distill"], grid["trainer.seed"]))


def test_a_sweep_without_multirun_stops_with_the_command_to_use(tmp_path):
    res = launch("+sweep=seeds", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode != 0
    assert "+sweep=seeds defines a sweep" in res.stderr and "-m +sweep=seeds" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unreachable_tracking_server_stops_the_sweep_before_any_job(tmp_path):
    res = launch(
        "-m",
        "+sweep=seeds",
        "dataset=synthetic",
        "logger.tracking_uri=http://127.0.0.1:9",
        "logger.connect_timeout_s=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "http://127.0.0.1:9 is not reachable" in res.stderr
    assert "No job was launched" in res.stderr
    assert not (tmp_path / "sweep" / "0").exists()
