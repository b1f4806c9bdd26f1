"""Validation of the composed config, before any work starts.

Hydra already rejects an unknown group option (``model=foo``) with the list of valid ones. This
module checks values: each failure names the key, the bad value and what is allowed, and all
failures are reported together. It sits in the task layer because it knows every part of a run
(the trainer's runtime limits, the preemption signals, the dataset and model options).
"""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig

from ffsd.config import Checker, ConfigError, models_for_size
from ffsd.data.tensor_pipeline import PAD_MODES
from ffsd.training.preemption import parse_signal
from ffsd.training.runtime import MALLOPT_MAX_MB


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every bad key, value and the valid choices."""
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
    c.choice("trainer.precision", ("fp32", "bf16"))
    for key in ("trainer.channels_last", "trainer.compile.enabled"):
        if not isinstance(c.get(key), bool):
            c.errors.append(f"{key}={c.get(key)!r} must be true or false")
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

    if c.errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(c.errors))
