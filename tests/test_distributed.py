"""Data-parallel training: process-group set-up, one DDP over every network, rank-0-only output.

The end-to-end tests start real 2-process gloo runs with torchrun on tiny synthetic data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ffsd
from ffsd.config import ConfigError
from ffsd.data.base import ShardSampler
from ffsd.data.build import build_data
from ffsd.tasks.validation import validate
from ffsd.training import distributed
from ffsd.training.checkpoint import safe_load
from ffsd.training.distributed import DistContext, DistributedSetupError

from .conftest import ROOT, make_cfg

# 8 batches of 4 per rank and epoch (2 ranks), 20 test images in shards of 10.
TINY = (
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=20",
    "model=resnet20",
    "trainer.batch_size=4",
    "trainer.test_batch_size=8",
    "trainer.epochs=2",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.progress=true",
    "trainer.log_every=2",
    "schedule.milestones=[2]",
    "task._target_=tests.dist_task.train_and_dump",
)


def start_torchrun(
    tmp: Path, name: str, *overrides: str, logs: str | None = None, nproc: int = 2
) -> subprocess.Popen:
    """``torchrun --nproc_per_node=nproc launch.py``, each rank's output in its own files.

    The run directory is ``tmp/name``; rank outputs go to ``tmp/<logs or name>_logs``.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--log-dir={tmp / ((logs or name) + '_logs')}",
        "--redirects=3",
        str(ROOT / "launch.py"),
        *TINY,
        f"hydra.run.dir={tmp / name}",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def rank_output(tmp: Path, name: str, rank: int, stream: str = "stderr") -> str:
    found = list((tmp / f"{name}_logs").glob(f"*/attempt_0/{rank}/{stream}.log"))
    return found[0].read_text() if found else ""


def finish(proc: subprocess.Popen, tmp: Path, name: str, expect_ok: bool = True) -> None:
    out, _ = proc.communicate(timeout=600)
    if expect_ok:
        assert proc.returncode == 0, (
            out.decode()[-3000:] + rank_output(tmp, name, 0)[-3000:] + rank_output(tmp, name, 1)
        )


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank`` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def states_of(run: Path) -> list[dict]:
    return [torch.load(run / f"rank{r}_state.pt", weights_only=True)["nets"] for r in (0, 1)]


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))})
    return out


# -- unit ---------------------------------------------------------------------------------------
def test_single_process_context_is_a_world_of_one():
    ctx = DistContext()
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum(t) is t and ctx.any(True) and not ctx.any(False)
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object(3) == 3
    with distributed.session("auto", "cpu") as c:
        assert (c.world_size, c.rank, c.launcher) == (1, 0, "single") and not c.enabled


