"""Run ffsd: ``python launch.py [group=option ...] [key=value ...]``; ``-m`` for sweeps.

Examples::

    python launch.py experiment=quickstart
    python launch.py model=wrn40_2 dataset=cifar100
    python launch.py -m distill.lambda_fusion=1,10,100 trainer.seed=0,1,2
    python launch.py task=eval checkpoint=outputs/DATE/TIME/checkpoints/model_leader_best.pth
    python launch.py task=export checkpoint=modelleader_best.pth
    python launch.py --help

An invalid config, missing or damaged data, an unusable checkpoint, a diverged run (NaN losses),
a file that cannot be written (full disk) or a run directory that another live job holds stops
the run with exit status 1 and its message alone (no traceback; ``HYDRA_FULL_ERROR=1`` shows
it); other errors keep theirs. A command stopped before any work (a config, data, checkpoint or
tracking error) leaves no run directory behind. Ctrl-C exits with status 130 after the engine's
one line saying where it saved.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ffsd.config import ConfigError
from ffsd.data.base import DataNotFoundError
from ffsd.tasks.cleanup import remove_untouched_run_dir
from ffsd.tasks.export import ExportError
from ffsd.tasks.overrides import explain_refused_keys
from ffsd.tracking import TrackingError
from ffsd.training.checkpoint import CheckpointError, OutputWriteError
from ffsd.training.engine import TrainingDiverged
from ffsd.training.preemption import Interrupted
from ffsd.training.run_lock import RunDirBusy

#: Errors whose message says everything a user needs to fix the command.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DataNotFoundError,
    ExportError,
    TrackingError,
    TrainingDiverged,
    OutputWriteError,
    RunDirBusy,
)
#: Errors raised before any work: the run directory Hydra made for the job is removed again
#: when nothing but Hydra's own files are in it (``ffsd.tasks.cleanup``).
BEFORE_ANY_WORK = (ConfigError, CheckpointError, DataNotFoundError, ExportError, TrackingError)


class UsageError(CompactHydraException):
    """Hydra prints a compact exception's message without a traceback, as for a bad override."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # The task node's other keys are its options: bound here, passed to the task as keywords.
    task = instantiate(cfg.task, _partial_=True)
    try:
        return task(cfg)
    except USER_ERRORS as err:
        if isinstance(err, BEFORE_ANY_WORK):
            job = HydraConfig.get().runtime
            remove_untouched_run_dir(Path(job.output_dir), Path(job.cwd))
        raise UsageError(f"{type(err).__name__}: {err}") from err
    except Interrupted:
        raise SystemExit(130) from None  # the engine has logged where it saved
    except KeyboardInterrupt:
        # Ctrl-C before training (or during the final summary): nothing to save, and the
        # traceback would only show where Python happened to be.
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        # Hydra's refusal of a plain `trainer.epoch=3` suggests `+trainer.epoch=3`, which adds a
        # key nothing reads; name the keys the user probably meant after it.
        if stop.code == 1:
            for line in explain_refused_keys(sys.argv[1:]):
                print(f"Error: {line}", file=sys.stderr)
        raise
    finally:
        # At exit the interpreter garbage-collects every object torch, MLflow and their imports
        # made: about 2 s of a short run (benchmarks/README.md, "End to end"). Frozen, they are
        # skipped by those collections; atexit handlers, weakref finalizers and reference-count
        # deallocation (files, temporary directories, MLflow's flushes) run as before.
        gc.freeze()
