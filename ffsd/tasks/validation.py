"""Validation of the composed config, before any work starts.

Hydra already rejects an unknown group option (``model=foo``) with the list of valid ones. This
module checks values: each failure names the key, the bad value and what is allowed, and all
failures are reported together. It sits in the task layer because it knows every part of a run
(the trainer's runtime limits, the preemption signals, the dataset and model options).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ffsd.config import Checker, ConfigError, models_for_size
from ffsd.data.base import DataModule
from ffsd.data.tensor_pipeline import PAD_MODES
from ffsd.training.acceleration import CHANNELS_LAST_CHOICES, NHWC_BATCH_NORMS, PRECISIONS
from ffsd.training.preemption import parse_signal
from ffsd.training.runtime import MALLOPT_MAX_MB


def validate(cfg: DictConfig, *, this_machine: bool = True) -> None:
    """Raise :class:`ConfigError` naming every bad key, value and the valid choices.

    ``this_machine=False``: the job will run elsewhere (a sweep's SLURM job, validated on the
    submitting node), so what only its machine can tell (is there a GPU?) is left to the job.
    """
    c = Checker(cfg)
    # trainer
    c.number("trainer.epochs", integer=True, low=1)
    c.number("trainer.batch_size", integer=True, low=1)
    c.number("trainer.test_batch_size", integer=True, low=1)
    c.number("trainer.seed", integer=True, low=0)
    c.number("trainer.eval_every", integer=True, low=1)
    c.number("trainer.log_every", integer=True, low=1)
    device = c.get("trainer.device")
    if not (
        isinstance(device, str)
        and (device in ("auto", "cpu", "cuda") or device.startswith("cuda:"))
    ):
        c.errors.append(
            f"trainer.device={device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N"
        )

    for key in ("trainer.host_malloc.mmap_threshold_mb", "trainer.host_malloc.trim_threshold_mb"):
        if c.get(key) is not None:
            c.number(key, integer=True, low=1, high=MALLOPT_MAX_MB)
    c.choice("trainer.precision", tuple(PRECISIONS))
    c.choice("trainer.nhwc_batch_norm", NHWC_BATCH_NORMS)
    c.choice("trainer.channels_last", CHANNELS_LAST_CHOICES)
    c.boolean("trainer.compile.enabled")
    c.choice("dataset.pipeline", ("tensor", "dataloader"))
    if "pad_mode" in (c.get("dataset") or {}):  # CIFAR's key; other datasets have no padding
        c.choice("dataset.pad_mode", PAD_MODES)
    protocol = c.get("protocol.name")
    if protocol not in (None, "ffsd") and c.get("dataset.name") not in ("cifar10", "cifar100"):
        # A reference protocol sets CIFAR's padding and normalisation (conf/protocol/*.yaml).
        c.errors.append(
            f"protocol={protocol} reproduces a CIFAR reference protocol (padding, normalisation) "
            f"but dataset={c.get('dataset.name')}; use dataset=cifar100 (or cifar10), or "
            "protocol=ffsd"
        )
    target = c.get("dataset._target_")
    if c.get("dataset.pipeline") == "tensor" and target:
        cls = get_class(target)
        if not getattr(cls, "supports_tensor_pipeline", False):
            c.errors.append(
                f"dataset.pipeline='tensor' is not available for dataset={c.get('dataset.name')} "
                "(its images are not held in memory); choose: dataloader"
            )
    # scale-out (ffsd.training.distributed, ffsd.training.preemption)
    c.choice("trainer.distributed.backend", ("auto", "nccl", "gloo"))
    if c.get("trainer.distributed.backend") == "nccl" and device == "cpu":
        c.errors.append(
            "trainer.distributed.backend='nccl' needs CUDA but trainer.device='cpu'; "
            "choose one of: auto, gloo"
        )
    if not isinstance(c.get("trainer.sync_bn"), bool):
        c.errors.append(f"trainer.sync_bn={c.get('trainer.sync_bn')!r} must be true or false")
    try:
        parse_signal(c.get("trainer.preempt_signal"))
    except ValueError as err:
        c.errors.append(
            f"trainer.preempt_signal={c.get('trainer.preempt_signal')!r} is not valid ({err}); "
            "give a signal name such as USR2, USR1 or TERM, or null to turn it off"
        )

    # distill: each method checks its own keys (OnlineMethod.option_errors)
    target = c.get("distill._target_")
    if target:
        c.errors += get_class(target).option_errors(cfg, "distill")

    # dataset
    c.number("dataset.num_classes", integer=True, low=2)
    c.number("dataset.image_size", integer=True, low=8)
    topk = c.get("dataset.topk")
    num_classes = c.get("dataset.num_classes")
    if not topk or not all(isinstance(k, int) and k >= 1 for k in topk):
        c.errors.append(f"dataset.topk={topk!r} must be a non-empty list of integers >= 1")
    elif isinstance(num_classes, int) and max(topk) > num_classes:
        c.errors.append(
            f"dataset.topk={list(topk)!r} asks for top-{max(topk)} of {num_classes} classes; "
            f"every k must be <= dataset.num_classes"
        )

    # model vs data
    size, image = c.get("model.input_size"), c.get("dataset.image_size")
    if isinstance(size, int) and isinstance(image, int) and size != image:
        fits = models_for_size(image)
        c.errors.append(
            f"model={c.get('model.name')} is built for {size}x{size} images but "
            f"dataset={c.get('dataset.name')} has {image}x{image}; models for {image}x{image}: "
            f"{', '.join(fits) if fits else 'none'}"
        )

    _check_runtime(c, this_machine)
    _check_optimizers(c)
    _check_schedule(c)

    if c.errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(c.errors))


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_runtime(c: Checker, this_machine: bool = True) -> None:
    """Threads, the GPU, the output directory, resume and stop-signal options."""
    if c.get("trainer.threads") is not None:
        c.number("trainer.threads", integer=True, low=1)
    device = c.get("trainer.device")
    if this_machine and isinstance(device, str) and device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.partition(":")[2]
        if count == 0:
            c.errors.append(
                f"trainer.device={device!r} but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); choose: cpu, or auto (CUDA when there "
                "is one)"
            )
        elif index and (not index.isdigit() or int(index) >= count):
            c.errors.append(
                f"trainer.device={device!r} is not a GPU of this machine; choose cuda or "
                f"cuda:0 to cuda:{count - 1}"
            )
    c.choice("trainer.resume_changes", ("refuse", "allow"))
    signals = c.get("trainer.stop_signals")
    if signals is not None:
        names = list(signals) if OmegaConf.is_list(signals) else [signals]
        for name in names:
            try:
                parse_signal(name)
            except ValueError as err:
                c.errors.append(
                    f"trainer.stop_signals={names!r}: {name!r} is not valid ({err}); give a "
                    "list of signal names such as [TERM, INT], or [] to turn it off"
                )
    try:
        out = c.get("trainer.output_dir")
    except Exception:  # ${hydra:...} outside a Hydra job: nothing to check yet
        out = None
    if isinstance(out, str) and out:
        problem = _unwritable(Path(out))
        if problem:
            c.errors.append(
                f"trainer.output_dir={out!r} cannot be written: {problem}; choose a directory "
                "you can write to"
            )


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created or written, from its nearest existing ancestor."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def _check_optimizers(c: Checker) -> None:
    """Every optimizer's learning rate, momentum and weight decay."""
    optim = c.get("optim")
    if not isinstance(optim, DictConfig):
        return
    for name in optim:
        key = f"optim.{name}"
        lr = c.get(f"{key}.lr")
        if not _positive_number(lr):
            c.errors.append(f"{key}.lr={lr!r} is not allowed: must be a number > 0")
        for option in ("momentum", "weight_decay"):
            value = c.get(f"{key}.{option}")
            if value is None:
                continue
            if (
                not isinstance(value, numbers.Real)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                c.errors.append(f"{key}.{option}={value!r} is not allowed: must be a number >= 0")


def _check_schedule(c: Checker) -> None:
    """Milestones inside the run and increasing, a positive gamma, a warm-up within the run."""
    epochs = c.get("trainer.epochs")
    epochs = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    node = c.get("schedule")
    if not isinstance(node, DictConfig):
        return
    if "milestones" in node:
        ms = c.get("schedule.milestones")
        shown = OmegaConf.to_container(ms) if OmegaConf.is_list(ms) else ms
        if not OmegaConf.is_list(ms) or not all(
            isinstance(m, int) and not isinstance(m, bool) for m in ms
        ):
            c.errors.append(f"schedule.milestones={shown!r} must be a list of integers")
        elif any(b <= a for a, b in zip(ms, list(ms)[1:], strict=False)):
            c.errors.append(
                f"schedule.milestones={shown!r} is not allowed: must be strictly increasing"
            )
        elif any(m < 1 for m in ms) or (epochs is not None and any(m > epochs for m in ms)):
            c.errors.append(
                f"schedule.milestones={shown!r} is not allowed with trainer.epochs={epochs}: "
                f"each must be between 1 and {epochs} (milestone m lowers the rate from epoch "
                "m + 1 on; one beyond the run never applies)"
            )
    if "gamma" in node:
        gamma = c.get("schedule.gamma")
        if not _positive_number(gamma):
            c.errors.append(f"schedule.gamma={gamma!r} is not allowed: must be a number > 0")
    if "min_factor" in node:
        c.number("schedule.min_factor", low=0)
    if "epochs" in node:
        c.number("schedule.epochs", integer=True, low=1)
    if "warmup_epochs" in node:
        warm = c.get("schedule.warmup_epochs")
        if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
            c.errors.append(
                f"schedule.warmup_epochs={warm!r} is not allowed: must be an integer >= 0"
            )
        elif epochs is not None and warm > epochs:
            c.errors.append(
                f"schedule.warmup_epochs={warm} is not allowed with trainer.epochs={epochs}: "
                f"the warm-up must fit in the run (at most {epochs})"
            )


def validate_data(cfg: DictConfig, data: DataModule, world_size: int = 1) -> None:
    """Checks that need the built data module (its size is known only then); cheap.

    A batch larger than a process's share of the training set would make every epoch one short
    batch, silently.
    """
    n = len(data.train_set)
    share = -(-n // max(int(world_size), 1))
    batch = int(cfg.trainer.batch_size)
    if batch > share:
        per = f", {share} per process over {world_size} processes" if world_size > 1 else ""
        raise ConfigError(
            "invalid configuration:\n  - "
            f"trainer.batch_size={batch} is larger than the training set (dataset="
            f"{data.name}: {n} images{per}); choose at most {share}"
        )
