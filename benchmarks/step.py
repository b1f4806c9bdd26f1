"""Throughput of FFSD training: the full iteration on data in memory, and whole epochs with input.

Prints one JSON line per measurement, each with the options and the machine it ran on:

* ``"bench": "step"``: images/s of ``method.step`` (all networks, losses, one backward, every
  optimizer) on a batch already on the device, median over ``--steps`` timed steps.
* ``"bench": "epoch"``: images/s of a training epoch of ``--epoch-images`` CIFAR-shaped images
  through the real data module (``--pipeline tensor``: batches cut and augmented as tensors on the
  device; ``dataloader``: torchvision's per-image PIL transforms in DataLoader workers), its
  overhead over the same number of steps on data in memory, and the pipeline's time alone.
* ``--release-shaped``: the release's iteration (tests/test_method.py's reference) instead of
  ffsd's, as a baseline on the same machine.

Examples::

    python benchmarks/step.py --model resnet32 --batch-size 128
    python benchmarks/step.py --model wrn40_2 --batch-size 64 --channels-last --epoch
    python benchmarks/step.py --model resnet32 --device cuda --precision bf16 --compile --epoch \
        --epoch-images 50000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ffsd  # noqa: E402
from ffsd.training.acceleration import accelerate  # noqa: E402
from ffsd.training.runtime import tune_host_malloc  # noqa: E402


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compose(args: argparse.Namespace, dataset: str, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    # FFSD counts its students, ONE its branches, the K-network methods their networks.
    count = {"ffsd": "num_students", "one": "num_branches"}.get(args.method, "num_networks")
    overrides = [
        f"model={args.model}",
        f"dataset={dataset}",
        f"distill={args.method}",
        f"distill.{count}={args.students}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.output_dir=/unused",
        *extra,
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def build(args: argparse.Namespace, cfg, num_classes: int):
    torch.manual_seed(0)
    method = ffsd.build_method(cfg, num_classes, args.device)
    applied = accelerate(
        method,
        channels_last=args.channels_last,
        precision=args.precision,
        compile={"enabled": True, "mode": args.compile_mode} if args.compile else None,
    )
    return method, applied


def bench_step(args: argparse.Namespace) -> dict:
    cfg = compose(args, "synthetic", ["dataset.num_classes=100"])
    method, applied = build(args, cfg, 100)
    dev = method.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(100, (args.batch_size,), generator=g).to(dev)
    if method.num_views > 1:  # one independently augmented view per network (KDCL)
        x = torch.stack([x.roll(v, 0) for v in range(method.num_views)])
    method.begin_epoch(6)
    if args.release_shaped:
        # The release's iteration, as tests/test_method.py writes it to check ffsd against:
        # a backward and an optimizer step per loss, and a .item() per loss as its logging does.
        from tests.test_method import Reference

        reference = Reference(method)

        def step() -> dict:
            return {"loss": torch.tensor(reference.step(x, y, 6, read_losses=True))}
    else:

        def step() -> dict:
            return method.step(x, y, 6)

    for _ in range(args.warmup):
        step()
    sync(dev)
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t = time.perf_counter()
        terms = step()
        sync(dev)
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert all(torch.isfinite(v).all() for v in terms.values())
    step_s = statistics.median(times)
    return {
        "bench": "step",
        "iteration": "release-shaped" if args.release_shaped else "ffsd",
        "images_per_s": args.batch_size / step_s,
        "ms_per_step": step_s * 1e3,
        # Host page faults: memory the step hands back to the kernel and touches again.
        "minor_faults_per_step": faults / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "applied": applied,
    }


def write_cifar(root: Path, n_train: int) -> None:
    """Random images in CIFAR-100's real on-disk format (only the pipeline's cost matters)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", 100)):
        labels = rng.integers(0, 100, n).tolist()
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [v // 5 for v in labels],
            "filenames": [f"{i}.png" for i in range(n)],
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [str(i) for i in range(100)],
        "coarse_label_names": [str(i) for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))


