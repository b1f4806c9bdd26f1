"""The config tree and its error type: what every layer may know about ``conf/``.

A leaf module (it imports nothing else of ffsd), so that any package can raise
:class:`ConfigError` or list a group's options. Validation of a composed config, which needs
knowledge of the training run, lives in :mod:`ffsd.tasks.validation`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

#: The project's config tree (a source checkout; launch.py composes from it).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def models_for_size(size: int) -> list[str]:
    """Model options whose ``input_size`` is ``size``."""
    out = []
    for name in group_options("model"):
        node = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text()) or {}
        if node.get("input_size") == size:
            out.append(name)
    return out
