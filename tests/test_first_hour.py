"""What a researcher meets in their first hour (issue 14): tracking, config, eval, export, report.

Run names, per-run paths as tags, a sweep's own experiment; unknown ``+keys`` and ``--help``;
``task=eval checkpoint=PATH`` alone (the model and dataset from the file), logged into the
checkpoint's run, files beside it; ``task=export`` on the base install; the console's labels and
last lines; the report's curves and effective values. One tiny tracked run (module fixture)
serves every check that needs a trained run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from matplotlib.collections import PolyCollection
from mlflow import MlflowClient
from omegaconf import open_dict

from ffsd.config import ConfigError
from ffsd.report import plots
from ffsd.report import summary as report
from ffsd.tasks import train as train_task
from ffsd.tasks.checkpoint_config import apply_checkpoint_settings
from ffsd.tasks.hydra_callbacks import RefuseUnknownKeys
from ffsd.tasks.overrides import explain_refused_keys, missing_key_errors
from ffsd.tracking.mlflow_tracker import EXPERIMENT_KIND, MLflowTracker, default_run_name
from ffsd.tracking.provenance import HydraJob
from ffsd.training.engine import epoch_line, progress_postfix

from .checkpoints import run_task, write_release
from .conftest import CONF, ROOT, TINY_RUN, make_cfg, run_launch

TINY = (*TINY_RUN, "trainer.epochs=1")


def hydra_cfg(*overrides: str, multirun: bool = False):
    """The config with its ``hydra`` node, as a Hydra callback or a job sees it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    if multirun:
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
    return cfg


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_store):
    """A tiny FFSD run tracked in MLflow (the tests' store), and what it printed."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    out = io.StringIO()
    # (the autouse store fixture is per test: a module fixture names the store itself)
    cfg = make_cfg(*TINY, f"trainer.output_dir={run_dir}", f"logger.tracking_uri={mlflow_store}")
    with contextlib.redirect_stdout(out):
        train_task.run(cfg)
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    return run_dir, out.getvalue(), record


# -- tracking ----------------------------------------------------------------------------------
def test_single_runs_get_unique_names_drawn_from_no_seeded_generator(tmp_path, mlflow_store):
    names = []
    for i in range(2):
        cfg = make_cfg(*TINY, f"trainer.output_dir={tmp_path / str(i)}")
        tracker = instantiate(cfg.logger)
        (tmp_path / str(i)).mkdir()
        random.seed(0)  # as seed_everything does before the tracker starts
        tracker.start(cfg, tmp_path / str(i))
        tracker.finish()
        names.append(MlflowClient(mlflow_store).get_run(tracker.run_id).info.run_name)
    assert names[0] != names[1] and all(n.startswith("resnet20-synthetic ") for n in names)
    job = HydraJob(
        launch_dir=tmp_path,
        overrides=["experiment=quickstart", "distill.lambda_fusion=1", "hydra.run.dir=x/y"],
        preset="quickstart",
        choices={"task": "train"},
    )
    name = default_run_name(make_cfg("experiment=quickstart"), job, skip=set())
    assert name.startswith("quickstart distill.lambda_fusion=1 ") and "hydra" not in name


def test_per_run_paths_are_tags_not_params(tmp_path, mlflow_store):
    out = tmp_path / "out"
    cfg = make_cfg("task=export", f"trainer.output_dir={out}")  # task.output_dir follows it
    tracker = instantiate(cfg.logger)
    out.mkdir()
    tracker.start(cfg, out)
    tracker.finish()
    run = MlflowClient(mlflow_store).get_run(tracker.run_id)
    assert "trainer.output_dir" not in run.data.params
    assert "task.output_dir" not in run.data.params
    assert run.data.tags["trainer.output_dir"] == run.data.tags["task.output_dir"] == str(out)
    assert run.data.params["trainer.epochs"] == "299"  # the settings stay params
    with pytest.raises(
        ConfigError, match=r"logger\.path_keys='trainer\.output_dir' must be a list"
    ):
        MLflowTracker(path_keys="trainer.output_dir")


def test_a_sweep_without_an_experiment_name_is_its_own_experiment(tmp_path, mlflow_store):
    sweep_dir = Path.cwd() / "multirun" / "2025-06-01" / "12-00-00"
    swept = hydra_cfg(*TINY, f"hydra.sweep.dir={sweep_dir}", multirun=True)
    single = hydra_cfg(*TINY)
    names = []
    for cfg in (swept, single):
        tracker = instantiate(cfg.logger)
        tracker.prepare(cfg)
        names.append(tracker.experiment)
    assert names == [
        "ffsd/resnet20-synthetic/multirun/2025-06-01/12-00-00",
        "ffsd/resnet20-synthetic",
    ]
    exp = MlflowClient(mlflow_store).get_experiment_by_name(names[0])
    # MLflow 3's UI then opens it on its training runs, not on its GenAI view
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_readme_shows_training_runs_in_mlflow_3_and_how_experiments_are_named():
    text = (ROOT / "README.md").read_text()
    assert "Model training" in text and "workflowType=machine_learning" in text
    assert "ffsd/quickstart/multirun/" in text  # a sweep's experiment name
    assert "Columns" in text and "`distill.lambda_fusion`" in text and "best/leader/top1" in text


# -- configuration -----------------------------------------------------------------------------
def test_a_key_not_in_the_config_is_refused_with_the_closest_keys():
    refuse = RefuseUnknownKeys()
    with pytest.raises(SystemExit, match=r"\+trainer\.epoch=3.*Did you mean trainer\.epochs\?"):
        refuse.on_run_start(hydra_cfg("+trainer.epoch=3"))
    with pytest.raises(SystemExit, match=r"optim\.networks\.lrr.*optim\.networks\.lr"):
        refuse.on_multirun_start(hydra_cfg("+optim.networks.lrr=0.1", multirun=True))
    # what groups and registries legitimately add, and Hydra's force-add, pass
    refuse.on_multirun_start(hydra_cfg("+sweep=seeds", multirun=True))
    refuse.on_run_start(hydra_cfg("+model@extra=resnet20"))  # a group option at a package
    refuse.on_run_start(hydra_cfg("task=export", "+task.exporters.mine._target_=x.Mine"))
    refuse.on_run_start(hydra_cfg("++trainer.epoch=3"))
    with pytest.raises(
        SystemExit, match=r"task\.exporters\.onnx\.opst.*task\.exporters\.onnx\.opset"
    ):
        refuse.on_run_start(hydra_cfg("task=export", "+task.exporters.onnx.opst=17"))


def test_launch_refuses_an_unknown_plus_key_before_making_any_directory(tmp_path):
    res = run_launch("+trainer.epoch=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Did you mean trainer.epochs?" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_plain_key_not_in_the_config_gets_the_closest_keys_after_hydras_refusal(tmp_path):
    cfg = make_cfg("experiment=quickstart")
    given = ["trainer.epoch=3", "trainer.epochs=2", "model=resnet20", "+x.y=1", "hydra.run.dir=d"]
    errors = missing_key_errors(cfg, [*given, "distill.lambda_fusin=1,10", "~trainer.seed"])
    assert len(errors) == 2  # keys the tree has, groups, +, ~ and Hydra's own pass
    assert errors[0].startswith("trainer.epoch=3: trainer.epoch is not a key")
    assert "Did you mean trainer.epochs?" in errors[0]
    assert "Did you mean distill.lambda_fusion" in errors[1]
    # The tree is the one the command's group choices compose (a swept group: its first option).
    sweep = ["-m", "experiment=quickstart", "distill.lambda_fusion=10"]
    (hint,) = explain_refused_keys([*sweep, "distill=dml,ffsd"])  # DML has no lambda_fusion
    assert hint.startswith("distill.lambda_fusion=10: distill.lambda_fusion is not a key")
    assert explain_refused_keys([*sweep, "distill=ffsd,dml"]) == []
    assert explain_refused_keys(["trainer.epochs=abc"]) == []  # a key that exists: not this
    assert explain_refused_keys(["model=resnet2", "trainer.epoch=3"]) == []  # no tree to ask

    res = run_launch("trainer.epoch=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Could not override 'trainer.epoch'" in res.stderr  # Hydra's own message first
    assert "Error: trainer.epoch=3: trainer.epoch is not a key" in res.stderr
    assert "Did you mean trainer.epochs?" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_shows_usage_the_commands_used_most_and_every_group(tmp_path):
    res = run_launch("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    assert "Usage:" in text and "-m +sweep=NAME" in text
    for command in (
        "python launch.py experiment=quickstart",
        "python launch.py experiment=cifar100_resnet56",
        "python launch.py -m +sweep=lambda_grid",
        "python launch.py task=eval checkpoint=PATH",
        "python launch.py task=export checkpoint=PATH",
    ):
        assert command in text, command
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for group in ("dataset", "model", "distill", "trainer", "logger", "task", "sweep"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        line = lines[group]
        assert ": " in line and ", ".join(options) in line, line  # a description, the options
    assert "== Config ==" not in text  # not Hydra's default dump of the whole config


# -- evaluate and export -----------------------------------------------------------------------
def test_the_run_prints_where_its_networks_are_and_the_eval_command(tracked):
    run_dir, printed, _ = tracked
    ck = (run_dir / "checkpoints").resolve()
    assert f"best leader: {ck / 'model_leader_best.pth'} (epoch " in printed
    assert f"{ck / 'last.pt'}" in printed
    command = next(x for x in printed.splitlines() if x.startswith("evaluate: "))
    assert command.endswith(f"task=eval checkpoint={ck / 'model_leader_best.pth'}")


def test_the_printed_eval_command_alone_evaluates_into_the_tracked_run(tracked, mlflow_store):
    """No model=, no dataset=: both from the run's config beside the file; the result lands in
    a child run of the training run, and its files beside the checkpoint."""
    run_dir, printed, record = tracked
    command = next(x for x in printed.splitlines() if x.startswith("evaluate: "))
    args = shlex.split(command.removeprefix("evaluate: "))[2:]  # after "python launch.py"
    env = os.environ | {"MLFLOW_TRACKING_URI": "sqlite:///elsewhere.db"}  # the run's store wins
    res = run_launch(*args, "trainer.progress=false", cwd=run_dir.parent, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    said = res.stdout + res.stderr
    assert "model=resnet20: from the run's config" in said
    assert "dataset=synthetic: from the run's config" in said
    folder = run_dir / "checkpoints" / "eval_model_leader_best"
    report_ = json.loads((folder / "eval.json").read_text())
    best = json.loads((run_dir / "summary.json").read_text())["metrics"]["leader/top1"]["best"]
    assert report_["metrics"]["top1"] == pytest.approx(best, abs=1e-9)
    assert report_["dataset"] == "synthetic" and (folder / "per_class.csv").is_file()
    client = MlflowClient(record["tracking_uri"])
    (child,) = client.search_runs(
        [client.get_experiment_by_name(record["experiment"]).experiment_id],
        f"tags.`mlflow.parentRunId` = '{record['run_id']}'",
    )
    assert child.data.metrics["eval/top1"] == report_["metrics"]["top1"]
    assert child.data.tags["ffsd.task"] == "eval" and report_["tracked_run"] == record["run_id"]


def test_a_run_state_without_the_config_beside_it_carries_its_own(tracked, tmp_path, caplog):
    run_dir, _, _ = tracked
    shutil.copy(run_dir / "checkpoints" / "last.pt", tmp_path / "last.pt")  # no config.yaml here
    cfg = make_cfg("task=eval")  # the defaults: resnet32 on cifar100
    with caplog.at_level(logging.INFO, logger="ffsd"):
        apply_checkpoint_settings(cfg, tmp_path / "last.pt", "auto", [], explicit=set())
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.train_size) == (
        "resnet20",
        "synthetic",
        16,
    )
    assert f"model=resnet20: from the run's config {tmp_path / 'last.pt'}" in caplog.text


def test_a_release_file_names_its_architecture_and_its_classes_the_dataset(tmp_path, caplog):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, "wrn16_2", num_classes=100)
    blob = torch.load(path, weights_only=True)
    torch.save(blob | {"cfg": "wideresnet1602"}, path)  # the release's name for WRN-16-2
    cfg = make_cfg("task=eval", "model=resnet20", "dataset=digits")
    with caplog.at_level(logging.INFO, logger="ffsd"):
        ckpt = apply_checkpoint_settings(
            cfg, path, "auto", list(cfg.task.infer_datasets), explicit=set()
        )
    assert (cfg.model.name, cfg.dataset.name) == ("wrn16_2", "cifar100")
    assert ckpt is not None and ckpt.network == "leader"
    assert "model=wrn16_2: from the file's cfg 'wideresnet1602' = wrn16_2" in caplog.text
    assert "dataset=cifar100: from 100 classes in the file" in caplog.text
    # an explicit choice wins and is not touched (the weights are then checked against it)
    cfg = make_cfg("task=eval", "model=resnet20", "dataset=digits")
    apply_checkpoint_settings(cfg, path, "auto", ["cifar100"], explicit={"model", "dataset"})
    assert (cfg.model.name, cfg.dataset.name) == ("resnet20", "digits")


def test_export_with_default_options_needs_only_the_base_install(tmp_path, monkeypatch):
    for module in ("onnx", "onnxruntime", "onnxscript"):  # the optional extra, absent
        monkeypatch.setitem(sys.modules, module, None)
    write_release(tmp_path / "modelleader_best.pth")
    cfg = make_cfg(
        "task=export",
        f"checkpoint={tmp_path / 'modelleader_best.pth'}",
        "model=resnet20",
        "dataset=synthetic",
        f"trainer.output_dir={tmp_path / 'out'}",
        "task.batch_size=2",
    )
    assert run_task(cfg) <= 1e-4
    done = json.loads((tmp_path / "out" / "export.json").read_text())["formats"]
    assert set(done) == {"torchscript", "exported_program"}


# -- console and reports -----------------------------------------------------------------------
def test_console_labels_train_and_test_metrics_by_their_names_units_after_numbers(tracked):
    shown = progress_postfix(
        {"leader/loss": 0.5123, "leader/acc": 40.06}, ["leader/loss", "leader/acc"], 812.4
    )
    assert shown == "train/leader/loss 0.512, train/leader/acc 40.1 %, 812 img/s"

    class Method:
        progress_terms = ("leader/loss", "leader/acc")
        primary_metric = "leader/top1"
        epoch_metrics = ("fusion/top1", "students_mean/top1")

    record = {
        "epoch": 3,
        "train/leader/loss": 0.41,
        "test/leader/top1": 95.3125,
        "test/fusion/top1": 90.0,
        "test/students_mean/top1": 88.5,
        "throughput/train_img_s": 812.4,
        "time/epoch_s": 12.34,
    }
    assert epoch_line(record, Method(), 8) == (
        "epoch 3/8 | train/leader/loss 0.41 | test/leader/top1 95.31 % | test/fusion/top1 90 % "
        "| test/students_mean/top1 88.5 % | 812 img/s | 12.3 s"
    )
    # one name per metric: the report's column says students_mean, as the metric does
    assert ("students_mean best", "best/students_mean/top1") in report.COLUMNS
    assert "test/students_mean/top1" in (tracked[0] / "metrics.jsonl").read_text()


def test_curves_show_every_configuration_with_a_band_integer_epochs_legend_outside():
    seeds = [[(1.0, 50.0), (2.0, 60.0), (3.0, 70.0)], [(1.0, 54.0), (2.0, 62.0), (3.0, 71.0)]]
    fig = plots.curves_figure(
        {"distill.lambda_fusion=1": seeds, "distill.lambda_fusion=10": seeds[:1]}, "t", "top-1"
    )
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2  # one line per configuration
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # a band for 2 seeds
    assert all(float(t).is_integer() for t in ax.get_xticks())
    fig.canvas.draw()
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1  # right of the plotted area, hiding no curve


def test_an_experiment_report_shows_what_runs_ran_with_not_a_dash(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ffsd/quickstart", artifact_location=tmp_path.as_uri())
    for overrides, fusion in (([], "10.0"), (["distill.lambda_fusion=1"], "1.0")):
        for seed in (0, 1):
            run = client.create_run(
                exp,
                tags={
                    "ffsd.overrides": json.dumps([*overrides, f"trainer.seed={seed}"]),
                    "ffsd.choices": json.dumps({"distill": "ffsd", "model": "resnet20"}),
                },
            )
            client.log_param(run.info.run_id, "distill.lambda_fusion", fusion)
            for epoch in (1, 2):
                client.log_metric(run.info.run_id, "test/leader/top1", 50.0 + epoch, step=epoch)
            client.log_metric(run.info.run_id, "best/leader/top1", 52.0 + seed)
            client.set_terminated(run.info.run_id)
    eval_child = client.create_run(exp, tags={"ffsd.task": "eval", "ffsd.overrides": "[]"})
    client.set_terminated(eval_child.info.run_id)
    out = tmp_path / "report"
    assert report.main(["ffsd/quickstart", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = [x for x in md.splitlines() if x.startswith("| `") and "leader best" not in x]
    assert [r.split("|")[1].strip() for r in rows] == ["`1`", "`10.0`"]  # not "–"
    assert all(r.rstrip(" |").endswith("2") for r in rows)  # two seeds each, no eval run
    assert "](curves.png)" in md and "](networks.png)" in md
    assert (out / "curves.png").is_file() and (out / "networks.png").is_file()
