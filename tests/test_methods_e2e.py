"""Every comparison method end to end, as FFSD is tested: through ``launch.py``, in a 2-process
torchrun run, preempted mid-epoch and resumed, through ``task=eval``/``task=export`` (one network,
and ``task.network=all`` for every network, ensemble and teacher), in the method sweep with its
report, and refused at the command line. The K-network methods (independent, DML, KDCL) and the
multi-branch ones (ONE, CL-ILR, OKDDip, PCL) go through the same tests: what differs, the names of
the networks and of the deployed one, is read from :data:`NETWORKS`.

Every run is tiny (64 or 16 images, 2 epochs). The runs of different methods are independent
processes, so each fixture starts every method's process at once: on 2 cores that roughly
halves the wall time (a process's start-up, importing torch, is a large part of each).
The resumed runs train on a tiny CIFAR-100 (its crop and flip augmentation draws from the random
streams the resume must restore; KDCL draws one augmentation per network and view).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

import ffsd
import ffsd.models as M
from ffsd.report import summary as report
from ffsd.tasks import train as train_task
from ffsd.training.checkpoint import CheckpointError, safe_load

from .checkpoints import run_task
from .conftest import ROOT, TINY_RUN, make_cfg, run_launch, write_tiny_cifar100
from .test_distributed import TINY as DIST_TINY
from .test_distributed import finish, start_torchrun
from .test_resume import assert_same_run, wait_for_batch

#: Each method's evaluated networks (``OnlineMethod.networks``), the deployed one first.
NETWORKS = {
    "independent": ("net0", "net1"),
    "dml": ("net0", "net1"),
    "kdcl": ("net0", "net1"),
    "one": ("branch0", "branch1", "branch2"),
    "cl_ilr": ("branch0", "branch1", "branch2", "branch3"),
    "okddip": ("leader", "peer0", "peer1", "peer2"),
    "pcl": ("ema_peer0", "ema_peer1", "ema_peer2", "peer0", "peer1", "peer2"),
}
METHODS = tuple(NETWORKS)
#: The metrics every method logs beside each network's: its ensemble, and its teacher if any.
EXTRA = {"one": ("teacher",), "pcl": ("teacher", "ema_ensemble"), "okddip": ("ensemble_all",)}


def deploy_of(method: str) -> str:
    return NETWORKS[method][0]


def other_of(method: str) -> str:
    """A network of the run state that is not the deployed one."""
    return NETWORKS[method][1]


#: Batches of 4 per epoch in the single-process runs (64 training images).
BATCHES = 16
#: task=export's own tolerance (conf/task/export.yaml): atol + rtol * |eager logit|.
ATOL, RTOL = 1e-4, 1e-5

T = TypeVar("T")


def concurrently(*jobs: Callable[[], T]) -> list[T]:
    """Run each job in its own thread (they wait on subprocesses); results in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_tiny_cifar100(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)


def tiny(cifar: Path, method: str, pipeline: str = "tensor") -> tuple[str, ...]:
    """16 batches of 4 per epoch, 2 epochs, 16 test images in one batch, on 1 CPU thread."""
    return (
        f"distill={method}",
        "dataset=cifar100",
        f"dataset.root={cifar}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        f"dataset.pipeline={pipeline}",
        "dataset.loader.num_workers=0",  # exact mid-epoch replay (ffsd.training.engine)
        "model=resnet20",
        "trainer.batch_size=4",
        "trainer.test_batch_size=16",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "trainer.threads=1",
        "schedule.milestones=[1]",  # the rate decays in epoch 2, where the resume starts
        "logger=none",
    )


def train_inprocess(run_dir: Path, *overrides: str) -> None:
    train_task.run(make_cfg(*overrides, f"trainer.output_dir={run_dir}", "trainer.progress=false"))


def start_launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """tests/test_resume.py's start_launch with these overrides instead of its synthetic data."""
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *overrides,
        "trainer.progress=true",
        "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


# -- 1. one run through launch.py ---------------------------------------------------------------
@pytest.fixture(scope="module")
def launched(tmp_path_factory, cifar) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One uninterrupted run of each method through launch.py (also the resume tests' reference)."""
    root = tmp_path_factory.mktemp("launched")

    def launch(method: str):
        run_dir = root / method
        res = run_launch(
            *tiny(cifar, method),
            "trainer.progress=false",
            f"hydra.run.dir={run_dir}",
            cwd=root,
        )
        return run_dir, res

    return dict(zip(METHODS, concurrently(*(partial(launch, m) for m in METHODS))))


def release_name(network: str) -> str:
    return f"model_{network}_best.pth"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_launch_trains_and_keeps_the_deploy_network(launched, method):
    run_dir, res = launched[method]
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary_metric"] == "deploy/top1" == summary["best"]["metric"]
    assert summary["epochs"] == 2
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["lr/networks"] < history[0]["lr/networks"]  # milestone 1
    deploy = deploy_of(method)
    for r in history:
        for name in (*NETWORKS[method], "ensemble", "deploy", *EXTRA.get(method, ())):
            assert f"test/{name}/top1" in r, name
        assert r["test/deploy/top1"] == r[f"test/{deploy}/top1"]  # distill.deploy=0
    best = max(r["test/deploy/top1"] for r in history)
    assert summary["best"]["value"] == best == summary["metrics"]["deploy/top1"]["best"]
    # the best deploy network in the release's format, named by the method's network
    release = safe_load(run_dir / "checkpoints" / f"model_{deploy}_best.pth")
    assert release["index"] == deploy and release["cfg"] == "resnet20"
    assert release["epoch"] == summary["best"]["epoch"]
    M.resnet20(num_classes=100).load_state_dict(release["weight"])  # the plain backbone's names
    assert [p.name for p in (run_dir / "checkpoints").glob("model_*")] == [release_name(deploy)]
    # the run state lists its networks for task=eval/export
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["partial"] is None
    assert sorted(state["method"]["networks"]) == sorted(NETWORKS[method])
    assert state["method"]["deploy"] == deploy
    assert "Test accuracy (%) over 2 epochs; best deploy/top1" in res.stdout


# -- 2. two processes through torchrun ----------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-process gloo run of each method (tests/test_distributed.py's tiny synthetic data)."""
    tmp = tmp_path_factory.mktemp("ddp")
    procs = {m: start_torchrun(tmp, m, f"distill={m}", "logger=none") for m in METHODS}
    for m, proc in procs.items():
        finish(proc, tmp, m)
    return {m: tmp / m for m in METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_ranks_end_with_identical_networks(ddp_runs, method):
    run = ddp_runs[method]
    ranks = [torch.load(run / f"rank{r}_state.pt", weights_only=True) for r in (0, 1)]
    last = safe_load(run / "checkpoints" / "last.pt")
    assert last["fingerprint"]["world_size"] == 2
    modules = last["method"]["modules"]
    assert set(ranks[0]) == set(ranks[1]) == set(modules)
    for name, saved in modules.items():  # parameters and BatchNorm buffers, bit for bit
        assert set(ranks[0][name]) == set(ranks[1][name]) == set(saved)
        for k in saved:
            torch.testing.assert_close(ranks[0][name][k], ranks[1][name][k], rtol=0, atol=0)
            torch.testing.assert_close(ranks[0][name][k], saved[k], rtol=0, atol=0, msg=k)
    # every network trained: its classifier moved away from this seed's initialisation
    torch.manual_seed(0)
    fresh = ffsd.build_method(make_cfg(*DIST_TINY, f"distill={method}"), 10, "cpu").state_dict()
    for network, where in last["method"]["networks"].items():
        module, _, prefix = where.partition(".")
        key = f"{prefix}fc.weight"
        moved = fresh["modules"][module][key] != modules[module][key]
        assert bool(moved.any()), (network, key)
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and "test/deploy/top1" in history[-1]


# -- 3. preempted mid-epoch, resumed, equal to the uninterrupted run ----------------------------
#: (method, dataset.pipeline): every method on the tensor pipeline; KDCL's K views also through
#: the DataLoader path (MultiView, drawn from the global RNG the checkpoint restores).
RESUMED = [(m, "tensor") for m in METHODS] + [("kdcl", "dataloader")]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, cifar) -> dict[tuple[str, str], tuple[Path, str, str, int]]:
    """Each case sent the preemption signal (USR2) at batch >= 2 of epoch 2, all at once."""
    root = tmp_path_factory.mktemp("preempted")

    def preempt(method: str, pipeline: str):
        run_dir = root / f"{method}-{pipeline}"
        run_dir.mkdir()
        proc = start_launch(run_dir, *tiny(cifar, method, pipeline))
        wait_for_batch(proc, epoch=2, batch=2)
        proc.send_signal(signal.SIGUSR2)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return run_dir, out.decode(), err.decode(), proc.returncode

    results = concurrently(*(partial(preempt, m, p) for m, p in RESUMED))
    return dict(zip(RESUMED, results))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "pipeline"), RESUMED)
