"""How far each speed option's training step lands from a float64 step, beside eager fp32's own.

The evidence a default is decided on (issue 17): from one shared state (a few fp32 steps into
training, so that Adam's moments and the BatchNorm statistics are realistic), every variant takes
one step on the same batch; a float64 copy of the same state takes the same step. For every
parameter tensor the variant's update Δθ is compared with the float64 update Δθ₆₄ as
``||Δθ - Δθ₆₄|| / ||Δθ₆₄||`` (an L2 ratio: the largest single-element gap depends on which
entries sit near zero). Prints one JSON line per variant with the median, 90th percentile and
maximum of that ratio over the tensors, the worst tensors, and every figure's ratio to eager
fp32's own; then a table. An option whose distance is of the order of eager fp32's is as
faithful as the default.

Variants: ``fp32`` (eager NCHW), ``channels_last`` (with ffsd's precise NHWC BatchNorm
statistics), ``channels_last+native_bn`` (with PyTorch's NHWC BatchNorm kernel), ``bf16``,
``channels_last+bf16``, ``compile``, ``no_mkldnn`` (PyTorch's own convolution kernels instead
of oneDNN), and any ``+``-joined combination. ::

    python benchmarks/numerics.py                                # ResNet-32, batch 128
    python benchmarks/numerics.py --variants fp32,channels_last --states 3
    python benchmarks/numerics.py --ops          # single layers: where a layout loses precision

``--ops`` instead compares single layers at the CIFAR ResNets' shapes (3x3 convolutions of 16,
32 and 64 channels at 32x32, 16x16, 8x8, training-mode BatchNorm, PyTorch's and ffsd's precise
one), NCHW and NHWC fp32 against float64: the output and each gradient, as the same L2 ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import step  # noqa: E402
from benchmarks.step import machine  # noqa: E402
from ffsd.models.batch_norm import precise_batch_norm  # noqa: E402

#: step.py's variant options, and PyTorch's own convolutions instead of oneDNN's at step time.
OPTIONS = (*step.VARIANT_OPTIONS, "no_mkldnn")


def parse_variant(name: str) -> set[str]:
    parts = set(name.split("+")) - {"fp32"}
    unknown = parts - set(OPTIONS)
    if unknown:
        raise SystemExit(
            f"--variants: unknown option(s) {sorted(unknown)} in {name!r}; "
            f"choose fp32 or a '+'-joined combination of: {', '.join(OPTIONS)}"
        )
    return parts


def batches(args: argparse.Namespace, n: int, num_classes: int, views: int):
    g = torch.Generator().manual_seed(args.seed)
    s = args.image_size
    protos = torch.randn(num_classes, 3, s, s, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(num_classes, (args.batch_size,), generator=g)
        x = protos[y] + torch.randn(args.batch_size, 3, s, s, generator=g)
        if views > 1:
            x = torch.stack([x.roll(v, 0) for v in range(views)])
        out.append((x, y))
    return out


def build(args: argparse.Namespace, cfg, num_classes: int, options: set[str], dtype=torch.float32):
    """The method with ``options`` applied as training applies them (benchmarks/step.py's
    ``build``), its parameters and buffers in ``dtype``."""
    method, _ = step.build(args, cfg, num_classes, **step.variant_options(options))
    if dtype != torch.float32:
        for module in method.modules().values():
            module.to(dtype)
    return method


def params(method) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{n}": p.detach().clone()
        for m, module in method.modules().items()
        for n, p in module.named_parameters()
    }


def one_step(method, state: dict, x: torch.Tensor, y: torch.Tensor, epoch: int, options: set[str]):
    """Load ``state``, take one step; returns (parameters before, after, the step's terms)."""
    method.load_state_dict(copy.deepcopy(state))
    before = params(method)
    dtype = next(iter(before.values())).dtype
    flags = (
        torch.backends.mkldnn.flags(enabled=False)
        if "no_mkldnn" in options
        else contextlib.nullcontext()
    )
    with flags:
        terms = method.train_step(x.to(dtype), y, epoch)
    return before, params(method), terms


def distances(before, after, before64, after64) -> dict[str, float]:
    out = {}
    for name, p64 in after64.items():
        d64 = p64 - before64[name]
        d = (after[name] - before[name]).double()
        ref = d64.norm().item()
        if ref > 0:
            out[name] = (d - d64).norm().item() / ref
    return out


def _layer_grads(fn, tensors, fmt, dtype) -> tuple[torch.Tensor, ...]:
    """Output and every gradient of ``fn(x, w, b)`` (the bias gradient only where it is used)."""
    x64, w64, b64, dy64 = tensors
    x = x64.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = w64.to(dtype)
    w = (w.contiguous(memory_format=fmt) if w.dim() == 4 else w).requires_grad_()
    b = b64.to(dtype).requires_grad_()
    y = fn(x, w, b)
    dy = dy64.to(dtype).contiguous(memory_format=fmt)
    grads = torch.autograd.grad(y, (x, w, b), dy, allow_unused=True)
    return (y, *(gr for gr in grads if gr is not None))


def layer_errors(batch: int) -> list[dict]:
    """Single layers in fp32, NCHW and NHWC, against float64: output and gradients."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    rows = []
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        x64 = torch.randn(batch, c, hw, hw, generator=g, dtype=torch.float64).relu()
        w64 = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) * 0.1
        dy64 = torch.randn(batch, c, hw, hw, generator=g, dtype=torch.float64) * 1e-3
        gamma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        beta = torch.zeros(c, dtype=torch.float64)
        layers = {
            "conv3x3": (lambda x, w, b: F.conv2d(x, w, padding=1), (w64, beta), ("y", "dx", "dw")),
            "batch_norm": (
                lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
                (gamma, beta),
                ("y", "dx", "dweight", "dbias"),
            ),
            # ffsd's (trainer.nhwc_batch_norm=precise), meant for NHWC; NCHW input works too.
            "batch_norm_precise": (
                lambda x, w, b: precise_batch_norm(x, w, b, 1e-5)[0],
                (gamma, beta),
                ("y", "dx", "dweight", "dbias"),
            ),
        }
        for layer, (fn, (w, b), names) in layers.items():
            tensors = (x64, w, b, dy64)
            ref = _layer_grads(fn, tensors, torch.contiguous_format, torch.float64)
            for fmt, label in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")):
                got = _layer_grads(fn, tensors, fmt, torch.float32)
                rows.append(
                    {
                        "layer": layer,
                        "channels": c,
                        "size": hw,
                        "layout": label,
                        "error": {
                            n: ((a.double() - r).norm() / r.norm()).item()
                            for n, a, r in zip(names, got, ref, strict=True)
                        },
                    }
                )
    return rows


def print_layers(args: argparse.Namespace) -> None:
    rows = layer_errors(args.batch_size)
    for row in rows:
        print(json.dumps({"bench": "numerics-layer", "batch_size": args.batch_size, **row}))
    print(f"\n{'layer':30s} {'layout':6s}  relative L2 error against float64")
    for row in rows:
        errs = "  ".join(f"{k} {v:.1e}" for k, v in row["error"].items())
        name = f"{row['layer']} {row['channels']}ch {row['size']}x{row['size']}"
        print(f"{name:30s} {row['layout']:6s}  {errs}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--method", default="ffsd", help="a conf/distill option")
    p.add_argument("--students", type=int, default=2, help="the method's network count key")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--variants", default="fp32,channels_last,bf16,no_mkldnn")
    p.add_argument("--warmup-steps", type=int, default=3, help="fp32 steps before each state")
    p.add_argument("--states", type=int, default=2, help="states compared (one step from each)")
    p.add_argument("--epoch", type=int, default=6, help="the epoch the steps run at (λ warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    p.add_argument("--ops", action="store_true", help="single layers instead of the whole step")
    # What benchmarks/step.py's compose and build read besides the options above.
    p.set_defaults(device="cpu", compile_mode=None, compile_backend="inductor")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops:
        print_layers(args)
        return
    variants = args.variants.split(",")
    parsed = {v: parse_variant(v) for v in variants}
    k = args.num_classes
    cfg = step.compose(
        args, "synthetic", [f"dataset.num_classes={k}", f"dataset.image_size={args.image_size}"]
    )
    base = build(args, cfg, k, set())
    data = batches(args, args.warmup_steps * args.states + args.states, k, base.num_views)
    # States: fp32 training from the start, a step taken between each comparison point.
    states, points = [], []
    it = iter(data)
    for _ in range(args.states):
        for _ in range(args.warmup_steps):
            x, y = next(it)
            base.train_step(x, y, args.epoch)
        states.append(copy.deepcopy(base.state_dict()))
        points.append(next(it))
    ref = build(args, cfg, k, set(), torch.float64)
    per_variant: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    methods = {v: build(args, cfg, k, parsed[v]) for v in variants}
    for state, (x, y) in zip(states, points, strict=True):
        b64, a64, t64 = one_step(ref, state, x, y, args.epoch, set())
        for v in variants:
            b, a, t = one_step(methods[v], state, x, y, args.epoch, parsed[v])
            for name, dist in distances(b, a, b64, a64).items():
                per_variant[v].setdefault(name, []).append(dist)
            losses[v] += [
                abs(float(t[key]) - float(t64[key])) / max(abs(float(t64[key])), 1e-12)
                for key in t64
                if not key.endswith("/acc")
            ]
    summary = {}
    for v in variants:
        worst = {n: max(ds) for n, ds in per_variant[v].items()}
        vals = sorted(worst.values())
        summary[v] = {
            "median": statistics.median(vals),
            "p90": vals[int(0.9 * (len(vals) - 1))],
            "max": vals[-1],
            "loss_median": statistics.median(losses[v]),
            "loss_max": max(losses[v]),
            "worst_tensors": sorted(worst, key=worst.get, reverse=True)[:5],
        }
    plain = summary.get("fp32")
    for v in variants:
        line = {
            "bench": "numerics",
            "model": args.model,
            "method": args.method,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "states": args.states,
            "variant": v,
            "update_distance_to_float64": summary[v],
            "machine": machine(),
        }
        if plain:
            line["ratio_to_fp32"] = {
                key: summary[v][key] / plain[key] if plain[key] else None
                for key in ("median", "p90", "max")
            }
        print(json.dumps(line), flush=True)
    head = f"{'variant':28s} {'median':>9s} {'p90':>9s} {'max':>9s} {'loss max':>9s}"
    print(f"\n{head}  x fp32 (p90)")
    for v in variants:
        s = summary[v]
        r = f"{s['p90'] / plain['p90']:.1f}" if plain and plain["p90"] else "-"
        print(
            f"{v:28s} {s['median']:9.2e} {s['p90']:9.2e} {s['max']:9.2e} {s['loss_max']:9.2e}  {r}"
        )


if __name__ == "__main__":
    main()
