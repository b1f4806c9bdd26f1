"""``task=eval task.network=all``: every network, ensemble and teacher of a run state.

A run state (``checkpoints/last.pt``) holds the whole method: every network, a multi-branch
method's gate, attention or ensemble classifier, and the config it was trained with. Rebuilding
the method from that config and loading the state gives back exactly the networks the run had,
so the method's own ``evaluate`` reports what the run's epoch line reported: ``branch{k}/top1``,
``branch_mean/top1``, ``ensemble/top1``, ``teacher/top1`` (ONE's gated teacher, PCL's
peer-ensemble classifier), ``deploy/top1`` and every other metric the method defines
(``shared/baselines-spec.md``, "Metric names").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ffsd.config import ConfigError
from ffsd.methods.build import instantiate_method
from ffsd.training.acceleration import set_numerics
from ffsd.training.checkpoint import STATE_FORMAT, CheckpointError, safe_load

log = logging.getLogger("ffsd")


def read_run_state(path: Path) -> tuple[dict[str, Any], DictConfig]:
    """(the run state at ``path``, the config its run was trained with)."""
    blob = safe_load(path)
    if not isinstance(blob, Mapping) or blob.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"task.network=all evaluates every network of a run state, and {path} is not one "
            "(it holds one network's weights); give checkpoint=<run>/checkpoints/last.pt, or "
            "task.network=auto for this file"
        )
    text = blob.get("config")
    if not isinstance(text, str):
        raise CheckpointError(
            f"{path} is a run state without the config it was trained with; it was written by "
            "an older ffsd: evaluate its networks one by one (task.network=<name>)"
        )
    return dict(blob), OmegaConf.create(text)


def evaluate_run_state(
    cfg: DictConfig, path: Path, loader: Any, num_classes: int, device: torch.device
) -> tuple[dict[str, float], str, int | None]:
    """(every metric of the method's ``evaluate``, the method's ``_target_``, the epoch).

    The method, its networks and options come from the run's own config; the data (and so the
    test set) from ``cfg``.
    """
    blob, run_cfg = read_run_state(path)
    target = str(OmegaConf.select(run_cfg, "distill._target_"))
    try:
        method = instantiate_method(run_cfg, num_classes, device)
    except Exception as err:
        raise CheckpointError(
            f"{path}: the method it was trained with ({target}) cannot be rebuilt here: {err}"
        ) from err
    try:
        method.load_state_dict(blob["method"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit its own method ({target}) with {num_classes} classes "
            f"(dataset={cfg.dataset.name}): {first}"
        ) from err
    # The networks as the run evaluated them, in its layout and precision: the figures are then
    # its epoch line's, not NCHW fp32's rounding of them. A state from before these settings
    # existed ran NCHW fp32.
    applied = set_numerics(
        method,
        channels_last=OmegaConf.select(run_cfg, "trainer.channels_last", default=False),
        nhwc_batch_norm=str(
            OmegaConf.select(run_cfg, "trainer.nhwc_batch_norm", default="precise")
        ),
        precision=str(OmegaConf.select(run_cfg, "trainer.precision", default="fp32")),
    )
    log.info("%s: %s, epoch %s; %s", path, target, blob.get("epoch"), method.describe())
    log.info("as the run evaluated: %s", ", ".join(applied) if applied else "eager fp32")
    return method.evaluate(loader), target, blob.get("epoch")


def format_all(title: str, metrics: Mapping[str, float]) -> str:
    """The metrics of every network, deploy first, then by name; losses beside accuracies.

    Metrics that belong to no network (OKDDip's ``dist``) follow the table, one per line.
    """
    per_net = {k: v for k, v in metrics.items() if "/" in k}
    names = sorted({k.rsplit("/", 1)[0] for k in per_net})
    names.sort(key=lambda n: n != "deploy")
    cols = sorted({k.rsplit("/", 1)[1] for k in per_net}, key=lambda c: (c != "top1", c))
    rows = [[n, *(_cell(metrics.get(f"{n}/{c}"), c) for c in cols)] for n in names]
    head = ["network", *(f"{c} (%)" if c.startswith("top") else c for c in cols)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [title, fmt.format(*head), "  ".join("-" * w for w in widths)]
    rest = [f"{k}: {v:.4f}" for k, v in metrics.items() if "/" not in k]
    return "\n".join(lines + [fmt.format(*r) for r in rows] + rest)


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if column.startswith("top") else f"{value:.4f}"


def write_report(run_dir: Path, path: Path, target: str, epoch: int | None, metrics: dict) -> Path:
    out = run_dir / "eval_all.json"
    report = {"checkpoint": str(path), "method": target, "epoch": epoch, "metrics": metrics}
    out.write_text(json.dumps(report, indent=2))
    return out


def run_all(
    cfg: DictConfig,
    path: Path,
    data: Any,
    device: torch.device,
    batch_size: int,
    run_dir: Path,
    parent: Any = None,
) -> float:
    """Evaluate, print, write ``eval_all.json`` to ``run_dir`` and log it (into a child run of
    ``parent``, the checkpoint's tracked run, if any); returns the deploy top-1."""
    from hydra.utils import instantiate

    metrics, target, epoch = evaluate_run_state(
        cfg, path, data.test_loader(batch_size), data.num_classes, device
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    title = f"every network of {path} ({target}, epoch {epoch}) on {cfg.dataset.name} test"
    print(format_all(f"{title}, {device}", metrics))
    report = write_report(run_dir, path, target, epoch, metrics)
    log.info("wrote %s", report)
    with instantiate(cfg.logger).run(cfg, run_dir, parent) as tracker:
        tracker.log_summary({f"eval/{k}": v for k, v in metrics.items()})
        tracker.log_artifact(report)
    return float(metrics["deploy/top1"])
