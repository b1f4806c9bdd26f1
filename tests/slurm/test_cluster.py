"""The single-node SLURM cluster does what ffsd needs: batch jobs, submitit jobs, and submitit's
preemption path (USR2 -> checkpoint -> `scontrol requeue` from inside the job -> resume)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# The jobs unpickle the callables below in a fresh interpreter that cannot import this test
# module (its name depends on pytest's import mode): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.strip().split(";")[0]


def test_sbatch_wrap_completes(slurm_cluster, tmp_path: Path) -> None:
    job_id = _sbatch(
        f"--partition={slurm_cluster.partition}",
        "--time=1",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/wrap-%j.out",
        "--wrap",
        'echo "hello from job $SLURM_JOB_ID on $(hostname -s)"',
    )
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"
    out = tmp_path / f"wrap-{job_id}.out"
    assert out.exists(), slurm_cluster.status()
    assert out.read_text().strip() == f"hello from job {job_id} on {slurm_cluster.node}"


def test_sbatch_signal_reaches_job_step(slurm_cluster, tmp_path: Path) -> None:
    # submitit's sbatch files carry `--signal=USR2@<signal_delay_s>` and run the Python task in an
    # srun step; SLURM signals all the step's processes once less than that is left of --time (here
    # at its next periodic time-limit check, as 90 s > 1 min): that is how a time-out reaches
    # submitit's handler.
    script = tmp_path / "trap.sh"
    script.write_text(
        "#!/bin/bash\n"
        'srun bash -c \'trap "echo got USR2; exit 0" USR2;'
        " for i in $(seq 240); do sleep 0.25; done; echo no signal'\n"
    )
    job_id = _sbatch(
        f"--partition={slurm_cluster.partition}",
        "--time=1",
        "--signal=USR2@90",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/trap-%j.out",
        str(script),
    )
    assert slurm_cluster.wait_job(job_id, timeout=55) == "COMPLETED"
    assert "got USR2" in (tmp_path / f"trap-{job_id}.out").read_text()


def _square_in_job(x: int) -> dict[str, object]:
    env = submitit.JobEnvironment()
    return {"square": x * x, "job_id": env.job_id, "cluster": env.cluster, "host": env.hostname}


def test_submitit_executor_returns_result(slurm_cluster, tmp_path: Path) -> None:
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        name="ffsd-square",
        timeout_min=2,
        cpus_per_task=1,
        mem_gb=1,
        slurm_partition=slurm_cluster.partition,
        slurm_signal_delay_s=15,
        slurm_additional_parameters={"requeue": True},
    )
    job = executor.submit(_square_in_job, 7)
    # Wait with scontrol: without accounting, submitit only notices the result file.
    assert slurm_cluster.wait_job(job.job_id, timeout=60) == "COMPLETED", job.stderr()
    result = job.result()
    assert result["square"] == 49
    assert result["job_id"] == job.job_id
    assert result["cluster"] == "slurm"


class _CountTo(submitit.helpers.Checkpointable):
    """Counts to `total`, one step every `step_s`; its state (`count`) survives a requeue because
    submitit pickles `self` in `checkpoint` when the job gets the preemption signal."""

    def __init__(self, workdir: str, total: int, step_s: float) -> None:
        self.workdir = workdir
        self.total = total
        self.step_s = step_s
        self.count = 0

    def __call__(self) -> dict[str, object]:
        workdir = Path(self.workdir)
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        with open(workdir / "starts.txt", "a") as f:
            f.write(f"{restart} {self.count}\n")
        while self.count < self.total:
            time.sleep(self.step_s)
            self.count += 1
            (workdir / "progress.txt").write_text(str(self.count))
        starts = [tuple(map(int, line.split())) for line in (workdir / "starts.txt").open()]
        return {"count": self.count, "starts": starts}


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_submitit_checkpointable_requeues_on_preemption(slurm_cluster, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    # timeout_min=60: submitit treats a USR2 as a time-out once the job has run for
    # min(0.8 * timeout, timeout - 10 min) (so always, for timeout_min <= 10), and a time-out uses
    # up one of max_num_timeout. A preemption does not, so even max_num_timeout=0 (the default of
    # hydra-submitit-launcher) requeues.
    executor = submitit.AutoExecutor(
        folder=tmp_path / "%j", cluster="slurm", slurm_max_num_timeout=0
    )
    executor.update_parameters(
        name="ffsd-preempt",
        timeout_min=60,
        cpus_per_task=1,
        slurm_partition=slurm_cluster.partition,
    )
    total = 30
    job = executor.submit(_CountTo(str(workdir), total=total, step_s=0.25))

    # Signal only once the callable runs: before submitit installs its handlers (interpreter
    # start-up), SIGTERM would kill the task.
    deadline = time.monotonic() + 30
    while _read_int(workdir / "progress.txt") < 3:
        assert time.monotonic() < deadline, f"job never progressed:\n{slurm_cluster.status()}"
        assert slurm_cluster.job_state(job.job_id) in {"PENDING", "RUNNING", "CONFIGURING"}
        time.sleep(0.2)

    # What SLURM does to a job step on preemption/--signal, and what submitit's own
    # SlurmJob._interrupt() sends: SIGTERM (submitit logs and ignores it), then SIGUSR2 to the job
    # steps. Not `--batch`: that would signal only the sbatch shell, not the srun-launched Python.
    subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True, timeout=30)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)

    # The handler checkpoints, runs `scontrol requeue <id>` and exits; the job comes back
    # (after AuthInfo=cred_expire seconds) with the same id and Restarts=1.
    deadline = time.monotonic() + 45
    while slurm_cluster.restarts(job.job_id) < 1:
        assert time.monotonic() < deadline, f"job not requeued:\n{job.stderr()}"
        time.sleep(0.5)
    assert slurm_cluster.wait_job(job.job_id, timeout=60) == "COMPLETED", job.stderr()

    result = job.result()
    assert result["count"] == total
    (first_restart, first_count), (second_restart, resumed_from) = result["starts"]
    assert (first_restart, first_count) == (0, 0)
    assert second_restart == 1
    assert 3 <= resumed_from < total  # continued from the checkpoint, not from scratch
    assert slurm_cluster.restarts(job.job_id) == 1
    log = job.stdout() or ""  # submitit logs to stdout; both runs append to the same file
    assert "Caught signal SIGUSR2 on" in log and "this job is preempted" in log
    assert f"Requeued job {job.job_id}" in log
