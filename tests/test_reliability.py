"""When a run goes wrong: divergence, stop signals, resumes that change the run, bad values, full
disks. Each case stops with a message that says what happened and what to do, never leaves a NaN
network as the best one, an invalid metrics file or a tracked run marked RUNNING."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

import launch
from ffsd.config import ConfigError
from ffsd.tasks import train as train_task
from ffsd.tasks.validation import validate
from ffsd.training import checkpoint as ckpt
from ffsd.training.checkpoint import (
    CheckpointError,
    OutputWriteError,
    atomic_save,
    atomic_write_text,
    config_changes,
    safe_load,
)
from ffsd.training.distributed import DistContext
from ffsd.training.engine import Trainer, TrainingDiverged
from ffsd.training.preemption import PreemptionGuard, stop_signals

from .checkpoints import RecordingTracker
from .conftest import ROOT, TINY_RUN, make_cfg, run_launch
from .test_resume import BATCHES, TINY, assert_same_run, run_inprocess

RECORDING = "logger._target_=tests.checkpoints.RecordingTracker"


def strict_json_lines(path: Path) -> list[dict]:
    """Each line parsed as strict JSON: a bare NaN or Infinity token fails."""

    def refuse(token: str):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def tiny(run_dir: Path, *overrides: str):
    return make_cfg(*TINY_RUN, "trainer.device=cpu", f"trainer.output_dir={run_dir}", *overrides)


def mlflow_status(run_dir: Path) -> str:
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    return MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status


# -- divergence ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_diverging_run_stops_with_where_and_the_rates_and_fails_its_tracked_run(tmp_path):
    run_dir = tmp_path / "run"
    res = run_launch(
        *TINY_RUN,
        "trainer.epochs=2",
        "trainer.device=cpu",
        "optim.networks.lr=1e6",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("TrainingDiverged:")]
    assert "training diverged in epoch 1, steps 1-2 of 2" in line
    assert re.search(r"the loss term '[\w/]+' is not finite", line)
    assert "lr/networks=1e+06" in line and "lr/fusion=0.1" in line
    assert "Test accuracy" not in res.stdout  # no summary of a broken run
    assert not list(run_dir.glob("checkpoints/model_*_best.pth"))
    assert not (run_dir / "summary.json").exists()
    assert mlflow_status(run_dir) == "FAILED"


def _fit(cfg, patch=None) -> Trainer:
    trainer = train_task.build_trainer(cfg, DistContext())
    if patch:
        patch(trainer)
    trainer.fit()
    return trainer


def test_nonfinite_test_metric_stops_the_run_and_never_becomes_best(tmp_path):
    run_dir = tmp_path / "run"

    def nan_leader(trainer):
        evaluate = trainer.method.evaluate

        def patched(loader, reduce):
            return evaluate(loader, reduce=reduce) | {trainer.method.primary_metric: math.nan}

        trainer.method.evaluate = patched

    with pytest.raises(TrainingDiverged, match=r"after epoch 1 the test metric 'test/\w+/top1'"):
        _fit(tiny(run_dir, "trainer.epochs=2", RECORDING), nan_leader)
    # neither a best network nor an epoch's state: only the run's config, written at the start
    assert [p.name for p in run_dir.glob("checkpoints/*")] == ["config.yaml"]
    assert not (run_dir / "metrics.jsonl").exists()
    assert RecordingTracker.calls[-1] == ("finish", "FAILED")


def test_network_with_nan_weights_is_never_saved_as_best(tmp_path):
    """Accuracy is finite whatever the weights; the deploy network is checked before saving."""
    run_dir = tmp_path / "run"

    def poison_then_evaluate(trainer):
        evaluate = trainer.method.evaluate

        def patched(loader, reduce):
            out = evaluate(loader, reduce=reduce)
            with torch.no_grad():
                weight = next(trainer.method.deploy_model().parameters())
                weight[(0,) * weight.dim()] = math.nan  # any layout (channels_last on CPU)
            return out

        trainer.method.evaluate = patched

    with pytest.raises(TrainingDiverged, match="network has NaN or infinite weights"):
        _fit(tiny(run_dir, "trainer.epochs=1", "logger=none"), poison_then_evaluate)
    assert not list(run_dir.glob("checkpoints/model_*_best.pth"))


def test_metrics_jsonl_stays_strict_json(tmp_path):
    history = [{"epoch": 1, "train/a": math.nan, "test/b/top1": math.inf, "lr/networks": 0.1}]
    Trainer._write_history(SimpleNamespace(run_dir=tmp_path, history=history))
    (record,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert record == {"epoch": 1, "train/a": None, "test/b/top1": None, "lr/networks": 0.1}


class OtherRankDiverges(DistContext):
    """Rank 0 of a world of 2 whose (simulated) rank 1 reports a non-finite term."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)
        self.agreements: list[list[float]] = []

    @property
    def enabled(self) -> bool:
        return True

    def max_values(self, values):
        self.agreements.append(list(values))
        return [values[0], 1.0]

    def gather_objects(self, obj):
        return [obj, "leader/kd"]

    def all_reduce_sum(self, t):
        return t

    def barrier(self) -> None:
        pass

    def broadcast_buffers(self, module) -> None:
        pass

    def broadcast_object(self, obj):
        return obj  # rank 0's, which this is