def bench_epoch(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), args.epoch_images)
        extra = [
            f"dataset.root={tmp}",
            f"dataset.pipeline={args.pipeline}",
            f"dataset.loader.num_workers={args.workers}",
        ]
        cfg = compose(args, "cifar100", extra)
        data = instantiate(cfg.dataset, _convert_="all")
        method, applied = build(args, cfg, 100)
        dev = method.device
        views = method.num_views
        x = torch.randn(args.batch_size, 3, 32, 32).to(dev)
        y = torch.randint(100, (args.batch_size,)).to(dev)
        if views > 1:
            x = torch.stack([x] * views)
        # Warm-up: compile, allocator, data upload, worker start-up are not the epoch's cost.
        method.begin_epoch(6)
        for images, labels in data.train_loader(
            args.batch_size, seed=0, epoch=1, device=dev, views=views
        ):
            method.step(images, labels, 6)
            break
        sync(dev)
        n_batches = len(
            data.train_loader(args.batch_size, seed=0, epoch=2, device=dev, views=views)
        )

        def epoch(k: int) -> float:
            t = time.perf_counter()
            batches = data.train_loader(args.batch_size, seed=0, epoch=k, device=dev, views=views)
            for images, labels in batches:
                method.step(images, labels, 6)
            sync(dev)
            return time.perf_counter() - t

        def in_memory() -> float:  # the same steps on one batch already in memory
            t = time.perf_counter()
            for k in range(n_batches):
                n = (
                    args.batch_size
                    if k < n_batches - 1
                    else args.epoch_images - k * args.batch_size
                )
                method.step(x[:, :n] if views > 1 else x[:n], y[:n], 6)
            sync(dev)
            return time.perf_counter() - t

        def pipeline_alone(k: int) -> float:  # the batches alone, no training
            t = time.perf_counter()
            batches = data.train_loader(args.batch_size, seed=0, epoch=k, device=dev, views=views)
            for images, _ in batches:
                images.sum()  # touch them, as a step would
            sync(dev)
            return time.perf_counter() - t

        # Alternated, so that drifts of the machine's speed hit both alike; medians reported.
        epochs, memory, alone = [], [], []
        for k in range(args.epoch_repeats):
            epochs.append(epoch(2 + k))
            memory.append(in_memory())
            alone.append(pipeline_alone(2 + k))
        epoch_s, memory_s, alone_s = map(statistics.median, (epochs, memory, alone))
    return {
        "bench": "epoch",
        "pipeline": args.pipeline,
        "workers": args.workers,
        "epoch_images": args.epoch_images,
        "repeats": args.epoch_repeats,
        "epoch_s": epoch_s,
        "images_per_s": args.epoch_images / epoch_s,
        "in_memory_s": memory_s,
        "pipeline_overhead_pct": 100.0 * (epoch_s - memory_s) / memory_s,
        # The pipeline's own time over the training steps': what it can add at most when
        # nothing overlaps it (0 workers, or the GPU-resident pipeline in the training stream).
        "pipeline_alone_s": alone_s,
        "pipeline_alone_pct": 100.0 * alone_s / memory_s,
        "epoch_s_per_50k": epoch_s * 50_000 / args.epoch_images,
        "applied": applied,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--method", default="ffsd", help="a conf/distill option (ffsd, dml, ...)")
    p.add_argument(
        "--students", type=int, default=2, help="FFSD's students, or another method's networks"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-step", action="store_true", help="skip the in-memory step benchmark")
    p.add_argument(
        "--release-shaped",
        action="store_true",
        help="time the release's iteration (a backward, step and .item() per loss; "
        "tests/test_method.py's reference) instead of ffsd's",
    )
    p.add_argument("--epoch", action="store_true", help="also time an epoch with input")
    p.add_argument("--epoch-images", type=int, default=2560)
    p.add_argument(
        "--epoch-repeats", type=int, default=3, help="epochs timed, alternated with in-memory"
    )
    p.add_argument("--pipeline", default="tensor", choices=["tensor", "dataloader"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (dataloader)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    args = p.parse_args()
    if args.release_shaped and (args.channels_last or args.compile or args.precision != "fp32"):
        p.error("--release-shaped times the release's eager fp32 iteration; drop the speed options")
    if args.threads:
        torch.set_num_threads(args.threads)
    # As training does: trainer.host_malloc from the composed config (and its overrides).
    host_malloc = compose(args, "synthetic", []).trainer.host_malloc
    malloc_applied = tune_host_malloc(**host_malloc)
    common = {
        "model": args.model,
        "batch_size": args.batch_size,
        "method": args.method,
        "students": args.students,
        "device": args.device,
        "options": {
            "channels_last": args.channels_last,
            "precision": args.precision,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "overrides": args.override,
            "host_malloc": malloc_applied or "C library defaults",
        },
        "machine": machine(),
    }
    results = []
    if not args.no_step:
        results.append(bench_step(args))
    if args.epoch:
        results.append(bench_epoch(args))
    for r in results:
        print(json.dumps(common | r), flush=True)


if __name__ == "__main__":
    main()
