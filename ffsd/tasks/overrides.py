"""Command-line keys that are not in the config tree, refused before any work.

Hydra refuses ``trainer.epoch=3`` (no such key) but suggests ``+trainer.epoch=3``, which adds the
key: the run then trains with it silently ignored. A ``+key=value`` is refused here, with the
closest keys of the tree (``difflib``), unless it adds

* a config group option (``+sweep=lambda_grid``): Hydra composes it like any group;
* a Hydra setting (``+hydra.launcher.foo=...``): Hydra's own schema checks those;
* a new component to a registry of components, a node whose entries each name a ``_target_``
  (``+task.exporters.mine._target_=pkg.Mine``: an exporter next to torchscript and onnx).

``++key=value`` (Hydra's force-add) is the way to add any other key on purpose.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from ffsd.config import CONF_DIR

#: How many close keys a refusal suggests, and how close (difflib's ratio) each must be.
SUGGESTIONS = 3
CUTOFF = 0.8


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every node and leaf of ``cfg`` as a dotted key (``trainer``, ``trainer.epochs``, ...)."""
    out: list[str] = []
    for key in cfg:
        name = f"{prefix}{key}"
        out.append(name)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            out += config_keys(node, f"{name}.")
    return out


def _is_group(key: str) -> bool:
    # conf/<group>/ (conf/sweep links to sweeps/); a nested group is written with slashes.
    return (CONF_DIR / key.replace(".", "/")).is_dir()


def _is_component(node: object) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _adds_a_component(cfg: DictConfig, key: str, added: set[str]) -> bool:
    """Whether ``key`` lies in a new entry of a registry: a node whose other entries each name a
    ``_target_``, the new entry naming one too (``task.exporters.mine._target_``)."""
    parts = key.split(".")
    for depth in range(1, len(parts)):  # the shortest prefix that only the additions made
        root = ".".join(parts[:depth])
        node = _node(cfg, root)
        if isinstance(node, DictConfig) and not all(
            f"{root}.{k}" in added for k in config_keys(node) if not _has_children(node, k)
        ):
            continue  # the tree had this node
        parent = _node(cfg, ".".join(parts[: depth - 1]))
        if not isinstance(parent, DictConfig) or f"{root}._target_" not in added:
            return False
        others = [parent._get_node(k) for k in parent if k != parts[depth - 1]]
        return bool(others) and all(_is_component(n) for n in others)
    return False


def _node(cfg: DictConfig, dotted: str) -> object:
    """The node at ``dotted`` as written, interpolations unresolved; None when there is none."""
    node: object = cfg
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _has_children(node: DictConfig, dotted: str) -> bool:
    return isinstance(_node(node, dotted), DictConfig)


def unknown_key_errors(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """One message per ``+key=value`` of ``overrides`` that adds a key the tree does not have."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    adds = [o for o in parsed if o.is_add() and not o.is_force_add()]
    added = {o.key_or_group for o in adds}
    # Suggest leaves the tree had: an added key's new parent nodes are no suggestion.
    known = [k for k in config_keys(cfg) if k not in added and not _has_children(cfg, k)]
    errors = []
    for o in adds:
        key = o.key_or_group
        if key.startswith("hydra") or _is_group(key) or _adds_a_component(cfg, key, added):
            continue
        close = difflib.get_close_matches(key, known, n=SUGGESTIONS, cutoff=CUTOFF)
        hint = f"Did you mean {' or '.join(close)}? " if close else ""
        errors.append(
            f"{o.input_line}: {key} is not a key of the config, so nothing would read it. "
            f"{hint}(`python launch.py --cfg job` prints every key; ++{key}=... adds one on "
            "purpose)"
        )
    return errors


def refuse_unknown_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise :class:`~ffsd.config.ConfigError` listing every unknown ``+key`` of ``overrides``."""
    from ffsd.config import ConfigError

    errors = unknown_key_errors(cfg, overrides)
    if errors:
        raise ConfigError("unknown config key:\n  - " + "\n  - ".join(errors))