def test_ranks_agree_to_stop_at_a_log_boundary_when_another_rank_diverges(tmp_path):
    # 32 images over 2 ranks in batches of 4: 4 batches per rank; reads at steps 2 and 4.
    cfg = tiny(
        tmp_path / "run",
        "dataset.train_size=32",
        "trainer.batch_size=4",
        "trainer.log_every=2",
        "trainer.epochs=1",
        "logger=none",
    )
    dist = OtherRankDiverges()
    trainer = train_task.build_trainer(cfg, DistContext())
    trainer.dist = dist
    steps = []
    step = trainer.method.step
    trainer.method.step = lambda *a: steps.append(1) or step(*a)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    # Stopped at the first read, where both ranks asked (one collective), never in between.
    assert len(steps) == 2 and len(dist.agreements) == 1
    assert "epoch 1, steps 1-2 of 4 on rank 1: the loss term 'leader/kd'" in str(err.value)


@pytest.mark.slow
def test_torchrun_ranks_stop_together_when_the_losses_diverge(tmp_path):
    """Two gloo ranks: both leave at the same log boundary with the message, neither hangs."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--log-dir={tmp_path / 'logs'}",
        "--redirects=3",
        str(ROOT / "launch.py"),
        *TINY_RUN,
        "dataset.train_size=32",
        "trainer.batch_size=4",
        "trainer.log_every=2",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "trainer.threads=1",
        "optim.networks.lr=1e6",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    errs = {
        int(p.parent.name): p.read_text() for p in tmp_path.glob("logs/*/attempt_0/*/stderr.log")
    }
    assert set(errs) == {0, 1}, res.stdout[-3000:]
    lines = set()
    for text in errs.values():
        lines |= {x for x in text.splitlines() if x.startswith("TrainingDiverged:")}
        assert "Traceback" not in text
    (line,) = lines  # both ranks stopped at the same step, naming the same term
    assert re.search(r"training diverged in epoch 1, steps \d+-\d+ of 4 on rank \d", line)
    assert not list(run_dir.glob("checkpoints/model_*_best.pth"))


# -- signals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run (no tracker: module fixtures run before the store is set)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_inprocess(run_dir, "logger=none")
    return run_dir


class Launched:
    """launch.py with test_resume's tiny run, SIGINT at its default, stderr read as it comes."""

    def __init__(self, run_dir: Path) -> None:
        cmd = [
            sys.executable,
            str(ROOT / "launch.py"),
            *TINY,
            "trainer.progress=true",
            "trainer.log_every=1",
            f"hydra.run.dir={run_dir}",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        # A shell without job control starts background commands with SIGINT ignored, and a
        # guard leaves an ignored signal alone: give the child Python's usual Ctrl-C.
        self.proc = subprocess.Popen(
            cmd,
            cwd=run_dir.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            self.chunks.append(chunk.decode(errors="replace"))

    def wait_for_batch(self, epoch: int, batch: int, timeout: float = 300) -> None:
        pattern = re.compile(rf"epoch {epoch}/\d+:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")
        deadline = time.monotonic() + timeout
        while not any(int(m) >= batch for m in pattern.findall("".join(self.chunks)[-4000:])):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"never reached epoch {epoch} batch {batch}:\n{self.err}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc, self.proc.stdout.read().decode(), self.err

    @property
    def err(self) -> str:
        return "".join(self.chunks)


def _check_saved_inside_epoch_2(run_dir: Path) -> None:
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    partial = state["partial"]
    assert state["epoch"] == 1 and partial["epoch"] == 2
    assert 2 <= partial["batches_done"] < BATCHES and partial["batches"] == BATCHES
    assert not (run_dir / "summary.json").exists()


def _messages(text: str) -> list[str]:
    """Lines other than the progress bar's redraws."""
    lines = re.split(r"[\r\n]+", text)
    return [x for x in lines if x.strip() and not re.search(r"epoch \d+/\d+:|\d+%\|", x)]


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_stops_and_resumes_to_the_uninterrupted_run(tmp_path, straight):
    """SIGTERM (docker stop, Kubernetes, systemd) outside submitit: save, then end by SIGTERM."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = Launched(run_dir)
    job.wait_for_batch(epoch=2, batch=2)
    job.proc.send_signal(signal.SIGTERM)
    rc, out, err = job.finish()
    assert rc == -signal.SIGTERM, err[-3000:]
    (said,) = [x for x in out.splitlines() if "SIGTERM" in x]
    assert re.search(r"SIGTERM: saved \S+last\.pt inside epoch 2 after batch \d+ of 16; stop", said)
    assert "Traceback" not in err
    _check_saved_inside_epoch_2(run_dir)
    assert mlflow_status(run_dir) == "KILLED"

    run_inprocess(run_dir)
    assert_same_run(straight, run_dir)
    assert mlflow_status(run_dir) == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_with_one_line(tmp_path, straight):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = Launched(run_dir)
    job.wait_for_batch(epoch=2, batch=2)
    job.proc.send_signal(signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    after = _messages(out[out.index("epoch 1/2 |") :])[1:] + _messages(
        err[err.index("epoch 2/2") :]
    )
    assert len(after) == 1, after
    assert re.search(r"SIGINT: saved \S+last\.pt inside epoch 2 after batch \d+ of 16", after[0])
    _check_saved_inside_epoch_2(run_dir)
    assert mlflow_status(run_dir) == "KILLED"

    run_inprocess(run_dir)
    assert_same_run(straight, run_dir)


def test_sigterm_is_left_to_submitit_in_a_submitit_job(monkeypatch):
    assert stop_signals("USR2", ["TERM", "INT"], submitit=False) == (
        signal.SIGUSR2,
        signal.SIGTERM,
        signal.SIGINT,
    )
    assert stop_signals("USR2", ["TERM", "INT"], submitit=True) == (signal.SIGUSR2, signal.SIGINT)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(stop_signals("USR2", ["TERM"])):
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGUSR2) is not before
    assert stop_signals(None, []) == ()


def test_second_ctrl_c_does_not_wait_for_the_save():
    with PreemptionGuard(signal.SIGINT) as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.received is signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_default_action_that_the_kernel_drops_still_ends_the_process(monkeypatch):
    """PID 1 of a container does not die of a default-action signal it sends itself."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with PreemptionGuard(signal.SIGUSR1) as guard:
            signal.raise_signal(signal.SIGUSR1)
            monkeypatch.setattr(signal, "raise_signal", lambda sig: None)
            assert guard.takes_default_action()
            with pytest.raises(SystemExit) as stop:
                guard.hand_off()
        assert stop.value.code == 128 + signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_signal_in_process_marks_the_tracked_run_killed(tmp_path):
    """The default action ends the process at once: the tracker is finished before it."""
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir, "trainer.epochs=1", RECORDING, "trainer.preempt_signal=USR1")
    trainer = train_task.build_trainer(cfg, DistContext())
    step = trainer.method.step

    def step_then_signal(*args):
        out = step(*args)
        signal.raise_signal(signal.SIGUSR1)
        return out

    seen = []

    def default_action(sig, saved):  # what the signal's default action would find, then do
        seen.append((RecordingTracker.calls[-1], safe_load(run_dir / "checkpoints" / "last.pt")))
        raise SystemExit(128 + sig)

    trainer.method.step = step_then_signal
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        trainer.guard._deliver = default_action
        with pytest.raises(SystemExit):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    ((last_call, state),) = seen
    assert last_call == ("finish", "KILLED")
    assert state["partial"]["epoch"] == 1 and state["partial"]["batches_done"] == 1
    assert RecordingTracker.calls.count(("finish", "KILLED")) == 1


# -- resumes that change the run --------------------------------------------------------------
def test_resume_with_changed_settings_is_refused_with_each_key_and_both_values(tmp_path):
    run_dir = tmp_path / "run"
    train_task.run(tiny(run_dir, "trainer.epochs=1", "logger=none"))
    changed = (
        "optim.networks.lr=0.05",
        "distill.lambda_fusion=5",
        "dataset.train_size=24",
        "schedule.gamma=0.5",
    )
    with pytest.raises(CheckpointError) as err:
        train_task.run(tiny(run_dir, "trainer.epochs=2", "logger=none", *changed))
    message = str(err.value)
    for line in (
        "optim.networks.lr: checkpoint 0.1, this run 0.05",
        "distill.lambda_fusion: checkpoint 10.0, this run 5",
        "dataset.train_size: checkpoint 16, this run 24",
        "schedule.gamma: checkpoint 0.1, this run 0.5",
    ):
        assert line in message
    assert "trainer.resume_changes=allow" in message and "after epoch 1" in message
    assert safe_load(run_dir / "checkpoints" / "last.pt")["epoch"] == 1  # untouched


def test_allowed_changes_are_logged_recorded_and_used(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train_task.run(tiny(run_dir, "trainer.epochs=1", "logger=none"))
    new = ("trainer.epochs=2", "logger=none", "optim.networks.lr=0.05")
    with caplog.at_level("WARNING", logger="ffsd"):
        train_task.run(tiny(run_dir, *new, "trainer.resume_changes=allow"))
    assert "optim.networks.lr: checkpoint 0.1, this run 0.05" in caplog.text
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    assert state["resume_changes"] == [
        {"epoch": 1, "inside_epoch": None, "changes": {"optim.networks.lr": [0.1, 0.05]}}
    ]
    lrs = [r["lr/networks"] for r in strict_json_lines(run_dir / "metrics.jsonl")]
    assert lrs == [pytest.approx(0.1), pytest.approx(0.05 * 0.1)]  # milestone 1: x gamma
    # The run now holds the new values: resuming with them needs nothing more.
    train_task.run(tiny(run_dir, *new, "trainer.epochs=3"))
    assert len(safe_load(run_dir / "checkpoints" / "last.pt")["resume_changes"]) == 1


def test_cosine_run_extended_is_refused_as_a_schedule_change(tmp_path):
    """Its schedule.epochs follows trainer.epochs: the learning rate would jump back up."""
    run_dir = tmp_path / "run"
    base = [x for x in TINY_RUN if not x.startswith("schedule.")]
    base += [
        "schedule=cosine",
        "trainer.device=cpu",
        f"trainer.output_dir={run_dir}",
        "logger=none",
    ]
    train_task.run(make_cfg(*base, "trainer.epochs=1"))
    with pytest.raises(
        CheckpointError, match=re.escape("schedule.epochs: checkpoint 1, this run 2")
    ):
        train_task.run(make_cfg(*base, "trainer.epochs=2"))


def test_run_cannot_be_shortened_below_where_it_is(tmp_path):
    run_dir = tmp_path / "run"
    train_task.run(tiny(run_dir, "trainer.epochs=2", "logger=none"))
    with pytest.raises(
        CheckpointError, match=re.escape("trainer.epochs: checkpoint 2, this run 1")
    ):
        train_task.run(tiny(run_dir, "trainer.epochs=1", "logger=none"))


def test_settings_that_do_not_change_the_run_are_ignored():
    base = make_cfg(*TINY_RUN, "trainer.output_dir=/a")
    stored = ckpt.OmegaConf.to_yaml(base, resolve=False)
    neutral = make_cfg(
        *TINY_RUN,
        "trainer.output_dir=/b",
        "trainer.progress=true",
        "trainer.log_every=3",
        "trainer.threads=1",
        "trainer.device=cpu",
        "trainer.eval_every=5",
        "trainer.test_batch_size=4",
        "trainer.resume=never",
        "trainer.channels_last=true",
        "trainer.nhwc_batch_norm=native",
        "trainer.host_malloc.mmap_threshold_mb=null",
        "trainer.stop_signals=[]",
        "trainer.preempt_signal=USR1",
        "dataset.loader.num_workers=3",
        "logger=none",
        "optim.networks.foreach=true",
    )
    assert config_changes(stored, neutral) == {}
    other = make_cfg(*TINY_RUN, "trainer.output_dir=/a", "trainer.precision=bf16", "trainer.seed=3")
    assert config_changes(stored, other) == {
        "trainer.precision": ["fp32", "bf16"],
        "trainer.seed": [0, 3],
    }


def _preempted_after_one_step(run_dir: Path, *overrides: str) -> None:
    """A mid-epoch last.pt: the preemption signal at step 1, a requeue-like handler that exits."""
    cfg = tiny(run_dir, "trainer.epochs=1", "logger=none", *overrides)

    def requeue(signum, frame):
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        trainer = train_task.build_trainer(cfg, DistContext())
        step = trainer.method.step

        def step_then_signal(*args):
            out = step(*args)
            signal.raise_signal(signal.SIGUSR2)
            return out

        trainer.method.step = step_then_signal
        with pytest.raises(SystemExit):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_mid_epoch_position_that_no_longer_fits_the_data_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _preempted_after_one_step(run_dir)
    partial = safe_load(run_dir / "checkpoints" / "last.pt")["partial"]
    assert (partial["batches_done"], partial["batches"]) == (1, 2)
    fewer = ("trainer.epochs=1", "logger=none", "dataset.train_size=8")
    with pytest.raises(
        CheckpointError, match=re.escape("dataset.train_size: checkpoint 16, this run 8")
    ):
        train_task.run(tiny(run_dir, *fewer))
    with pytest.raises(CheckpointError) as err:  # even when changes are allowed
        train_task.run(tiny(run_dir, *fewer, "trainer.resume_changes=allow"))
    assert "inside epoch 1 after batch 1 of 2, but epoch 1 of this run has 1 batches" in str(
        err.value
    )
    assert "no longer fits the data" in str(err.value)


# -- validation before any work ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optim.networks.lr=abc"], "optim.networks.lr='abc' is not allowed: must be a number > 0"),
        (["optim.fusion.lr=0"], "optim.fusion.lr=0 is not allowed: must be a number > 0"),
        (["optim.decoders.lr=-1e-3"], "optim.decoders.lr=-0.001 is not allowed"),
        (["optim.networks.momentum=-0.9"], "optim.networks.momentum=-0.9 is not allowed: must"),
        (["optim.fusion.weight_decay=-1"], "optim.fusion.weight_decay=-1 is not allowed"),
        (["trainer.threads=0"], "trainer.threads=0 is not allowed: must be >= 1"),
        (["trainer.device=cuda:99"], "trainer.device='cuda:99'"),
        (["schedule.milestones=[150,400]"], "each must be between 1 and 299"),
        (["trainer.epochs=100"], "schedule.milestones=[150, 225] is not allowed with trainer"),
        (["schedule.milestones=[225,150]"], "schedule.milestones=[225, 150] is not allowed: must"),
        (["schedule.gamma=0"], "schedule.gamma=0 is not allowed: must be a number > 0"),
        (["schedule.warmup_epochs=300"], "schedule.warmup_epochs=300 is not allowed with trainer"),
        (["schedule=cosine", "schedule.warmup_epochs=-1"], "schedule.warmup_epochs=-1 is not"),
        (["trainer.resume_changes=maybe"], "trainer.resume_changes='maybe' is not valid; choose"),
        (["trainer.stop_signals=[TERM,KILL]"], "'KILL' is not valid (SIGKILL cannot be caught"),
    ],
)
def test_bad_values_stop_before_any_work_with_key_value_and_what_is_allowed(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides, "trainer.output_dir=/tmp/unused"))
    assert fragment in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"trainer.device='cuda' but this machine has no usable"):
        validate(make_cfg("trainer.device=cuda", "trainer.output_dir=/tmp/unused"))


