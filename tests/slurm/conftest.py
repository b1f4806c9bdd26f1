"""The project's single-node SLURM cluster as a session fixture (see cluster.sh next to this file).

`slurm_cluster` brings the cluster up (as root; installing the Debian packages if needed) unless a
healthy one is already running, and takes it down at the end of the session only if it started it.
Set FFSD_SKIP_SLURM=1 to skip every test that uses it. Without root, the tests run against an
already running cluster or are skipped; as root, a cluster that does not come up is a test error.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("cluster.sh")

# JobState values after which a job will not run again (a requeued job goes back to PENDING).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class SlurmCluster:
    """What tests need to know about the running cluster, and job-state helpers without sacct
    (accounting is off: `sacct` fails, so submitit's own job.state stays UNKNOWN)."""

    partition: str
    node: str
    state_dir: Path
    conf: Path
    script: Path
    started_here: bool

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once slurmctld has forgotten the job: MinJobAge)."""
        out = _run("scontrol", "show", "job", "--oneliner", str(job_id))
        if out.returncode != 0:
            return {}
        first = out.stdout.splitlines()[0] if out.stdout else ""
        return dict(re.findall(r"(\w+)=(\S*)", first))

    def job_state(self, job_id: str) -> str | None:
        return self.job_info(job_id).get("JobState")

    def restarts(self, job_id: str) -> int:
        return int(self.job_info(job_id).get("Restarts", "0"))

    def wait_job(self, job_id: str, timeout: float = 60, poll_s: float = 0.5) -> str:
        """Wait until the job reaches a final state and return it (e.g. "COMPLETED")."""
        return self.wait_state(job_id, FINAL_STATES, timeout=timeout, poll_s=poll_s)

    def wait_state(
        self,
        job_id: str,
        states: set[str] | frozenset[str],
        timeout: float = 60,
        poll_s: float = 0.5,
    ) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll_s)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f} s (last state: {state})\n"
            + _run("scontrol", "show", "job", str(job_id)).stdout
        )

    def status(self) -> str:
        out = _run(str(self.script), "status")
        return out.stdout + out.stderr


def _healthy() -> bool:
    try:
        return _run(str(SCRIPT), "status", timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.environ.get("FFSD_SKIP_SLURM") == "1":
        pytest.skip("FFSD_SKIP_SLURM=1")
    state_dir = Path(os.environ.get("FFSD_SLURM_DIR", "/tmp/ffsd-slurm"))
    conf = state_dir / "etc" / "slurm.conf"
    saved_conf = os.environ.get("SLURM_CONF")
    # sbatch/squeue/scontrol, submitit and the jobs themselves (sbatch exports the environment).
    os.environ["SLURM_CONF"] = str(conf)

    started = False
    if not _healthy():
        if os.geteuid() != 0:
            pytest.skip(
                "no SLURM cluster running and not root: run `sudo tests/slurm/cluster.sh up`"
            )
        t0 = time.monotonic()
        up = subprocess.run(
            [str(SCRIPT), "up"], capture_output=True, text=True, timeout=900, check=False
        )
        if up.returncode != 0:
            pytest.fail(
                f"`{SCRIPT} up` failed (rc={up.returncode}):\n{up.stdout}\n{up.stderr}",
                pytrace=False,
            )
        started = True
        print(f"slurm cluster up in {time.monotonic() - t0:.1f} s")

    text = conf.read_text()
    partition = re.search(r"^PartitionName=(\S+)", text, re.M)
    node = re.search(r"^NodeName=(\S+)", text, re.M)
    assert partition and node, f"no partition/node in {conf}"
    cluster = SlurmCluster(
        partition=partition.group(1),
        node=node.group(1),
        state_dir=state_dir,
        conf=conf,
        script=SCRIPT,
        started_here=started,
    )
    try:
        yield cluster
    finally:
        if started:
            subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=120, check=False)
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf
