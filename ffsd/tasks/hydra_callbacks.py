"""Hydra callbacks run by the launching process (``hydra.callbacks`` in ``conf/config.yaml``).

:class:`RefuseUnknownKeys` stops a command whose ``+key=value`` adds a key that is not in the
config tree (``+trainer.epoch=3``: nothing would read it), before any directory is made
(:mod:`ffsd.tasks.overrides`).

:class:`SweepNeedsMultirun` stops ``python launch.py +sweep=x`` without ``-m``, which would
otherwise train one job with the default values instead of the sweep.

:class:`ValidateJobs` validates every job's config before the first job starts (or is
submitted).

:class:`PrepareTracking` creates what a sweep's jobs will log to (the tracking store and its
experiments) once, before any job starts: many jobs starting together on SLURM would otherwise
race to create the same MLflow experiment. It composes each job's config the way Hydra's basic
sweeper will, so a sweep over presets with a different experiment each is prepared whole. A
sweeper whose jobs cannot be listed up front (ranges, optimisers) gets the sweep's base config
prepared; its jobs still create what is missing themselves, tolerating each other.

Hydra turns an exception raised in a callback into a warning and carries on, so a callback that
must stop the launch (an unreachable tracking server: no job would get far) exits the process
with ``SystemExit`` and the message instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ffsd.tracking.provenance import sweep_arguments

log = logging.getLogger("ffsd")


def sweep_job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job the basic sweeper will launch for ``config``.

    Raises ``HydraException`` for sweeps it cannot list (e.g. ``interval(0, 1)``).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_configs(config: DictConfig) -> Iterator[DictConfig]:
    """Each job's composed config; the sweep's own config when the jobs cannot be listed."""
    basic = str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith(
        "BasicSweeper"
    )
    try:
        jobs = sweep_job_overrides(config) if basic else None
    except HydraException as err:
        log.info("sweep jobs cannot be listed in advance (%s); preparing its base config", err)
        jobs = None
    if jobs is None:
        yield config
        return
    loader = GlobalHydra.instance().config_loader()
    for overrides in jobs:
        yield loader.load_sweep_config(config, overrides)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun sweeps (``key=a,b`` on the command line or in ``+sweep=``)."""
    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


class ValidateJobs(Callback):
    """``on_multirun_start``: :func:`ffsd.tasks.validation.validate` on every job's config.

    Every invalid job is named (number, swept values, each problem) and none is launched, where
    otherwise job #1's bad value would be found after job #0 trained to the end, and on SLURM
    every job would be submitted. A launcher other than Hydra's basic one runs the jobs
    elsewhere (SLURM): what only their machine can tell (a GPU) is left to the jobs.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ffsd.config import ConfigError
        from ffsd.tasks.validation import validate

        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        keys = swept_keys(config)
        failures = []
        for num, cfg in enumerate(job_configs(config)):
            try:
                validate(cfg, this_machine=launcher.endswith("BasicLauncher"))
            except ConfigError as err:
                if cfg is config:  # jobs that cannot be listed: their common config
                    failures.append(f"the sweep's config: {err}")
                    continue
                task = OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []
                values = [o for o in task if o.split("=", 1)[0].lstrip("+~") in keys]
                failures.append(f"job #{num} ({' '.join(values)}): {err}")
        if failures:
            raise SystemExit("Error: " + "\n".join(failures) + "\nNo job was launched.")


class PrepareTracking(Callback):
    """``on_multirun_start``: ``tracker.prepare(job_cfg)`` for every job of the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ffsd.config import ConfigError
        from ffsd.tracking.mlflow_tracker import TrackingError

        try:
            for cfg in job_configs(config):
                logger = OmegaConf.select(cfg, "logger", default=None)
                if logger is not None:
                    instantiate(logger).prepare(cfg)
        except (TrackingError, ConfigError) as err:
            raise SystemExit(f"Error: {err}\nNo job was launched.") from err


class SweepNeedsMultirun(Callback):
    """``on_run_start``: a sweep definition (``+sweep=...``) in a single run is a mistake."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = OmegaConf.select(config, "hydra.runtime.choices.sweep", default=None)
        if sweep is not None:
            raise SystemExit(
                f"Error: +sweep={sweep} defines a sweep (sweeps/{sweep}.yaml): run it with -m, "
                f"e.g. python launch.py -m +sweep={sweep}"
            )


class RefuseUnknownKeys(Callback):
    """``on_run_start``/``on_multirun_start``: refuse a ``+key`` that is not in the config tree.

    Before Hydra makes the run (or sweep) directory, so a refused command leaves nothing behind.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        from ffsd.config import ConfigError
        from ffsd.tasks.overrides import refuse_unknown_keys

        try:
            refuse_unknown_keys(config, OmegaConf.select(config, "hydra.overrides.task") or [])
        except ConfigError as err:
            raise SystemExit(f"Error: {err}") from err
