"""The released code's training iteration (SJLeo/FFSD's ``CIFARTrainer``), timed in this process.

Used by ``benchmarks/step.py --release-checkout PATH``. Nothing of the released code is copied
here: it is imported from the checkout the user points at (``git clone
https://github.com/SJLeo/FFSD``). Its ``Trainer`` is built from its own option parser and defaults
(``--model_num`` networks, the paper's lambdas and temperature, its SGD/Adam optimizers), and its
own ``train_with_test`` runs unchanged: every forward, loss, ``.item()``, backward and optimizer
step of its iteration. Two things are replaced, because they are not the iteration and cannot
run here: its ``DataLoader`` over CIFAR-100 on disk (8 workers of per-image PIL transforms)
becomes one fixed batch already on the device, handed out ``warmup + steps`` times, and visdom
and the HTML pages stay off (``--display_id 0 --no_html``); ``dominate``, which only the HTML
pages use, is stubbed when it is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

#: ffsd's conf/model option -> the released code's --model name (CIFAR).
MODELS = {
    "resnet20": "resnet20",
    "resnet32": "resnet32",
    "resnet56": "resnet56",
    "wrn16_2": "wideresnet1602",
    "wrn28_10": "wideresnet2810",
    "wrn40_2": "wideresnet4002",
}

#: The released code's top-level packages: imported from the checkout, so none may be loaded yet.
PACKAGES = ("models", "data", "utils", "options")


def _import_trainer(checkout: Path) -> types.ModuleType:
    if not (checkout / "CIFARTrainer.py").is_file():
        raise SystemExit(f"--release-checkout {checkout}: no CIFARTrainer.py there (SJLeo/FFSD)")
    clash = [p for p in PACKAGES if p in sys.modules]
    if clash:
        raise SystemExit(f"--release-checkout: modules {clash} already imported; cannot load it")
    try:
        import dominate  # noqa: F401
    except ImportError:  # only its HTML pages use it, and they stay off
        stub = types.ModuleType("dominate")
        stub.tags = types.ModuleType("dominate.tags")
        for name in ("meta", "h3", "table", "tr", "td", "p", "a", "img", "br"):
            setattr(stub.tags, name, None)
        sys.modules["dominate"], sys.modules["dominate.tags"] = stub, stub.tags
    sys.path.insert(0, str(checkout))
    return importlib.import_module("CIFARTrainer")


class _Batches:
    """The released loop's ``trainLoader``: one batch, ``n`` times; a timestamp at each hand-out.

    The gap between two hand-outs is one whole iteration of ``train_with_test`` (a device sync
    first, so that a GPU's queued work lands in the step that queued it).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int, epoch_images: int) -> None:
        self.x, self.y, self.n = x, y, n
        # Its logging interval is len(dataset) // batch // 10: CIFAR's 50,000 keeps it at one
        # log line per 39 steps (batch 128), as in a real epoch.
        self.dataset = range(epoch_images)
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            if self.x.is_cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            yield self.x, self.y
        if self.x.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def released_steps(
    checkout: Path,
    *,
    model: str,
    students: int,
    batch_size: int,
    device: str,
    epoch: int = 6,
) -> Callable[[torch.Tensor, torch.Tensor, int], list[float]]:
    """Build the released ``Trainer``; returns ``run(x, y, n)``: seconds of each of ``n`` steps.

    ``epoch`` sets its lambda warm-up (``lambda_warmup``) as ffsd's ``step(x, y, epoch)`` does.
    The released code picks ``cuda:0`` whenever CUDA is available, so ``device`` must agree.
    """
    if model not in MODELS:
        raise SystemExit(f"--release-checkout: no released counterpart of model={model}")
    if (device != "cpu") != torch.cuda.is_available():
        raise SystemExit("--release-checkout: the released code uses cuda:0 if CUDA is available")
    mod = _import_trainer(checkout)
    from options import options  # the checkout's own parser and defaults

    opt = options.parser.parse_args(
        [
            "--dataroot=/unused",
            f"--model={MODELS[model]}",
            "--dataset=cifar100",
            f"--model_num={students}",
            f"--train_batch_size={batch_size}",
            "--display_id=0",
            "--no_html",
            "--gpu_ids=0",
        ]
    )
    opt.gpu_ids = [0]
    loader = _Batches(torch.empty(0), torch.empty(0), 0, 50_000)
    # Its data module reads CIFAR-100 from disk with 8 workers; the iteration is timed alone.
    mod.create_dataLoader = lambda _opt: types.SimpleNamespace(trainLoader=loader, testLoader=[])
    torch.manual_seed(0)
    # Its model constructors print banners ("| Wide-Resnet 40x2"): stdout is the JSON lines'.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = mod.Trainer(opt, logging.getLogger("ffsd.release"))

    def run(x: torch.Tensor, y: torch.Tensor, n: int) -> list[float]:
        loader.x, loader.y, loader.n, loader.stamps = x, y, n, []
        trainer.lambda_warmup(epoch)
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train_with_test(epoch)
        s = loader.stamps
        return [b - a for a, b in itertools.pairwise(s)]

    return run
