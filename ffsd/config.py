"""The config tree and its error type: what every layer may know about ``conf/``.

A leaf module (it imports nothing else of ffsd), so that any package can raise
:class:`ConfigError` or list a group's options. Validation of a composed config, which needs
knowledge of the training run, lives in :mod:`ffsd.tasks.validation`.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

#: The project's config tree (a source checkout; launch.py composes from it).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ``${ffsd.options:model}`` -> "densenet40, googlenet, ...": the help text (``hydra.help`` in
# conf/config.yaml) lists each group's options from conf/ itself, so it never lags behind.
OmegaConf.register_new_resolver(
    "ffsd.options", lambda group: ", ".join(group_options(str(group))), replace=True
)

# ``${ffsd.pid:}`` -> this process's id, in the default run and sweep directories
# (conf/config.yaml): two jobs started in the same second get directories of their own. Cached
# like Hydra's ``${now:}``, whose cache Hydra copies into each job of a sweep (SLURM's too), so
# every job sees the launching process's value.
OmegaConf.register_new_resolver("ffsd.pid", os.getpid, use_cache=True, replace=True)


def models_for_size(size: int) -> list[str]:
    """Model options whose ``input_size`` is ``size``."""
    out = []
    for name in group_options("model"):
        node = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text()) or {}
        if node.get("input_size") == size:
            out.append(name)
    return out


def _same_choice(value: Any, choice: Any) -> bool:
    # bool is an int: true must not pass for 1, nor 1 for true; 0 and 0.0 are the same number.
    if isinstance(value, bool) or isinstance(choice, bool):
        return type(value) is type(choice) and value == choice
    if isinstance(value, numbers.Real) and isinstance(choice, numbers.Real):
        return value == choice
    return type(value) is type(choice) and value == choice


class Checker:
    """Collects every problem of a config as "key=value ... allowed values" lines.

    Used by :func:`ffsd.tasks.validation.validate` and by each method's ``option_errors`` (its
    own ``distill.*`` keys), so every message has the same shape.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.errors: list[str] = []

    def get(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, key, throw_on_missing=False, default=None)

    def number(
        self, key: str, *, integer: bool = False, low=None, strict_low=None, high=None
    ) -> None:
        value = self.get(key)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not (
            isinstance(value, bool)
        )
        if not ok_type:
            self.errors.append(f"{key}={value!r} must be {kind}")
            return
        if low is not None and value < low:
            self.errors.append(f"{key}={value!r} is not allowed: must be >= {low}")
        if strict_low is not None and value <= strict_low:
            self.errors.append(f"{key}={value!r} is not allowed: must be > {strict_low}")
        if high is not None and value > high:
            self.errors.append(f"{key}={value!r} is not allowed: must be <= {high}")

    def choice(self, key: str, choices: list[Any] | tuple[Any, ...]) -> None:
        value = self.get(key)
        if not any(_same_choice(value, c) for c in choices):
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            self.errors.append(f"{key}={value!r} is not valid; choose one of: {shown}")

    def boolean(self, key: str) -> None:
        if not isinstance(self.get(key), bool):
            self.errors.append(f"{key}={self.get(key)!r} must be true or false")
