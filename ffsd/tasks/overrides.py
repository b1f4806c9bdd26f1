"""Command-line keys that are not in the config tree, refused before any work.

Hydra refuses ``trainer.epoch=3`` (no such key) but suggests ``+trainer.epoch=3``, which adds the
key: the run then trains with it silently ignored. A ``+key=value`` is refused here, with the
closest keys of the tree (``difflib``), unless it adds

* a config group option (``+sweep=lambda_grid``): Hydra composes it like any group;
* a Hydra setting (``+hydra.launcher.foo=...``): Hydra's own schema checks those;
* a new component to a registry of components, a node whose entries each name a ``_target_``
  (``+task.exporters.mine._target_=pkg.Mine``: an exporter next to torchscript and onnx).

``++key=value`` (Hydra's force-add) is the way to add any other key on purpose.

A plain ``trainer.epoch=3`` never reaches ffsd: Hydra's composition refuses it, and its message
suggests the ``+`` that would add a key nothing reads. :func:`explain_refused_keys` runs after
such a refusal (launch.py) and names the closest keys instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
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


def _leaves(cfg: DictConfig) -> list[str]:
    """Every leaf of ``cfg`` as a dotted key: what a suggestion may name."""
    return [k for k in config_keys(cfg) if not _has_children(cfg, k)]


def unknown_key_errors(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """One message per ``+key=value`` of ``overrides`` that adds a key the tree does not have."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    adds = [o for o in parsed if o.is_add() and not o.is_force_add()]
    added = {o.key_or_group for o in adds}
    # Suggest leaves the tree had: an added key's new parent nodes are no suggestion.
    known = [k for k in _leaves(cfg) if k not in added]
    errors = []
    for o in adds:
        key = o.key_or_group
        if key.startswith("hydra") or _names_a_group(o) or _adds_a_component(cfg, key, added):
            continue
        errors.append(
            f"{o.input_line}: {key} is not a key of the config, so nothing would read it. "
            f"{_closest(key, known)}(`python launch.py --cfg job` prints every key; "
            f"++{key}=... adds one on purpose)"
        )
    return errors


def _names_a_group(o: Override) -> bool:
    """``group=option`` or ``group@package=option`` (Hydra's parser keeps the package apart)."""
    return _is_group(o.key_or_group)


def _sets_a_key(o: Override) -> bool:
    """A plain ``key=value`` (no ``+``, ``++`` or ``~``) of a config key, not a group or Hydra's."""
    return not (
        o.is_add()
        or o.is_force_add()
        or o.is_delete()
        or o.key_or_group.startswith("hydra")
        or _names_a_group(o)
    )


def _closest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=SUGGESTIONS, cutoff=CUTOFF)
    return f"Did you mean {' or '.join(close)}? " if close else ""


def missing_key_errors(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """One message per plain ``key=value`` of ``overrides`` whose key ``cfg`` does not have."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    known = _leaves(cfg)
    return [
        f"{o.input_line}: {o.key_or_group} is not a key of the config. "
        f"{_closest(o.key_or_group, known)}(`python launch.py --cfg job` prints every key; "
        f"Hydra's +{o.key_or_group}=... would add a key that nothing reads)"
        for o in parsed
        if _sets_a_key(o) and _node(cfg, o.key_or_group) is None
    ]


def _one_choice(o: Override) -> str:
    """A group override with a single option: a swept group (``distill=ffsd,dml``) its first."""
    if not o.is_sweep_override():
        return o.input_line
    first = next(iter(o.sweep_string_iterator()))
    return f"{'+' if o.is_add() else ''}{o.key_or_group}={first}"


def explain_refused_keys(argv: Sequence[str]) -> list[str]:
    """After Hydra refused the command ``launch.py *argv``: a message for each plain
    ``key=value`` whose key is not in the config tree its group choices compose.

    Empty when every such key exists (Hydra refused something else) or when the tree cannot be
    composed (a group option that does not exist: Hydra's own message names the choices).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    try:
        args = get_args_parser().parse_args(list(argv))
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        plain = [o.input_line for o in parsed if _sets_a_key(o)]
        if not plain:
            return []
        groups = [_one_choice(o) for o in parsed if _names_a_group(o)]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(args.config_name or "config", overrides=groups)
        return missing_key_errors(cfg, plain)
    except Exception:  # a hint only: Hydra has already said why it refused the command
        return []


def refuse_unknown_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise :class:`~ffsd.config.ConfigError` listing every unknown ``+key`` of ``overrides``."""
    from ffsd.config import ConfigError

    errors = unknown_key_errors(cfg, overrides)
    if errors:
        raise ConfigError("unknown config key:\n  - " + "\n  - ".join(errors))
