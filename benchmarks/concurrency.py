"""Inter-op parallelism on a CPU: FFSD's networks run one after another on every core, or side by
side in worker threads.

FFSD's networks (the students and the leader) exchange only detached outputs, so their forward
and backward passes are independent and could run concurrently. This measures what that would
gain before any method is restructured for it: the forward and backward of every network of a
FFSD run (built as training builds it, with the speed options given), each with its own
cross-entropy, on one batch, timed

* ``sequential``: in the main thread, one network after another, ``torch.get_num_threads()``
  intra-op threads (what training does today);
* ``concurrent``: the networks split into one contiguous group per worker thread (``--workers``,
  by default one per core), the groups running at once, ``--worker-threads`` intra-op threads
  each (default 1);

interleaved over ``--rounds``, and checks that both compute the same gradients (the norm of their
difference over the gradients' norm, all networks' as one vector: intra-op thread counts change
only the order of some sums). The losses, the fusion module, the decoders and the optimizers are
left out: they are a small share of a step and would stay sequential.

    python benchmarks/concurrency.py --model resnet32 --batch-size 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step as bench  # benchmarks/step.py: composition, builds, machine


def forward_backward(nets: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> None:
    for net in nets:
        F.cross_entropy(net(x).logits, y).backward()


def split(items: Sequence, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous groups whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    groups, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        groups.append(list(items[start:end]))
        start = end
    return [g for g in groups if g]


class Workers:
    """One thread per group, ``threads`` intra-op threads each; ``run()`` runs every group once."""

    def __init__(
        self, groups: list[list[nn.Module]], x: torch.Tensor, y: torch.Tensor, threads: int = 1
    ) -> None:
        self.x, self.y, self.threads = x, y, threads
        self.start = threading.Barrier(len(groups) + 1)
        self.done = threading.Barrier(len(groups) + 1)
        self.stopping = False
        self.threads_seen: list[int] = []
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._loop, args=(g,), daemon=True) for g in groups
        ]
        for t in self._threads:
            t.start()

    def _loop(self, group: list[nn.Module]) -> None:
        # Per thread once the thread has run an op: PyTorch initialises a new thread's count
        # from the last value set anywhere, so the main thread sets its own again afterwards.
        torch.set_num_threads(self.threads)
        self.threads_seen.append(torch.get_num_threads())
        while True:
            self.start.wait()
            if self.stopping:
                return
            try:
                forward_backward(group, self.x, self.y)
            except BaseException as e:  # reported by run(), not lost in the thread
                self.errors.append(e)
            self.done.wait()

    def run(self) -> None:
        self.start.wait()
        self.done.wait()
        if self.errors:
            raise RuntimeError("a worker failed") from self.errors[0]

    def close(self) -> None:
        self.stopping = True
        self.start.wait()
        for t in self._threads:
            t.join()


def gradients(nets: Sequence[nn.Module], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    for net in nets:
        net.zero_grad(set_to_none=True)
    run()
    return {
        f"{k}.{name}": p.grad.clone()
        for k, net in enumerate(nets)
        for name, p in net.named_parameters()
        if p.grad is not None
    }


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """||a - b|| over ||a||, all gradients as one vector, and the tensor differing most.

    One tensor's own ratio is reported, not judged: a gradient that is zero up to rounding (the
    bias of a convolution whose every path runs into BatchNorm) differs by all of itself.
    """
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).norm().item() for k in a}
    norms = {k: a[k].norm().item() for k in a}
    ratios = {k: diffs[k] / max(norms[k], 1e-30) for k in a}
    worst = max(ratios, key=ratios.__getitem__)
    total = sum(d * d for d in diffs.values()) / max(sum(n * n for n in norms.values()), 1e-30)
    return {"rel": total**0.5, "worst_tensor": worst, "worst_rel": ratios[worst]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="default: one per core")
    p.add_argument("--worker-threads", type=int, default=1, help="intra-op threads per worker")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels-last", choices=("true", "false"), default="true")
    p.add_argument("--nhwc-batch-norm", choices=bench.NHWC_BATCH_NORMS, default="precise")
    a = p.parse_args(argv)
    ns = bench.namespace(  # step.py's defaults otherwise: FFSD, eager fp32
        model=a.model,
        batch_size=a.batch_size,
        students=a.students,
        device="cpu",
        channels_last=a.channels_last == "true",
        nhwc_batch_norm=a.nhwc_batch_norm,
    )
    cores = torch.get_num_threads()
    workers = a.workers or cores
    cfg = bench.compose(ns, "synthetic", ["dataset.num_classes=100"])
    method, applied = bench.build(ns, cfg, 100)
    method.nets.train()
    nets = [*method.nets.students, method.nets.leader]
    x, y = bench.step_input(ns, 1, method.device)
    x = x.contiguous(memory_format=torch.channels_last) if ns.channels_last else x
    groups = split(nets, workers)
    pool = Workers(groups, x, y, a.worker_threads)
    try:
        pool.run()  # every worker has run an op: its thread count is its own from here on
        torch.set_num_threads(cores)
        variants = {"sequential": lambda: forward_backward(nets, x, y), "concurrent": pool.run}
        diff = difference(
            gradients(nets, variants["sequential"]), gradients(nets, variants["concurrent"])
        )
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(a.rounds):
            for name, run in variants.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    finally:
        pool.close()
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out = {
        "bench": "concurrency",
        "model": a.model,
        "batch_size": a.batch_size,
        "networks": len(nets),
        "applied": applied,
        "sequential": {"ms": ms["sequential"], "intra_op_threads": torch.get_num_threads()},
        "concurrent": {
            "ms": ms["concurrent"],
            "workers": len(groups),
            "networks_per_worker": [len(g) for g in groups],
            "intra_op_threads_per_worker": pool.threads_seen,
        },
        "spread_ms": {k: [1e3 * min(v), 1e3 * max(v)] for k, v in times.items()},
        "speedup_concurrent_over_sequential": ms["sequential"] / ms["concurrent"],
        "gradients_rel_diff": diff["rel"],
        "worst_gradient": {"tensor": diff["worst_tensor"], "rel": diff["worst_rel"]},
        "rounds": a.rounds,
        "machine": bench.machine(),
    }
    print(json.dumps(out), flush=True)
    print(
        f"{len(nets)} networks' forward+backward: sequential {ms['sequential']:.0f} ms, "
        f"concurrent ({'+'.join(str(len(g)) for g in groups)} on {len(groups)} workers) "
        f"{ms['concurrent']:.0f} ms: {out['speedup_concurrent_over_sequential']:.3f}x; "
        f"gradients agree to {diff['rel']:.1e}"
    )
    return out


if __name__ == "__main__":
    main()