def test_backend_auto_and_refusals():
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(DistributedSetupError, match="nccl needs CUDA"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(DistributedSetupError, match="choose one of: auto, nccl, gloo"):
        distributed.resolve_backend("mpi", torch.device("cpu"))
    with pytest.raises(DistributedSetupError, match="names one GPU"):
        distributed._pick_device(torch.device("cuda", 1), 0, 2)


def test_config_validation_names_key_value_and_choices():
    with pytest.raises(ConfigError) as err:
        validate(
            make_cfg(
                "trainer.distributed.backend=mpi",
                "trainer.sync_bn=maybe",
                "trainer.preempt_signal=KILL",
            )
        )
    msg = str(err.value)
    assert "trainer.distributed.backend='mpi' is not valid; choose one of: auto, nccl, gloo" in msg
    assert "trainer.sync_bn='maybe' must be true or false" in msg
    assert "trainer.preempt_signal='KILL'" in msg and "cannot be caught" in msg
    with pytest.raises(ConfigError, match="backend='nccl' needs CUDA"):
        validate(make_cfg("trainer.device=cpu", "trainer.distributed.backend=nccl"))
    validate(make_cfg("trainer.preempt_signal=null"))
    assert make_cfg().trainer.preempt_signal == os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


def test_every_parameter_gets_a_gradient_each_step():
    """What lets DDP run with find_unused_parameters=False: no parameter is left out."""
    method = ffsd.build_method(make_cfg(*TINY), 10, "cpu")
    method.begin_epoch(1, 1)
    method.step(torch.randn(4, 3, 32, 32), torch.randint(10, (4,)), 1)
    params = dict(method.forward_fn.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing and len(params) > 100


def test_distribute_refuses_a_forward_that_misses_trained_parameters():
    cfg = make_cfg(*TINY)
    method = ffsd.build_method(cfg, 10, "cpu")
    method.forward_fn = method.nets.students  # not every network: the rest would not sync
    with pytest.raises(ValueError, match="would not be all-reduced"):
        method.distribute(lambda m: m)
    method.forward_fn = lambda *a: a
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        method.distribute(lambda m: m)


def test_sync_bn_on_cpu_is_refused_before_any_work():
    method = ffsd.build_method(make_cfg(*TINY), 10, "cpu")
    with pytest.raises(DistributedSetupError, match="sync_bn=true needs CUDA"):
        distributed.data_parallel(method, DistContext(world_size=2), sync_bn=True)


def test_sync_bn_conversion_keeps_parameters_and_state_names():
    method = ffsd.build_method(make_cfg(*TINY), 10, "cpu")
    params = {n: p for n, p in method.nets.named_parameters()}
    keys = set(method.nets.state_dict())
    method.convert_sync_batchnorm()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.nets.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in method.nets.modules())
    assert all(params[n] is p for n, p in method.nets.named_parameters())
    assert set(method.nets.state_dict()) == keys
    # the frozen decoder path still reads the same running statistics (no sync in eval BN)
    dec = method.nets.decoders[0]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        out = dec(x, frozen=True)
    assert out[0].shape == (2, 16, 32, 32)


def test_stray_hydra_folder_of_another_rank_is_removed_only_if_hydra_made_it(tmp_path):
    stray = tmp_path / "stray"
    (stray / ".hydra").mkdir(parents=True)
    for f in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (stray / ".hydra" / f).write_text("x")
    (stray / "launch.log").write_text("")
    distributed._remove_hydra_only_dir(stray)
    assert not stray.exists()
    keep = tmp_path / "keep"
    (keep / ".hydra").mkdir(parents=True)
    (keep / "notes.txt").write_text("mine")
    distributed._remove_hydra_only_dir(keep)
    assert (keep / "notes.txt").exists()


# -- two processes through torchrun -------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process gloo run of 2 epochs; each rank has its own Hydra directory on purpose."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = start_torchrun(
        tmp,
        "run",
        "logger._target_=tests.dist_task.RecordingTracker",
        f"hydra.run.dir={tmp}/run_rank${{oc.env:RANK}}",
    )
    finish(proc, tmp, "run")
    outputs = {r: {s: rank_output(tmp, "run", r, s) for s in ("stdout", "stderr")} for r in (0, 1)}
    return tmp, tmp / "run_rank0", outputs


@pytest.mark.slow
def test_torchrun_ranks_end_with_identical_replicas(ddp_run):
    _, run, _ = ddp_run
    states = states_of(run)
    last = safe_load(run / "checkpoints" / "last.pt")["method"]["modules"]["nets"]
    assert set(states[0]) == set(states[1]) == set(last)
    for k in last:  # parameters and BatchNorm buffers, bit for bit
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(states[0][k], last[k], rtol=0, atol=0, msg=k)
    # the run trained: parameters moved away from a fresh initialisation with this seed
    torch.manual_seed(0)
    fresh = ffsd.build_method(make_cfg(*TINY), 10, "cpu").nets.state_dict()
    assert not torch.equal(fresh["leader.fc.weight"], last["leader.fc.weight"])


