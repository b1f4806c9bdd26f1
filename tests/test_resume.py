"""Interrupted runs resume to exactly the uninterrupted result: SIGKILL, and the preemption signal
(mid-epoch checkpoint at the next step boundary, then the signal's previous handler)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ffsd.data.workers import quiet_worker
from ffsd.tasks import train as train_task
from ffsd.training.checkpoint import atomic_save, safe_load
from ffsd.training.distributed import DistContext
from ffsd.training.preemption import PreemptionGuard, parse_signal

from .conftest import ROOT, make_cfg

# 16 batches per epoch: a signal sent at batch 2 of epoch 2 lands well inside it.
TINY = (
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=16",
    "model=resnet20",
    "trainer.batch_size=4",
    "trainer.test_batch_size=16",
    "trainer.epochs=2",
    "trainer.device=cpu",
    "trainer.threads=1",
    "schedule.milestones=[1]",
)
BATCHES = 16


def run_inprocess(run_dir: Path, *overrides: str) -> dict:
    cfg = make_cfg(*TINY, f"trainer.output_dir={run_dir}", "trainer.progress=false", *overrides)
    train_task.run(cfg)
    return cfg


def start_launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """launch.py in a subprocess, with a progress bar refreshed every step on stderr."""
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *TINY,
        "trainer.progress=true",
        "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for_batch(proc: subprocess.Popen, epoch: int, batch: int, timeout: float = 300) -> str:
    """Read the progress bar until epoch ``epoch`` shows ``batch`` batches done."""
    pattern = re.compile(rf"epoch {epoch}/\d+:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")
    seen: list[str] = []
    found = threading.Event()

    def reader():
        buf = ""
        while True:
            chunk = proc.stderr.read1(4096).decode(errors="replace")
            if not chunk:
                return
            seen.append(chunk)
            buf = (buf + chunk)[-4000:]
            if any(int(m) >= batch for m in pattern.findall(buf)):
                found.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.is_set():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never reached epoch {epoch} batch {batch}:\n{''.join(seen)}")
        time.sleep(0.02)
    return "".join(seen)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock figures."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))})
    return out


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = safe_load(a / "checkpoints" / "last.pt"), safe_load(b / "checkpoints" / "last.pt")
    assert sa["partial"] is None and sb["partial"] is None
    assert set(sa["method"]["modules"]) == set(sb["method"]["modules"])
    for module, pa in sa["method"]["modules"].items():  # every network, an EMA copy included
        pb = sb["method"]["modules"][module]
        assert set(pa) == set(pb)
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=f"{module}.{k}")
    for name, opt in sa["method"]["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(v, sb["method"]["optimizers"][name]["state"][pid][key])
    assert records(a) == records(b)
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert ja == jb


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run (no tracker: a module fixture runs before the autouse
    fixture that points MLflow at the test store, so it would write into the repository)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_inprocess(run_dir, "logger=none")
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, straight):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start_launch(run_dir)
    wait_for_batch(proc, epoch=2, batch=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["partial"] is None  # no chance to save: epoch 1's end
    assert not (run_dir / "summary.json").exists()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    run_inprocess(run_dir)  # trainer.resume=auto
    assert_same_run(straight, run_dir)


@pytest.mark.slow
def test_preemption_signal_saves_mid_epoch_and_resume_matches(tmp_path, straight):
    """The signal from outside: saved at the next step, then its default action ends the run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start_launch(run_dir)
    wait_for_batch(proc, epoch=2, batch=2)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGUSR2, err.decode()[-3000:]
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    partial = state["partial"]
    assert state["epoch"] == 1 and partial["epoch"] == 2
    assert 2 <= partial["batches_done"] < BATCHES and partial["batches"] == BATCHES
    assert partial["ranks"][0]["count"] == 4 * partial["batches_done"]
    assert "saved" in out.decode() + err.decode() and "inside epoch 2" in out.decode()

    run_inprocess(run_dir)
    assert_same_run(straight, run_dir)


def submitit_task_pid(folder: Path) -> int | None:
    """The pid of the submitit task process whose job folder is under ``folder``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(folder).encode() in c for c in cmd):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_submitit_local_job_requeues_on_the_signal_and_matches(tmp_path, straight):
    """hydra/launcher=local: submitit's real handler, checkpoint() and in-place requeue."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "-m",
        "hydra/launcher=local",
        *TINY,
        "trainer.progress=true",
        "trainer.log_every=1",
        f"hydra.sweep.dir={sweep}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    pattern = re.compile(r"epoch 2/2:\s+\d+%\|[^|]*\|\s*(\d+)/16")
    deadline = time.monotonic() + 300
    while True:
        bars = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.err"))
        if any(int(k) >= 2 for k in pattern.findall(bars)):
            break
        assert proc.poll() is None and time.monotonic() < deadline, bars[-3000:]
        time.sleep(0.05)
    os.kill(submitit_task_pid(sweep), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    log = (sweep / "0" / "launch.log").read_text()
    assert "handing SIGUSR2 on to SignalHandler.checkpoint_and_try_requeue" in log
    assert "Requeued job" in log and "resumed from" in log and "inside epoch 2" in log
    assert_same_run(straight, sweep / "0")


def test_resume_message_names_the_position(tmp_path, caplog):
    """A deterministic in-process preemption: the signal is raised by the 6th step of epoch 1.

    The handler installed before the run (here a stand-in for submitit's) is called once the
    mid-epoch checkpoint is on disk; it ends the run like submitit does after requeueing.
    """
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        *TINY, "trainer.epochs=1", f"trainer.output_dir={run_dir}", "trainer.progress=false"
    )
    seen = {}

    def requeue(signum, frame):
        seen["partial"] = safe_load(run_dir / "checkpoints" / "last.pt")["partial"]
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        trainer = train_task.build_trainer(cfg, DistContext())
        step = trainer.method.step
        count = {"n": 0}

        def step_then_signal(*args):
            out = step(*args)
            count["n"] += 1
            if count["n"] == 6:
                signal.raise_signal(signal.SIGUSR2)
            return out

        trainer.method.step = step_then_signal
        with pytest.raises(SystemExit):
            trainer.fit()
        assert signal.getsignal(signal.SIGUSR2) is requeue  # the guard put it back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen["partial"]["epoch"] == 1 and seen["partial"]["batches_done"] == 6
    assert not (run_dir / "metrics.jsonl").exists()

    with caplog.at_level("INFO", logger="ffsd"):
        train_task.run(cfg)
    assert "inside epoch 1, after batch 6 of 16" in caplog.text
    straight = tmp_path / "straight"
    run_inprocess(straight, "trainer.epochs=1")
    assert_same_run(straight, run_dir)


def test_handler_that_returns_lets_training_continue(tmp_path):
    """Only the checkpoint is added: a previous handler that returns does not stop the run."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        *TINY, "trainer.epochs=1", f"trainer.output_dir={run_dir}", "trainer.progress=false"
    )
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        trainer = train_task.build_trainer(cfg, DistContext())
        step = trainer.method.step

        def step_then_signal(images, labels, epoch):
            out = step(images, labels, epoch)
            if trainer.method._iter == 3:
                signal.raise_signal(signal.SIGUSR2)
            return out

        trainer.method.step = step_then_signal
        trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]
    assert safe_load(run_dir / "checkpoints" / "last.pt")["partial"] is None  # finished
    assert len(records(run_dir)) == 1


def test_parse_signal():
    assert parse_signal("USR2") is signal.SIGUSR2 and parse_signal("SIGTERM") is signal.SIGTERM
    assert parse_signal(str(int(signal.SIGUSR1))) is signal.SIGUSR1 and parse_signal(None) is None
    with pytest.raises(ValueError, match="not a signal"):
        parse_signal("USR9")
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signal("SIGKILL")


def test_guard_leaves_an_ignored_signal_ignored():
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with PreemptionGuard(signal.SIGUSR2) as guard:
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
            signal.raise_signal(signal.SIGUSR2)
            assert not guard.requested
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def dies_midway(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # what a signal handler raising mid-write looks like

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert safe_load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_dataloader_workers_leave_job_signals_to_the_main_process(monkeypatch):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        # The main process saves on SIGTERM and Ctrl-C (or, under submitit, ignores SIGTERM);
        # systemd and the terminal signal the workers too.
        for executor in (None, "slurm"):
            if executor:
                monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
            else:
                monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
            for s in saved:
                signal.signal(s, saved[s])
            quiet_worker(0)
            for s in saved:
                assert signal.getsignal(s) is signal.SIG_IGN, (executor, s)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
