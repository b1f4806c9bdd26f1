"""Throughput of FFSD training: the full iteration on data in memory, and whole epochs with input.

Prints one JSON line per measurement, each with the options and the machine it ran on:

* ``"bench": "step"``: images/s of ``method.step`` (all networks, losses, one backward, every
  optimizer) on a batch already on the device, median over ``--steps`` timed steps.
* ``"bench": "epoch"``: images/s of a training epoch of ``--epoch-images`` CIFAR-shaped images
  through the real data module (``--pipeline tensor``: batches cut and augmented as tensors on the
  device; ``dataloader``: torchvision's per-image PIL transforms in DataLoader workers), its
  overhead over the same number of steps on data in memory, and the pipeline's time alone.
* ``--release-checkout PATH``: the released code's own iteration (SJLeo/FFSD's
  ``CIFARTrainer.train_with_test`` imported from a checkout of it, ``benchmarks/release.py``)
  instead of ffsd's; ``--release-shaped``: without the released code, a stand-in for it
  (tests/test_method.py's reference iteration on ffsd's networks), labelled as such.
* ``"bench": "compare"`` (``--compare release,ffsd,ffsd+channels_last,...``): several iterations
  in this one process, interleaved over ``--rounds``, with medians, spreads and ratios.
* ``--roofline``: each step's FLOPs, the rate it reaches, the host's peak matrix-multiply rate
  and the step's floor at that rate (``benchmarks/roofline.py``); with ``--compare``, how much
  faster than the first variant each one could ever be (``ceiling_ratio_to_...``).

Examples::

    python benchmarks/step.py --model resnet32 --batch-size 128
    python benchmarks/step.py --release-checkout /tmp/ffsd-release --rounds 5 \
        --compare release,ffsd,ffsd+channels_last,ffsd+bf16,ffsd+channels_last+bf16
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
from ffsd.training.acceleration import NHWC_BATCH_NORMS, accelerate  # noqa: E402
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
    from hydra.utils import get_class

    overrides = [
        f"model={args.model}",
        f"dataset={dataset}",
        f"distill={args.method}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.output_dir=/unused",
        *extra,
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
        # The key that counts the method's networks: FFSD's students, ONE's and CL-ILR's
        # branches, OKDDip's and PCL's peers, the K-network methods' networks.
        count = getattr(get_class(cfg.distill._target_), "count_key", "num_students")
        return hydra_compose("config", overrides=[*overrides, f"distill.{count}={args.students}"])


def build(
    args: argparse.Namespace,
    cfg,
    num_classes: int,
    *,
    channels_last: bool | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    nhwc_batch_norm: str | None = None,
):
    """The method with the speed options (``args``' unless given), as training applies them."""
    torch.manual_seed(0)
    method = ffsd.build_method(cfg, num_classes, args.device)
    compile = args.compile if compile is None else compile
    applied = accelerate(
        method,
        channels_last=args.channels_last if channels_last is None else channels_last,
        nhwc_batch_norm=nhwc_batch_norm or args.nhwc_batch_norm,
        precision=precision or args.precision,
        compile={
            "enabled": True,
            "mode": args.compile_mode,
            "backend": getattr(args, "compile_backend", None),
        }
        if compile
        else None,
    )
    return method, applied


#: The option tokens of a variant (``ffsd+channels_last+bf16``), each one of build's keywords.
VARIANT_OPTIONS = ("channels_last", "native_bn", "bf16", "compile")


def variant_options(tokens: set[str] | list[str]) -> dict:
    """build's keywords for a variant's option tokens (:data:`VARIANT_OPTIONS`); a token left
    out is that option off (eager NCHW fp32, precise BatchNorm statistics where NHWC)."""
    return {
        "channels_last": "channels_last" in tokens,
        "nhwc_batch_norm": "native" if "native_bn" in tokens else "precise",
        "precision": "bf16" if "bf16" in tokens else "fp32",
        "compile": "compile" in tokens,
    }


#: What each iteration is, as the output names it ("iteration") and says it is ("iteration_note").
RELEASED = "released code"
STAND_IN = "release-shaped stand-in"
NOTES = {
    RELEASED: "SJLeo/FFSD's CIFARTrainer.train_with_test, imported from --release-checkout",
    STAND_IN: "tests/test_method.py's reference iteration on ffsd's networks; NOT the released "
    "code (pass --release-checkout PATH to time that)",
    "ffsd": "ffsd's method.step",
}


def release_commit(checkout: Path) -> str | None:
    head = checkout / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (checkout / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def step_input(args: argparse.Namespace, views: int, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(100, (args.batch_size,), generator=g).to(dev)
    if views > 1:  # one independently augmented view per network (KDCL)
        x = torch.stack([x.roll(v, 0) for v in range(views)])
    return x, y


def make_timer(args: argparse.Namespace, variant: str):
    """``variant``'s step as ``time(n) -> [seconds of each of n steps]``, its options, its label.

    ``release``: the released code with ``--release-checkout``, else the release-shaped
    stand-in; ``ffsd``: ffsd's iteration with the command line's options; ``ffsd+OPT+...``:
    ffsd's with exactly the options named (``channels_last``, ``bf16``, ``compile``, and
    ``native_bn``: PyTorch's NHWC BatchNorm statistics instead of ffsd's precise ones).
    """
    cfg = compose(args, "synthetic", ["dataset.num_classes=100"])
    if variant == "release" and args.release_checkout:
        from benchmarks.release import released_steps

        run = released_steps(
            args.release_checkout,
            model=args.model,
            students=args.students,
            batch_size=args.batch_size,
            device=args.device,
        )
        x, y = step_input(args, 1, torch.device(args.device))
        return (lambda n: run(x, y, n)), [], RELEASED
    if variant == "ffsd" or variant == "release":
        method, applied = build(args, cfg, 100)
    else:
        head, *opts = variant.split("+")
        unknown = set(opts) - set(VARIANT_OPTIONS)
        if head != "ffsd" or unknown:
            raise SystemExit(f"--compare: unknown variant {variant!r}")
        method, applied = build(args, cfg, 100, **variant_options(opts))
    dev = method.device
    x, y = step_input(args, method.num_views, dev)
    method.begin_epoch(6)
    if variant == "release":
        # The release's iteration, as tests/test_method.py writes it to check ffsd against:
        # a backward and an optimizer step per loss, and a .item() per loss as its logging does.
        from tests.test_method import Reference

        reference = Reference(method)

        def step() -> dict:
            return {"loss": torch.tensor(reference.step(x, y, 6, read_losses=True))}

        label = STAND_IN
    else:

        def step() -> dict:
            return method.step(x, y, 6)

        label = "ffsd"

    def time_steps(n: int) -> list[float]:
        times, terms = [], {}
        for _ in range(n):
            t = time.perf_counter()
            terms = step()
            sync(dev)
            times.append(time.perf_counter() - t)
        assert all(torch.isfinite(v).all() for v in terms.values())
        return times

    return time_steps, applied, label


def bench_step(args: argparse.Namespace) -> dict:
    variant = "release" if args.release_shaped or args.release_checkout else "ffsd"
    time_steps, applied, label = make_timer(args, variant)
    time_steps(args.warmup)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = time_steps(args.steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    step_s = statistics.median(times)
    out = {
        "bench": "step",
        "iteration": label,
        "iteration_note": NOTES[label],
        "images_per_s": args.batch_size / step_s,
        "ms_per_step": step_s * 1e3,
        # Host page faults: memory the step hands back to the kernel and touches again.
        "minor_faults_per_step": faults / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "applied": applied,
    }
    if args.profile:
        out["profile"] = profile_step(time_steps, args.profile_rows)
    if args.roofline:
        precision = variant_precision(args, variant)
        out["roofline"] = roofline(args, time_steps, precision, step_s, out.get("profile"))
    return out


def variant_precision(args: argparse.Namespace, variant: str) -> str:
    """The precision ``variant`` runs in, as :func:`make_timer` builds it: the released code and
    its stand-in fp32, ``ffsd`` the command line's, ``ffsd+OPT+...`` its own tokens'."""
    if variant == "release":
        return "fp32"
    if variant == "ffsd":
        return args.precision
    return variant_options(variant.split("+")[1:])["precision"]


#: --roofline's peak matrix-multiply rate, GFLOP/s, by dtype, measured once per process.
PEAKS: dict[torch.dtype, float] = {}


def roofline(
    args: argparse.Namespace, time_steps, precision: str, step_s: float, profile: dict | None
) -> dict:
    """``--roofline``: the step's FLOPs, the rate it reaches, and its floor at the host's peak
    matrix-multiply rate of the step's dtype (``benchmarks/roofline.py``)."""
    from benchmarks import roofline as rl

    flops = rl.count_flops(lambda: time_steps(1))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if dtype not in PEAKS:  # once per dtype, so that every variant shares one measurement
        PEAKS[dtype] = rl.matmul_peak(torch.device(args.device), dtype)
    peak = PEAKS[dtype]
    gflop = flops["flops"] / 1e9
    gflop_by_op = {op: n / 1e9 for op, n in flops["flops_by_op"].items()}
    out = {
        "gflop_per_step": round(gflop, 2),
        "gflop_by_op": {op: round(n, 3) for op, n in gflop_by_op.items()},
        "achieved_gflop_per_s": round(gflop / step_s, 1),
        "peak_matmul_gflop_per_s": round(peak, 1),
        "peak_dtype": str(dtype).removeprefix("torch."),
        "floor_ms": round(rl.floor_ms(gflop, peak), 1),
    }
    if profile:
        rate = rl.convolution_rate(gflop_by_op, profile["families_ms"])
        out["convolution_gflop_per_s"] = None if rate is None else round(rate, 1)
    return out


#: Operator families of the profile: every aten op whose name holds the key counts under it.
FAMILIES = {
    "convolution backward": ("convolution_backward",),
    "convolution forward": ("mkldnn_convolution", "slow_conv", "thnn_conv", "_nnpack"),
    "batch norm backward": ("native_batch_norm_backward",),
    "batch norm forward": ("native_batch_norm", "_batch_norm_impl_index"),
    "ReLU (forward and backward)": ("threshold_backward", "relu", "clamp_min"),
    "optimizers": ("Optimizer.",),
}


def profile_step(time_steps, rows: int) -> dict:
    """One more step under ``torch.profiler``: where its time goes, by operator and by family.

    Self CPU time (an operator's own, without the operators it calls); ``share`` is of the
    profiled step's total. Families group the operators named in ``FAMILIES``; the rest (losses'
    elementwise ops, copies, reductions, allocation) is ``other``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(1)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)
    families: dict[str, float] = {name: 0.0 for name in FAMILIES} | {"other": 0.0}
    for e in events:
        family = next((f for f, keys in FAMILIES.items() if any(k in e.key for k in keys)), None)
        families[family or "other"] += e.self_cpu_time_total / 1e3
    return {
        "total_ms": total,
        "families_ms": {k: round(v, 1) for k, v in families.items()},
        "families_share": {k: round(v / total, 3) for k, v in families.items()},
        "top_ops": [
            {
                "op": e.key,
                "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                "calls": e.count,
                "share": round(e.self_cpu_time_total / 1e3 / total, 3),
            }
            for e in ops[:rows]
        ],
    }


def bench_compare(args: argparse.Namespace) -> list[dict]:
    """Every ``--compare`` variant in this process, interleaved (A B C A B C ...) over rounds.

    Interleaving spreads a shared machine's changing load over all variants alike; each
    variant's figure is the median of its steps over all rounds, its spread the range of its
    per-round medians.
    """
    variants = [v.strip() for v in args.compare.split(",") if v.strip()]
    timers = {}
    for v in variants:
        timers[v] = make_timer(args, v)
        timers[v][0](args.warmup)
    steps = {v: [] for v in variants}
    rounds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times = timers[v][0](args.steps)
            steps[v] += times
            rounds[v].append(args.batch_size / statistics.median(times))
    first_s = statistics.median(steps[variants[0]])
    out = []
    for v in variants:
        step_s = statistics.median(steps[v])
        line = {
            "bench": "compare",
            "variant": v,
            "iteration": timers[v][2],
            "iteration_note": NOTES[timers[v][2]],
            "images_per_s": args.batch_size / step_s,
            "ms_per_step": 1e3 * step_s,
            "per_round_images_per_s": rounds[v],
            "spread_images_per_s": [min(rounds[v]), max(rounds[v])],
            f"ratio_to_{variants[0]}": first_s / step_s,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "applied": timers[v][1],
            "load_average": os.getloadavg(),
        }
        if args.roofline:  # after the timed rounds, so that counting never disturbs them
            found = roofline(args, timers[v][0], variant_precision(args, v), step_s, None)
            # The most this variant could ever gain on the first: the first's measured step
            # over this one's floor.
            found[f"ceiling_ratio_to_{variants[0]}"] = round(1e3 * first_s / found["floor_ms"], 2)
            line["roofline"] = found
        out.append(line)
    return out


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
            "dataset.verify_checksums=false",  # random files, not the official ones
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
        tail = args.epoch_images - (n_batches - 1) * args.batch_size
        if tail != args.batch_size:
            # The epoch's last, smaller batch is a new shape: torch.compile would recompile
            # (and CUDA graphs record) inside the first timed epoch otherwise.
            method.step(x[:, :tail] if views > 1 else x[:tail], y[:tail], 6)
            sync(dev)

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
        # --epoch-only: the epochs alone (a slow baseline whose parts are not of interest).
        only = getattr(args, "epoch_only", False)
        epochs, memory, alone = [], [], []
        for k in range(args.epoch_repeats):
            epochs.append(epoch(2 + k))
            memory.append(0.0 if only else in_memory())
            alone.append(0.0 if only else pipeline_alone(2 + k))
        epoch_s, memory_s, alone_s = map(statistics.median, (epochs, memory, alone))
    return {
        "bench": "epoch",
        "pipeline": args.pipeline,
        "workers": args.workers,
        "epoch_images": args.epoch_images,
        "repeats": args.epoch_repeats,
        "epoch_s": epoch_s,
        "images_per_s": args.epoch_images / epoch_s,
        "in_memory_s": None if only else memory_s,
        "pipeline_overhead_pct": None if only else 100.0 * (epoch_s - memory_s) / memory_s,
        # The pipeline's own time over the training steps': what it can add at most when
        # nothing overlaps it (0 workers, or the GPU-resident pipeline in the training stream).
        "pipeline_alone_s": None if only else alone_s,
        "pipeline_alone_pct": None if only else 100.0 * alone_s / memory_s,
        "epoch_s_per_50k": epoch_s * 50_000 / args.epoch_images,
        "applied": applied,
    }


def parser() -> argparse.ArgumentParser:
    """step.py's command line: every option and its default."""
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
    p.add_argument(
        "--nhwc-batch-norm",
        default="precise",
        choices=NHWC_BATCH_NORMS,
        help="with --channels-last on CPU: ffsd's precise BatchNorm statistics or PyTorch's kernel",
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-step", action="store_true", help="skip the in-memory step benchmark")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step (torch.profiler): self time by operator and by family",
    )
    p.add_argument("--profile-rows", type=int, default=15, help="operators listed by --profile")
    p.add_argument(
        "--roofline",
        action="store_true",
        help="also count each step's FLOPs and time the host's peak matrix multiply: the rate "
        "reached and the step's floor (benchmarks/roofline.py)",
    )
    p.add_argument(
        "--release-shaped",
        action="store_true",
        help="time the release's iteration (a backward, step and .item() per loss; "
        "tests/test_method.py's reference) instead of ffsd's",
    )
    p.add_argument(
        "--release-checkout",
        type=Path,
        default=None,
        metavar="PATH",
        help="a checkout of the released code (git clone https://github.com/SJLeo/FFSD): time "
        "its CIFARTrainer iteration instead of ffsd's (with --compare: as the 'release' variant)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="V1,V2,...",
        help="time these iterations in this process, interleaved over --rounds: 'release' (the "
        "released code with --release-checkout, else the release-shaped stand-in), 'ffsd' "
        "(the options given), 'ffsd+channels_last', 'ffsd+bf16', 'ffsd+channels_last+bf16', ...",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --compare")
    p.add_argument("--epoch", action="store_true", help="also time an epoch with input")
    p.add_argument("--epoch-images", type=int, default=2560)
    p.add_argument(
        "--epoch-repeats", type=int, default=3, help="epochs timed, alternated with in-memory"
    )
    p.add_argument(
        "--epoch-only", action="store_true", help="time the epochs alone (no in-memory split)"
    )
    p.add_argument("--pipeline", default="tensor", choices=["tensor", "dataloader"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (dataloader)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    return p


def namespace(**options: object) -> argparse.Namespace:
    """The options this module's functions read, for another script that builds and times
    methods with them (gpu.py, concurrency.py): step.py's defaults, then ``options``."""
    args = parser().parse_args([])
    unknown = set(options) - set(vars(args))
    if unknown:
        raise TypeError(f"step.py has no option(s) {sorted(unknown)}")
    vars(args).update(options)
    return args


def main() -> None:
    p = parser()
    args = p.parse_args()
    release = args.release_shaped or args.release_checkout
    if (
        release
        and not args.compare
        and (args.channels_last or args.compile or args.precision != "fp32")
    ):
        p.error("the release's iteration runs eager fp32; drop the speed options")
    if args.release_checkout and args.epoch:
        p.error("--release-checkout times the released iteration only; drop --epoch")
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
            "nhwc_batch_norm": args.nhwc_batch_norm,
            "precision": args.precision,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "overrides": args.override,
            "host_malloc": malloc_applied or "C library defaults",
        },
        "machine": machine(),
    }
    results = []
    if args.compare:
        if args.release_checkout:
            common["release_commit"] = release_commit(args.release_checkout)
        results += bench_compare(args)
    elif not args.no_step:
        if args.release_checkout:
            common["release_commit"] = release_commit(args.release_checkout)
        results.append(bench_step(args))
    if args.epoch:
        results.append(bench_epoch(args))
    for r in results:
        print(json.dumps(common | r), flush=True)


if __name__ == "__main__":
    main()
