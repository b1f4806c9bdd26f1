"""The model and dataset a checkpoint was trained with, for ``task=eval`` and ``task=export``.

``python launch.py task=eval checkpoint=PATH`` needs no other argument:

* ffsd's own files carry their run's config: ``checkpoints/config.yaml`` beside ``last.pt`` and
  ``model_<deploy>_best.pth`` (the engine writes it), ``last.pt``'s ``config`` entry, or the
  run's ``.hydra/config.yaml``. Its ``model`` and ``dataset`` nodes are taken whole, so a
  protocol's normalisation or a synthetic dataset's size come along.
* The release's files (and bare state_dicts) have no config: the architecture is the one the
  file's ``cfg`` names (the release's names mapped, ``RELEASE_MODEL_NAMES``), else the one whose
  keys and shapes the weights have; the dataset is the first of ``task.infer_datasets`` with the
  classifier's class count and the model's input size.

What was taken from where is logged. ``model=``, ``dataset=`` or ``experiment=`` on the command
line win: nothing is inferred for them, and the weights are checked against them
(:func:`ffsd.tasks.weights.build_network`). The command line's ``model.*``/``dataset.*`` values
(``dataset.root=/data``) apply on top of what was inferred. A config composed in Python (no
Hydra job) is taken as given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ffsd.config import CONF_DIR, ConfigError, group_options
from ffsd.tasks.weights import (
    RELEASE_MODEL_NAMES,
    NetworkCheckpoint,
    identify_architecture,
    read_network_checkpoint,
)
from ffsd.tracking.provenance import override_key
from ffsd.training.checkpoint import STATE_FORMAT, safe_load
from ffsd.training.engine import RUN_CONFIG

log = logging.getLogger("ffsd")

#: The groups a checkpoint can tell.
GROUPS = ("model", "dataset")


def explicit_choices() -> set[str]:
    """The groups of :data:`GROUPS` the command line chose (an experiment preset chooses both)."""
    if not HydraConfig.initialized():
        return set(GROUPS)
    keys = {override_key(str(o)) for o in HydraConfig.get().overrides.task}
    return set(GROUPS) if "experiment" in keys else {g for g in GROUPS if g in keys}


def _value_overrides() -> list[Any]:
    """The command line's ``model.*`` and ``dataset.*`` value overrides, parsed."""
    if not HydraConfig.initialized():
        return []
    parsed = OverridesParser.create().parse_overrides(
        [str(o) for o in HydraConfig.get().overrides.task]
    )
    return [
        o
        for o in parsed
        if not o.is_delete() and "." in o.key_or_group and o.key_or_group.split(".")[0] in GROUPS
    ]


def run_config_of(path: Path) -> tuple[DictConfig, Path] | None:
    """The config of the run ``path`` belongs to, and where it was read; None for other files."""
    beside = path.parent / RUN_CONFIG
    hydra = path.parent.parent / ".hydra" / "config.yaml"
    for candidate in (beside, hydra):
        if candidate.is_file():
            cfg = OmegaConf.load(candidate)
            if isinstance(cfg, DictConfig) and all(g in cfg for g in GROUPS):
                return cfg, candidate
    if path.suffix == ".pt" and path.is_file():  # an older run state: its own config entry
        blob = safe_load(path)
        text = blob.get("config") if isinstance(blob, dict) else None
        if isinstance(blob, dict) and blob.get("format") == STATE_FORMAT and isinstance(text, str):
            cfg = OmegaConf.create(text)
            if all(g in cfg for g in GROUPS):
                return cfg, path
    return None


def _node(cfg: DictConfig, group: str) -> DictConfig:
    # Resolved where it can be within its own run (a value it took from another key); an
    # interpolation that needs this environment (${oc.env:FFSD_DATA,...}) resolves here later.
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg[group], resolve=True))
    except OmegaConfBaseException:
        return OmegaConf.create(OmegaConf.to_container(cfg[group], resolve=False))


def _group_node(group: str, option: str) -> DictConfig:
    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    assert isinstance(node, DictConfig)
    return node


def infer_model(ckpt: NetworkCheckpoint) -> tuple[str, str]:
    """(the ``conf/model`` option of a file without its run's config, why)."""
    models = group_options("model")
    recorded = ckpt.recorded_model
    if recorded is not None:
        name = RELEASE_MODEL_NAMES.get(recorded, recorded)
        if name in models:
            said = f"'{recorded}' = {name}" if name != recorded else f"'{recorded}'"
            return name, f"the file's cfg {said}"
    name = identify_architecture(ckpt)
    if name is not None:
        return name, "the only architecture with the file's keys and shapes"
    raise ConfigError(
        f"model: {ckpt.path} does not say its architecture (cfg: {recorded!r}) and its weights "
        f"fit none of conf/model; add model=<one of: {', '.join(models)}>"
    )


def infer_dataset(ckpt: NetworkCheckpoint, image_size: int, candidates: Sequence[str]) -> str:
    """The first of ``candidates`` with the file's class count and the model's image size."""
    for name in candidates:
        if name not in group_options("dataset"):
            raise ConfigError(
                f"task.infer_datasets={list(candidates)!r}: {name!r} is not a dataset option; "
                f"choose from: {', '.join(group_options('dataset'))}"
            )
        node = _group_node("dataset", name)
        if node.get("num_classes") == ckpt.num_classes and node.get("image_size") == image_size:
            return name
    raise ConfigError(
        f"dataset: {ckpt.path} classifies {ckpt.num_classes} classes ({image_size}x{image_size} "
        f"images) and none of task.infer_datasets={list(candidates)!r} has as many; add "
        f"dataset=<one of: {', '.join(group_options('dataset'))}>"
    )


def apply_checkpoint_settings(
    cfg: DictConfig,
    path: Path,
    network: str,
    infer_datasets: Sequence[str],
    explicit: set[str] | None = None,
) -> NetworkCheckpoint | None:
    """Set ``cfg.model`` and ``cfg.dataset`` the command line did not choose from ``path``.

    Returns the checkpoint when it had to be read for that (a file without its run's config),
    so the caller need not read it again; else None.
    """
    explicit = explicit_choices() if explicit is None else explicit
    need = [g for g in GROUPS if g not in explicit]
    if not need:
        return None
    ckpt = None
    found = run_config_of(path)
    if found is not None:
        run_cfg, where = found
        nodes = {g: _node(run_cfg, g) for g in need}
        said = {g: f"the run's config {where}" for g in need}
    else:
        ckpt = read_network_checkpoint(path, network)
        nodes, said = {}, {}
        if "model" in need:
            name, why = infer_model(ckpt)
            nodes["model"], said["model"] = _group_node("model", name), why
        model = nodes.get("model", cfg.model)
        if "dataset" in need:
            name = infer_dataset(ckpt, int(model.input_size), list(infer_datasets))
            nodes["dataset"] = _group_node("dataset", name)
            said["dataset"] = f"{ckpt.num_classes} classes in the file (task.infer_datasets)"
    with open_dict(cfg):
        for group, node in nodes.items():
            cfg[group] = node
        for o in _value_overrides():
            if o.key_or_group.partition(".")[0] in nodes:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
    for group in need:
        log.info("%s=%s: from %s", group, cfg[group].name, said[group])
    return ckpt