def test_preempted_mid_epoch_then_resumed_equals_the_uninterrupted_run(
    method, pipeline, preempted, launched, cifar, tmp_path, caplog
):
    run_dir, out, err, code = preempted[method, pipeline]
    assert code == -signal.SIGUSR2, err[-3000:]
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    partial_ = state["partial"]
    assert state["epoch"] == 1 and partial_["epoch"] == 2
    assert 2 <= partial_["batches_done"] < BATCHES and partial_["batches"] == BATCHES
    assert partial_["ranks"][0]["count"] == 4 * partial_["batches_done"]
    assert "inside epoch 2" in out
    assert not (run_dir / "summary.json").exists()

    with caplog.at_level("INFO", logger="ffsd"):
        train_inprocess(run_dir, *tiny(cifar, method, pipeline))  # trainer.resume=auto
    done = partial_["batches_done"]
    assert f"inside epoch 2, after batch {done} of {BATCHES}" in caplog.text
    if pipeline == "tensor":
        straight = launched[method][0]
    else:
        straight = tmp_path / "straight"
        train_inprocess(straight, *tiny(cifar, method, pipeline))
    assert_same_run(straight, run_dir)  # parameters, optimizer state, metrics.jsonl, summary


# -- 4. task=eval and task=export of a run's networks -------------------------------------------
def task_cfg(cifar: Path, out: Path, task: str, checkpoint: Path, *overrides: str):
    return make_cfg(
        *tiny(cifar, "ffsd"),  # the training method is not read: the file says what it holds
        f"task={task}",
        f"checkpoint={checkpoint}",
        f"trainer.output_dir={out}",
        f"task.output_dir={out}",
        "trainer.progress=false",
        *overrides,
    )


def network_from_state(weights: dict[str, torch.Tensor], prefix: str = "") -> torch.nn.Module:
    """A resnet20 for CIFAR-100 holding the weights under ``prefix``, built here independently."""
    net = M.resnet20(num_classes=100)
    net.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_eval_equals_the_runs_own_evaluation(launched, cifar, tmp_path, method):
    run_dir, _ = launched[method]
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_epoch = json.loads((run_dir / "summary.json").read_text())["best"]["epoch"]
    deploy, other = deploy_of(method), other_of(method)
    last = run_dir / "checkpoints" / "last.pt"
    cases = (
        # (file, task.network, network read, epoch whose record it must equal, kind)
        (run_dir / "checkpoints" / release_name(deploy), "auto", deploy, best_epoch, "release"),
        (last, other, other, 2, "run-state"),
        (last, "auto", deploy, 2, "run-state"),  # the deploy one
    )
    for i, (path, network, name, epoch, kind) in enumerate(cases):
        out = tmp_path / f"eval{i}"
        top1 = run_task(task_cfg(cifar, out, "eval", path, f"task.network={network}"))
        logged = history[epoch - 1]
        assert top1 == pytest.approx(logged[f"test/{name}/top1"], abs=1e-9), (path, network)
        got = json.loads((out / "eval.json").read_text())
        assert got["metrics"]["top5"] == pytest.approx(logged[f"test/{name}/top5"], abs=1e-9)
        assert got["metrics"]["ce"] == pytest.approx(logged[f"test/{name}/ce"], rel=1e-5)
        assert got["metrics"]["images"] == 16
        inferred = got["inferred"]
        assert (inferred["kind"], inferred["network"], inferred["epoch"]) == (kind, name, epoch)
        assert inferred["leader"] is False and inferred["num_classes"] == 100
    # every network, ensemble and teacher of the run state, as the run's last epoch logged them
    out = tmp_path / "all"
    top1 = run_task(task_cfg(cifar, out, "eval", last, "task.network=all"))
    got = json.loads((out / "eval_all.json").read_text())
    assert got["epoch"] == 2 and top1 == got["metrics"]["deploy/top1"]
    logged = {k[5:]: v for k, v in history[-1].items() if k.startswith("test/")}
    assert set(got["metrics"]) == set(logged)
    for k, v in logged.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("method", METHODS)
