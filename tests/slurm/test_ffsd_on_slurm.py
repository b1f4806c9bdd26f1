"""ffsd on the single-node SLURM cluster through ``hydra/launcher=slurm`` (the committed config).

A two-job sweep completes; a job sent the preemption signal the way SLURM and submitit deliver it
(SIGTERM, then SIGUSR2 to the job step) saves a mid-epoch checkpoint, is requeued by submitit,
resumes from that checkpoint in the same run directory and ends exactly where an uninterrupted
job with the same seed ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ffsd.training.checkpoint import safe_load

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# 16 batches per epoch, 2 epochs; one CPU per job so that both sweep jobs run at once.
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


def launch_sweep(cluster, sweep: Path, *overrides: str) -> subprocess.Popen:
    """``python launch.py -m hydra/launcher=slurm ...`` with this cluster's resources (no GPU)."""
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "-m",
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        *overrides,
    ]
    # sbatch exports this environment to the jobs: they import this checkout's ffsd.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=sweep.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def job_ids(sweep: Path) -> list[str]:
    return sorted(p.name for p in (sweep / ".submitit").glob("*") if p.name[0].isdigit())


def wait_launch(proc: subprocess.Popen, sweep: Path, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for jid in job_ids(sweep):
            subprocess.run(["scancel", jid.split("_")[0]], timeout=30, check=False)
        proc.kill()
        out, _ = proc.communicate()
        logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*log*"))
        raise AssertionError(
            f"sweep did not finish:\n{out.decode()[-3000:]}\n{logs[-4000:]}"
        ) from None
    text = out.decode()
    assert proc.returncode == 0, text[-3000:] + "".join(
        p.read_text()[-3000:] for p in sweep.glob(".submitit/*/*log*")
    )
    return text


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))})
    return out


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm") / "sweep"
    folder.parent.mkdir(parents=True, exist_ok=True)
    wait_launch(launch_sweep(slurm_cluster, folder, "trainer.seed=0,1"), folder)
    return folder


def test_two_job_sweep_completes_with_both_results(sweep):
    assert len(job_ids(sweep)) >= 1  # one array job (or two jobs), as submitit chose
    finals = []
    for num, seed in ((0, 0), (1, 1)):
        run = sweep / str(num)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["epochs"] == 2 and summary["best"]["value"] is not None
        assert (run / "checkpoints" / "model_leader_best.pth").is_file()
        state = safe_load(run / "checkpoints" / "last.pt")
        assert state["epoch"] == 2 and state["partial"] is None
        assert state["fingerprint"]["seed"] == seed
        assert [r["epoch"] for r in records(run)] == [1, 2]
        finals.append(state["method"]["modules"]["nets"]["leader.fc.weight"])
    assert not torch.equal(finals[0], finals[1])  # two seeds, two different runs


def test_preempted_job_requeues_and_finishes_from_its_checkpoint(slurm_cluster, sweep, tmp_path):
    folder = tmp_path / "preempt"
    proc = launch_sweep(
        slurm_cluster,
        folder,
        "trainer.seed=0",
        "trainer.progress=true",
        "trainer.log_every=1",
        # a forked DataLoader worker gets the step's signals too: it must not requeue the job
        "dataset.loader.num_workers=1",
    )
    bar = re.compile(r"epoch 2/2:\s+\d+%\|[^|]*\|\s*(\d+)/16")
    deadline = time.monotonic() + 300
    while True:
        ids = job_ids(folder) if (folder / ".submitit").exists() else []
        text = "".join(p.read_text() for p in folder.glob(".submitit/*/*_0_log.err"))
        if ids and any(int(k) >= 2 for k in bar.findall(text)):
            break
        assert proc.poll() is None and time.monotonic() < deadline, (ids, text[-3000:])
        time.sleep(0.1)
    job = ids[0]
    # What SLURM sends a job step on preemption with a --signal, and what submitit's own
    # SlurmJob._interrupt() sends: SIGTERM (submitit only logs it), then SIGUSR2.
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    wait_launch(proc, folder)

    run = folder / "0"
    log = (run / "launch.log").read_text()
    saved = re.search(r"saved \S+ inside epoch 2 after batch (\d+) of 16", log)
    assert saved, log
    assert "Requeued job" in log
    resumed = re.search(r"resumed from \S+ inside epoch 2, after batch (\d+) of 16", log)
    assert resumed and resumed.group(1) == saved.group(1), log
    assert log.count("run directory:") == 2  # two attempts, one run directory
    assert slurm_cluster.restarts(job) == 1  # slurmctld remembers jobs for MinJobAge=600 s

    # complete, and identical to the uninterrupted job with the same seed
    ref, got = (
        safe_load(sweep / "0" / "checkpoints" / "last.pt"),
        safe_load(run / "checkpoints" / "last.pt"),
    )
    assert got["partial"] is None and got["epoch"] == 2
    for k, v in ref["method"]["modules"]["nets"].items():
        torch.testing.assert_close(got["method"]["modules"]["nets"][k], v, rtol=0, atol=0)
    assert records(run) == records(sweep / "0")
    assert json.loads((run / "summary.json").read_text()) == json.loads(
        (sweep / "0" / "summary.json").read_text()
    )


def test_two_task_job_is_one_ddp_process_group(slurm_cluster, tmp_path):
    """tasks_per_node=2: submitit's TorchDistributedEnvironment forms a 2-rank gloo group."""
    folder = tmp_path / "ddp"
    proc = launch_sweep(
        slurm_cluster,
        folder,
        "hydra.launcher.tasks_per_node=2",
        "trainer.epochs=1",
        "task._target_=tests.dist_task.train_and_dump",
    )
    wait_launch(proc, folder)
    run = folder / "0"
    log = (run / "launch.log").read_text()
    assert "distributed: 2 processes (submitit, gloo backend), 2 per node" in log
    assert log.count("run directory:") == 1  # rank 1 logs nothing
    states = [torch.load(run / f"rank{r}_state.pt", weights_only=True)["nets"] for r in (0, 1)]
    last = safe_load(run / "checkpoints" / "last.pt")
    assert last["fingerprint"]["world_size"] == 2 and len(last["rng_ranks"]) == 2
    for k, v in last["method"]["modules"]["nets"].items():
        torch.testing.assert_close(states[0][k], v, rtol=0, atol=0)
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0)
    assert [r["epoch"] for r in records(run)] == [1]
