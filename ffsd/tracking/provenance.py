"""Where a run came from: its Hydra job (sweep, job number, overrides), code and machine.

Trackers record these so that a result can be traced back to the command, the commit and the
host that produced it. Everything here is read-only and cheap; nothing needs a tracking backend.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: The source tree ffsd runs from (a git checkout in development and on clusters).
SOURCE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class HydraJob:
    """The parts of ``hydra.*`` a run is identified by; empty outside a Hydra app."""

    launch_dir: Path
    sweep_dir: Path | None = None
    job_num: int | None = None
    overrides: list[str] = field(default_factory=list)
    override_dirname: str = ""
    output_dir: Path | None = None
    job_name: str | None = None
    preset: str | None = None
    #: ``hydra.runtime.choices`` without Hydra's own groups: the option picked in each group.
    choices: dict[str, str] = field(default_factory=dict)

    def swept_overrides(self) -> list[str]:
        """This job's overrides of the keys its sweep varies (``distill.lambda_fusion=10``)."""
        if self.sweep_dir is None:
            return []
        swept = swept_keys(self.sweep_dir / "multirun.yaml")
        return [o for o in self.overrides if override_key(o) in swept]


def hydra_job(cfg: DictConfig | None = None) -> HydraJob:
    """The Hydra job of ``cfg`` (a config holding ``hydra``), else of the running Hydra job.

    Outside a Hydra app (tests, the Python API) the launch directory is the working directory.
    """
    node = None
    if cfg is not None and "hydra" in cfg:
        node = cfg.hydra
    elif HydraConfig.initialized():
        node = HydraConfig.get()
    if node is None:
        return HydraJob(launch_dir=Path.cwd())
    launch_dir = Path(OmegaConf.select(node, "runtime.cwd", default=None) or Path.cwd())
    multirun = str(OmegaConf.select(node, "mode", default="")).endswith("MULTIRUN")
    sweep_dir = None
    if multirun:
        sweep = OmegaConf.select(node, "sweep.dir", default=None)
        sweep_dir = (launch_dir / str(sweep)).resolve() if sweep else None
    num = OmegaConf.select(node, "job.num", default=None)
    out = OmegaConf.select(node, "runtime.output_dir", default=None)
    choices = OmegaConf.select(node, "runtime.choices", default=None) or {}
    return HydraJob(
        launch_dir=launch_dir,
        sweep_dir=sweep_dir,
        job_num=int(num) if multirun and num is not None else None,
        overrides=[str(o) for o in OmegaConf.select(node, "overrides.task", default=[]) or []],
        override_dirname=str(OmegaConf.select(node, "job.override_dirname", default="") or ""),
        output_dir=Path(out) if out else None,
        job_name=OmegaConf.select(node, "job.name", default=None),
        preset=OmegaConf.select(node, "runtime.choices.experiment", default=None),
        choices={
            str(k): str(v)
            for k, v in choices.items()
            if v is not None and not str(k).startswith("hydra")
        },
    )


def sweep_arguments(config: DictConfig) -> list[str]:
    """What Hydra's basic sweeper expands: ``hydra.sweeper.params``, then the command line."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    return arguments + [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]


def override_key(override: str) -> str:
    """``+sweep=x`` -> ``sweep``; ``distill.lambda_div=1e-5`` -> ``distill.lambda_div``."""
    return override.partition("=")[0].lstrip("+~")


def swept_keys(multirun_yaml: Path) -> set[str]:
    """Keys a sweep varies, from the ``multirun.yaml`` Hydra writes in its sweep directory.

    A key set to one value on the command line after a sweep file varied it is not swept.
    """
    try:
        config = OmegaConf.load(multirun_yaml)
        parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    except (OSError, OmegaConfBaseException, HydraException):
        return set()
    last = {override_key(o.input_line): o.is_sweep_override() for o in parsed}
    return {k for k, swept in last.items() if swept}


@functools.cache
def git_state(path: Path = SOURCE_DIR) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout holding ``path``; ``("unknown", None)`` outside git.

    Dirty means tracked files differ from the commit (untracked files are ignored).
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


def world_size() -> int:
    """Processes in the job: the initialised process group's size, else torchrun's variable."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def machine() -> dict[str, str]:
    """Host name and, under SLURM, the job id (and array job/task when submitit uses arrays)."""
    out = {"hostname": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        out["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        out["slurm_array"] = (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        )
    return out


@functools.cache
def pip_freeze() -> str:
    """``pip freeze`` of this interpreter; the installed distributions when pip is missing."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "freeze"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return res.stdout
    except (OSError, subprocess.SubprocessError):
        dists = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}
        return "# pip unavailable: installed distributions\n" + "\n".join(sorted(dists)) + "\n"