def test_export_reproduces_the_network(launched, cifar, tmp_path, method):
    run_dir, _ = launched[method]
    deploy, other = deploy_of(method), other_of(method)
    best = run_dir / "checkpoints" / release_name(deploy)
    last = run_dir / "checkpoints" / "last.pt"
    module, _, prefix = safe_load(last)["method"]["networks"][other].partition(".")
    # The exporters see a plain backbone whatever the method; ONNX (~10 s an export) once.
    formats = ["torchscript", "onnx"] if method == "dml" else ["torchscript"]
    cases = (
        (best, "auto", deploy, ["torchscript"], network_from_state(safe_load(best)["weight"])),
        (
            last,
            other,
            other,
            formats,
            network_from_state(safe_load(last)["method"]["modules"][module], prefix),
        ),
    )
    x = torch.randn(3, 3, 32, 32)  # a batch size the export's own check never used
    for i, (path, network, name, fmts, net) in enumerate(cases):
        out = tmp_path / f"export{i}"
        worst = run_task(
            task_cfg(
                cifar,
                out,
                "export",
                path,
                f"task.network={network}",
                f"task.formats=[{','.join(fmts)}]",
                "task.batch_size=2",
            )
        )
        rep = json.loads((out / "export.json").read_text())
        assert rep["network"] == name and set(rep["formats"]) == set(fmts)
        assert worst == max(r["max_abs_diff"] for r in rep["formats"].values())
        assert all(r["within_tolerance"] for r in rep["formats"].values())
        assert rep["parameters"] == M.count_parameters(net)
        with torch.no_grad():
            want = net(x).logits
            module = torch.jit.load(str(out / f"resnet20_{name}.torchscript.pt"))
            # the file holds exactly the network's weights (under the LogitsOnly wrapper's net.)
            saved = {k.removeprefix("net."): v for k, v in module.state_dict().items()}
            assert saved.keys() == net.state_dict().keys()
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())
            torch.testing.assert_close(module(x), want, rtol=RTOL, atol=ATOL)
        if "onnx" in fmts:
            import onnxruntime as ort

            session = ort.InferenceSession(
                str(out / f"resnet20_{name}.onnx"), providers=["CPUExecutionProvider"]
            )
            got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_network_the_file_does_not_hold_is_refused_with_the_ones_it_holds(
    launched, cifar, tmp_path, method
):
    run_dir, _ = launched[method]
    last = run_dir / "checkpoints" / "last.pt"
    deploy, other = deploy_of(method), other_of(method)
    holds = ", ".join(safe_load(last)["method"]["networks"])
    for task in ("eval", "export"):
        for network in ("student0", "net5"):  # FFSD's student; a network no method here has
            cfg = task_cfg(cifar, tmp_path / task, task, last, f"task.network={network}")
            with pytest.raises(CheckpointError) as err:
                run_task(cfg)
            assert str(err.value) == (
                f"{last} has no network {network!r} (task.network={network}); it holds: "
                f"{holds} (the deployed one: {deploy})"
            )
    best = run_dir / "checkpoints" / release_name(deploy)
    cfg = task_cfg(cifar, tmp_path / "eval", "eval", best, f"task.network={other}")
    with pytest.raises(
        CheckpointError, match=rf"holds one network, the {deploy}, but task\.network={other}"
    ):
        run_task(cfg)
    assert not (tmp_path / "eval" / "eval.json").exists()
    assert not (tmp_path / "export" / "export.json").exists()


@pytest.mark.slow
def test_launch_exits_1_naming_the_networks_a_run_state_holds(launched, cifar, tmp_path):
    # The message of every method and task is checked in-process above; here the exit status.
    cases = (("dml", "eval", "leader"), ("kdcl", "export", "net5"))

    def launch(method: str, task: str, network: str):
        last = launched[method][0] / "checkpoints" / "last.pt"
        run_dir = tmp_path / f"{method}-{task}"
        res = run_launch(
            f"task={task}",
            f"checkpoint={last}",
            f"task.network={network}",
            "model=resnet20",
            "dataset=cifar100",
            f"dataset.root={cifar}",
            "dataset.verify_checksums=false",  # tiny files, not the official ones
            "trainer.device=cpu",
            "logger=none",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
            timeout=120,
        )
        return last, run_dir, res

    for (_, task, network), (last, run_dir, res) in zip(
        cases, concurrently(*(partial(launch, *c) for c in cases))
    ):
        assert res.returncode == 1, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        assert (
            f"CheckpointError: {last} has no network {network!r} (task.network={network}); "
            "it holds: net0, net1 (the deployed one: net0)"
        ) in res.stderr
        assert not (run_dir / f"{task}.json").exists()


# -- 5. the method sweep and its report ---------------------------------------------------------
def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


@pytest.mark.slow
def test_method_sweep_report_equals_the_logged_metrics_and_summaries(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = tmp_path / "sweep"
    res = run_launch(
        "-m",
        "+sweep=methods",
        "trainer.seed=0",
        *TINY_RUN,
        "trainer.epochs=2",
        "trainer.device=cpu",
        "trainer.threads=1",
        f"logger.tracking_uri={uri}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        method = dict(o.split("=", 1) for o in overrides)["distill"]
        record = json.loads((job / "mlflow_run.json").read_text())
        assert record["tracking_uri"] == uri and record["experiment"] == "ffsd/methods"
        jobs[method] = (record["run_id"], json.loads((job / "summary.json").read_text()))
    assert sorted(jobs) == sorted(["ffsd", *METHODS])

    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0  # python -m ffsd.report
    md = (out / "report.md").read_text()
    assert "| method | deploy best | deploy final | ensemble best | runs |" in md
    rows = table_rows(md)
    # FFSD first, then by name
    assert list(rows) == ["ffsd", "cl_ilr", "dml", "independent", "kdcl", "okddip", "one", "pcl"]
    client = MlflowClient(uri)
    for method, (run_id, summary) in jobs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        logged = run.data.metrics
        values = []
        for metric in ("best/deploy/top1", "final/deploy/top1", "best/ensemble/top1"):
            kind, name = metric.split("/", 1)
            assert logged[metric] == summary["metrics"][name][kind], (method, metric)
            values.append(f"{logged[metric]:.2f}")  # one seed: the value itself
        assert rows[method] == [*values, "1"], method
        # FFSD picks its best epoch by the leader, which is its deploy network
        primary, deploy = (
            ("leader/top1", "leader") if method == "ffsd" else ("deploy/top1", deploy_of(method))
        )
        assert summary["primary_metric"] == primary
        # the tracker uploads the method's own best deploy file
        uploaded = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        assert f"checkpoints/model_{deploy}_best.pth" in uploaded, uploaded
    assert "](deploy_by_method.png)" in md
    with Image.open(out / "deploy_by_method.png") as img:
        img.verify()
        assert img.format == "PNG"


# -- 6. bad input at the command line -----------------------------------------------------------
def test_bad_method_choices_and_options_stop_before_any_work(tmp_path):
    cases = {
        "nosuch": ("distill=nosuch",),
        "dml1": ("distill=dml", "distill.num_networks=1"),
        "general": ("distill=kdcl", "distill.ensemble=general"),
    }

    def launch(name: str, args: tuple[str, ...]):
        return run_launch(*args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path, timeout=120)

    results = dict(zip(cases, concurrently(*(partial(launch, n, a) for n, a in cases.items()))))
    res = results["nosuch"]
    assert res.returncode == 1
    assert "Could not find 'distill/nosuch'" in res.stderr
    listed = res.stderr.split("Available options in 'distill':", 1)[1].split()
    assert {"ffsd", *METHODS, "cl_ilr_flat"} <= set(listed)
    assert not (tmp_path / "nosuch").exists()  # composition failed: no run directory at all

    for name, message in (
        ("dml1", "distill.num_networks=1 is not allowed: must be >= 2"),
        (
            "general",
            "distill.ensemble='general' is not implemented: it needs a held-out split and the "
            "paper's estimator",
        ),
    ):
        res = results[name]
        assert res.returncode == 1, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        assert "ConfigError: invalid configuration:" in res.stderr and message in res.stderr
        # nothing was trained, tracked or checkpointed: not even Hydra's run directory is left
        assert not (tmp_path / name).exists()
    assert "choose one of: minlogit, mean, naive, linear" in results["general"].stderr
    assert "distill.num_networks=1" in results["dml1"].stderr
    assert not (tmp_path / "outputs").exists()  # no default MLflow store either