@pytest.mark.slow
def test_torchrun_only_rank0_prints_logs_tracks_and_writes(ddp_run):
    tmp, run, outputs = ddp_run
    # one run directory: rank 1's Hydra folder (another name on purpose) was folded into rank 0's
    assert not (tmp / "run_rank1").exists()
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    calls = [json.loads(x) for x in (run / "tracker_calls.jsonl").read_text().splitlines()]
    assert {c["rank"] for c in calls} == {0}
    assert [c["call"] for c in calls] == [
        "start",
        "log_metrics",
        "log_metrics",
        "log_summary",
        "finish",
    ]
    out0, out1 = outputs[0], outputs[1]
    assert "epoch 2/2" in out0["stderr"]  # progress bar
    assert out0["stdout"].count("Test accuracy (%) over 2 epochs") == 1
    assert "distributed: 2 processes (torchrun, gloo backend)" in out0["stdout"]
    assert "epoch 1/2 |" in out0["stdout"]
    for stream in ("stdout", "stderr"):
        text = out1[stream]
        assert "epoch" not in text and "Test accuracy" not in text and "INFO" not in text, text


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process_on_the_same_parameters(ddp_run):
    _, run, _ = ddp_run
    cfg = make_cfg(*TINY)
    method = ffsd.build_method(cfg, 10, "cpu")
    method.load_state_dict(safe_load(run / "checkpoints" / "last.pt")["method"])
    data = build_data(cfg)
    single = method.evaluate(data.test_loader(8))
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for k, v in single.items():
        if "/top" in k:
            assert logged[f"test/{k}"] == v, k  # exact: counts summed over the two shards
        else:
            assert logged[f"test/{k}"] == pytest.approx(v, rel=1e-6), k
    # the shards cover the test set once, without padding
    shards = [list(ShardSampler(20, r, 2)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(20))
    assert OmegaConf.select(cfg, "dataset.test_size") == 20


@pytest.mark.slow
def test_torchrun_preemption_of_one_rank_saves_mid_epoch_and_resumes_exactly(ddp_run, tmp_path):
    """SIGUSR2 to rank 1 only: the ranks agree at the next log_every step, save, and stop."""
    _, reference, _ = ddp_run
    proc = start_torchrun(tmp_path, "run")
    pattern = re.compile(r"epoch 2/2:\s+\d+%\|[^|]*\|\s*(\d+)/8")
    deadline = time.monotonic() + 300
    while not any(int(k) >= 1 for k in pattern.findall(rank_output(tmp_path, "run", 0))):
        assert proc.poll() is None and time.monotonic() < deadline, rank_output(tmp_path, "run", 0)
        time.sleep(0.05)
    os.kill(worker_pid(proc, 1), signal.SIGUSR2)
    finish(proc, tmp_path, "run", expect_ok=False)
    assert proc.returncode != 0  # both ranks ended by the signal's default action, after saving
    state = safe_load(tmp_path / "run" / "checkpoints" / "last.pt")
    partial = state["partial"]
    assert state["epoch"] == 1 and partial["epoch"] == 2
    assert partial["batches_done"] in (2, 4, 6)  # a log_every boundary: where ranks agree
    assert len(partial["ranks"]) == 2 and len(state["rng_ranks"]) == 2
    assert "inside epoch 2" in rank_output(tmp_path, "run", 0, "stdout")

    proc = start_torchrun(tmp_path, "run", "trainer.progress=false", logs="resume")
    finish(proc, tmp_path, "resume")
    assert "inside epoch 2, after batch" in rank_output(tmp_path, "resume", 0, "stdout")
    resumed, straight = states_of(tmp_path / "run"), states_of(reference)
    for k in straight[0]:
        for r in (0, 1):
            torch.testing.assert_close(resumed[r][k], straight[0][k], rtol=0, atol=0, msg=k)
    assert records(tmp_path / "run") == records(reference)
