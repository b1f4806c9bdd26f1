"""``task=eval``: one network of a checkpoint on the test split, and its report.

Measures top-k accuracy, per-class top-1, mean cross-entropy and throughput of the network's
logits (the trans-fusion head is not run: see :func:`ffsd.tasks.weights.build_network`), prints a
table and the worst classes, writes ``eval.json`` and ``per_class.csv`` beside the checkpoint
(``task.output_dir``) and logs the metrics and both files through the configured tracker
(``conf/logger``): for a checkpoint of a tracked run, in a child run of that run. The model and
dataset come from the checkpoint unless the command line chooses them
(:mod:`ffsd.tasks.checkpoint_config`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from ffsd.config import ConfigError
from ffsd.data.build import build_data
from ffsd.models.base import LogitsOnly
from ffsd.tasks.checkpoint_config import apply_checkpoint_settings
from ffsd.tasks.evaluate_all import run_all
from ffsd.tasks.validation import validate
from ffsd.tasks.weights import (
    build_network,
    check_network_choice,
    read_network_checkpoint,
    require_checkpoint,
)
from ffsd.tracking.base import TrackedRun
from ffsd.tracking.mlflow_tracker import read_run_record
from ffsd.training.checkpoint import name_tensors
from ffsd.training.runtime import resolve_device, set_threads, tune_host_malloc

log = logging.getLogger("ffsd")


@dataclass
class EvalResult:
    """Metrics of one evaluation and its per-class counts (top-1)."""

    metrics: dict[str, float]
    class_images: list[int]
    class_correct: list[int]

    def class_accuracy(self) -> list[float | None]:
        """Top-1 (%) per class; ``None`` for a class with no test image."""
        return [
            100.0 * c / n if n else None
            for n, c in zip(self.class_images, self.class_correct, strict=True)
        ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_network(
    model: nn.Module,
    loader: Iterable,
    *,
    num_classes: int,
    topk: Sequence[int],
    device: torch.device,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (images -> logits) on every batch of ``loader``.

    Metrics: ``top<k>`` (%), ``ce`` (mean cross-entropy), ``images``, ``seconds`` (wall time,
    data loading included), ``images_per_s`` (``images / seconds``) and ``model_images_per_s``
    (images over the time spent in the forward pass alone).
    """
    model.eval()
    ks = sorted({int(k) for k in topk})
    hits = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    per_class = torch.zeros(num_classes, dtype=torch.int64, device=device)
    per_class_ok = torch.zeros(num_classes, dtype=torch.int64, device=device)
    forward_s = 0.0
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(images)
        _sync(device)
        forward_s += time.perf_counter() - t0
        top = logits.topk(max(ks), dim=1).indices == labels[:, None]
        hits += torch.stack([top[:, :k].any(1).sum() for k in ks]).double()
        ce_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        per_class += torch.bincount(labels, minlength=num_classes)
        per_class_ok += torch.bincount(labels[top[:, 0]], minlength=num_classes)
    seconds = time.perf_counter() - start
    n = int(per_class.sum().item())
    if n == 0:
        raise ValueError("the test loader yielded no images")
    acc = (hits * 100.0 / n).tolist()
    metrics = {f"top{k}": a for k, a in zip(ks, acc, strict=True)}
    metrics |= {
        "ce": ce_sum.item() / n,
        "images": float(n),
        "seconds": seconds,
        "images_per_s": n / max(seconds, 1e-9),
        "model_images_per_s": n / max(forward_s, 1e-9),
    }
    return EvalResult(metrics, per_class.tolist(), per_class_ok.tolist())


def write_per_class(path: Path, result: EvalResult, names: Sequence[str] | None) -> None:
    """``class,name,images,correct,top1`` per class (top1 empty for a class with no image)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "images", "correct", "top1"])
        for c, (n, ok, acc) in enumerate(
            zip(result.class_images, result.class_correct, result.class_accuracy(), strict=True)
        ):
            w.writerow([c, names[c] if names else "", n, ok, "" if acc is None else f"{acc:.4f}"])


def lowest_classes(
    result: EvalResult, names: Sequence[str] | None, count: int
) -> list[dict[str, Any]]:
    """The ``count`` classes with the lowest top-1 (ties by class index)."""
    rows = [
        {"class": c, "name": names[c] if names else "", "images": n, "top1": acc}
        for c, (n, acc) in enumerate(zip(result.class_images, result.class_accuracy(), strict=True))
        if acc is not None
    ]
    return sorted(rows, key=lambda r: (r["top1"], r["class"]))[:count]


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), "  ".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows]


def format_report(
    title: str, metrics: dict[str, float], worst: list[dict[str, Any]], num_classes: int
) -> str:
    """The metrics table and the worst classes, as printed at the end of ``task=eval``."""
    rows = [[f"{k} (%)", f"{v:.2f}"] for k, v in metrics.items() if k.startswith("top")]
    rows.append(["mean loss (CE)", f"{metrics['ce']:.4f}"])
    rows.append(["images", f"{int(metrics['images'])}"])
    rows.append(["images/s (with data loading)", f"{metrics['images_per_s']:.0f}"])
    rows.append(["images/s (forward only)", f"{metrics['model_images_per_s']:.0f}"])
    lines = [title, *_table(rows, ["metric", "value"])]
    if worst:
        lines += ["", f"Worst {len(worst)} of {num_classes} classes by top-1 (all: per_class.csv)"]
        lines += _table(
            [[str(r["class"]), r["name"], str(r["images"]), f"{r['top1']:.2f}"] for r in worst],
            ["class", "name", "images", "top1 (%)"],
        )
    return "\n".join(lines)


def check_topk(topk: Any, num_classes: int, key: str) -> list[int]:
    if not topk or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in topk):
        raise ConfigError(f"{key}={topk!r} must be a non-empty list of integers >= 1")
    ks = sorted(set(topk))
    if 1 not in ks:
        raise ConfigError(
            f"{key}={list(topk)!r} must include 1: top-1 is the headline figure and the "
            "per-class measure"
        )
    if ks[-1] > num_classes:
        raise ConfigError(
            f"{key}={list(topk)!r} asks for top-{ks[-1]} of {num_classes} classes "
            f"(dataset.num_classes); every k must be <= {num_classes}, e.g. {key}=[1]"
        )
    return ks


def beside(path: Path, found: str, asked: str) -> Path:
    """``<checkpoint dir>/eval_<file stem>[_<network>]/``: an evaluation's default directory.

    The network is named when ``task.network`` picked one of a run state's, so evaluations of
    several networks of one ``last.pt`` keep their own files.
    """
    suffix = f"_{found}" if asked != "auto" else ""
    return path.parent / f"eval_{path.stem}{suffix}"


def tracked_run_of(path: Path) -> TrackedRun | None:
    """The tracked run a run's ``checkpoints/<file>`` belongs to (its run directory's record)."""
    return read_run_record(path.parent.parent) if path.parent.name == "checkpoints" else None


def run(
    cfg: DictConfig,
    *,
    network: str,
    topk: Sequence[int],
    batch_size: int,
    worst_classes: int,
    output_dir: str | None = None,
    infer_datasets: Sequence[str] = (),
) -> float:
    """``task=eval`` (conf/task/eval.yaml): evaluate one network of ``cfg.checkpoint``.

    The model and dataset the command line does not choose come from the checkpoint
    (:mod:`ffsd.tasks.checkpoint_config`). The files go to ``output_dir``, by default beside
    the checkpoint; a checkpoint of a tracked run is evaluated in a child run of its MLflow run.
    Returns the top-1 accuracy (for sweeps over checkpoints).
    """
    path = require_checkpoint(cfg, "eval")
    check_network_choice(network, "task.network")
    known = apply_checkpoint_settings(cfg, path, network, list(infer_datasets))
    validate(cfg)
    ks = check_topk(list(topk), int(cfg.dataset.num_classes), "task.topk")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"task.batch_size={batch_size!r} must be an integer >= 1")
    if not isinstance(worst_classes, int) or worst_classes < 0:
        raise ConfigError(f"task.worst_classes={worst_classes!r} must be an integer >= 0")
    device = resolve_device(cfg.trainer.device)
    set_threads(cfg.trainer.threads)
    tune_host_malloc(**cfg.trainer.host_malloc)
    data = build_data(cfg)  # checks the files are there; reads nothing yet
    if network == "all":  # the whole method of a run state, as its epoch line reports it
        run_dir = Path(output_dir) if output_dir else beside(path, "all", "all")
        return run_all(cfg, path, data, device, batch_size, run_dir, tracked_run_of(path))
    ckpt = known or read_network_checkpoint(path, network)
    log.info(ckpt.describe())
    if ckpt.nonfinite:
        log.warning(
            "%s: %d weight tensors of the %s are not finite (NaN or infinite values: %s); the "
            "figures below are those of a broken network",
            path,
            len(ckpt.nonfinite),
            ckpt.network,
            name_tensors(ckpt.nonfinite),
        )
    net = build_network(
        ckpt,
        instantiate(cfg.model.net, _partial_=True),
        model_name=str(cfg.model.name),
        num_classes=data.num_classes,
        dataset_name=str(cfg.dataset.name),
    )
    model = LogitsOnly(net).to(device)
    run_dir = Path(output_dir) if output_dir else beside(path, ckpt.network, network)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # beside a read-only download, say
        raise ConfigError(
            f"task.output_dir={output_dir!r}: the evaluation's files go to {run_dir}, which "
            f"cannot be made ({err.strerror}); set task.output_dir=DIR"
        ) from err
    parent = tracked_run_of(path)
    with instantiate(cfg.logger).run(cfg, run_dir, parent) as tracker:
        result = evaluate_network(
            model,
            data.test_loader(batch_size),
            num_classes=data.num_classes,
            topk=ks,
            device=device,
            progress=bool(cfg.trainer.progress),
        )
        names = getattr(data.test_set, "classes", None)
        worst = lowest_classes(result, names, worst_classes)
        report = {
            "checkpoint": str(path),
            "tracked_run": parent.run_id if parent is not None else None,
            "model": str(cfg.model.name),
            "dataset": str(cfg.dataset.name),
            "split": "test",
            "device": str(device),
            "batch_size": batch_size,
            "inferred": ckpt.inferred(),
            "metrics": result.metrics,
            "worst_classes": worst,
            "per_class": "per_class.csv",
        }
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        write_per_class(run_dir / "per_class.csv", result, names)
        title = (
            f"{ckpt.network} of {path} ({cfg.model.name}, {ckpt.num_classes} classes) on "
            f"{cfg.dataset.name} test, {device}"
        )
        print(format_report(title, result.metrics, worst, data.num_classes))
        log.info("wrote %s and %s", run_dir / "eval.json", run_dir / "per_class.csv")
        tracker.log_summary({f"eval/{k}": v for k, v in result.metrics.items()})
        tracker.log_artifact(run_dir / "eval.json")
        tracker.log_artifact(run_dir / "per_class.csv")
    return float(result.metrics["top1"])