def test_unwritable_output_directory_is_refused_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"{blocker} is a file, not a directory"):
        validate(make_cfg(f"trainer.output_dir={blocker / 'run'}"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="is not writable"):
            validate(make_cfg(f"trainer.output_dir={locked / 'run'}"))


def test_batch_larger_than_the_training_set_is_refused_before_training(tmp_path):
    run_dir = tmp_path / "run"
    RecordingTracker.calls = []
    with pytest.raises(ConfigError) as err:
        train_task.run(tiny(run_dir, "trainer.batch_size=32", RECORDING))
    assert (
        "trainer.batch_size=32 is larger than the training set (dataset=synthetic: 16 images); "
        "choose at most 16" in str(err.value)
    )
    assert not run_dir.exists() and RecordingTracker.calls == []


def test_launch_prints_a_bad_value_alone(tmp_path):
    res = run_launch(
        "optim.networks.lr=abc", "dataset=synthetic", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "optim.networks.lr='abc' is not allowed: must be a number > 0" in res.stderr


# -- full disk ----------------------------------------------------------------------------------
TORCH_DISK_FULL = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


def test_full_disk_checkpoint_names_the_file_and_free_space_and_keeps_the_old_one(
    tmp_path, monkeypatch
):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def full(obj, f, *a, **k):
        f.write(b"part of it")
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputWriteError) as err:
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    message = str(err.value)
    assert f"could not write {path}: torch.save failed" in message
    assert re.search(r"[\d.]+ \w?i?B free of [\d.]+ \w?i?B on the file system of ", message)
    assert safe_load(path) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_text_file_says_so(tmp_path, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # where a full NFS disk shows
    with pytest.raises(OutputWriteError, match=r"metrics\.jsonl: No space left on device \(the"):
        atomic_write_text("{}\n", tmp_path / "metrics.jsonl")


def test_full_disk_during_a_run_is_a_user_error_and_fails_the_tracked_run(tmp_path, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(OutputWriteError, match=r"could not write \S+checkpoints/\S+: No space"):
        train_task.run(tiny(tmp_path / "run", "trainer.epochs=1", RECORDING))
    assert RecordingTracker.calls[-1] == ("finish", "FAILED")
    assert OutputWriteError in launch.USER_ERRORS and TrainingDiverged in launch.USER_ERRORS
