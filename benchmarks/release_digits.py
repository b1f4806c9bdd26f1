"""The released code's own training script on the quickstart's digits: what ``e2e.py
--release-checkout PATH`` times beside ``python launch.py experiment=quickstart``.

Runs what SJLeo/FFSD's ``cifar.py`` runs, ``Trainer(opt, logger).train()`` from a checkout of it
(never vendored: ``git clone https://github.com/SJLeo/FFSD``), built by its own option parser:
ResNet-20, ``--model_num 2``, batch 64, ``--n_epochs epochs + 1`` (its loop is
``range(start_epoch, n_epochs)``), its SGD/Adam, λs and temperature. Every epoch it trains, tests,
and saves every network as it does. Only its data module changes: instead of CIFAR-100 from disk,
the quickstart's digits split (the exact tensors ffsd trains on, written by the parent to
``--data``), through ``DataLoader`` with the release's settings (shuffled training batches,
``--test_batch_size`` 128, 8 workers, ``pin_memory=True``). Its fusion module is built for 100
classes whatever the data set (``CIFARTrainer.init_fusion_module``), so it runs as
``--dataset cifar100`` with the labels 0-9: the same compute as ten outputs, to the classifier's
64x100 weights. Visdom and the HTML pages stay off, as ``benchmarks/release.py`` does.

    python benchmarks/release_digits.py --release-checkout /tmp/ffsd-release --data digits.pt \
        --out /tmp/release-run
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--release-checkout", type=Path, required=True, metavar="PATH")
    p.add_argument("--data", type=Path, required=True, help="torch.save'd {train, test} tensors")
    p.add_argument("--out", type=Path, required=True, help="its checkpoints_dir")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--workers", type=int, default=8, help="the release's DataLoader workers")
    args = p.parse_args()

    from benchmarks.release import _import_trainer

    mod = _import_trainer(args.release_checkout)
    import utils.util as util  # the checkout's own
    from options import options

    data = torch.load(args.data, weights_only=True)
    print(
        f"release-digits: {len(data['train'][1])} training and {len(data['test'][1])} test images",
        flush=True,
    )
    pin = torch.cuda.is_available()  # the release pins always; on a CPU-only torch that warns

    def loader(split: str, batch_size: int) -> DataLoader:
        return DataLoader(
            TensorDataset(*data[split]),
            batch_size=batch_size,
            shuffle=split == "train",
            num_workers=args.workers,
            pin_memory=pin,
        )

    def digits_loaders(opt):
        return types.SimpleNamespace(
            trainLoader=loader("train", opt.train_batch_size),
            testLoader=loader("test", opt.test_batch_size),
        )

    mod.create_dataLoader = digits_loaders
    opt = options.parser.parse_args(
        [
            "--dataroot=/unused",
            f"--model={args.model}",
            "--dataset=cifar100",
            "--model_num=2",
            f"--train_batch_size={args.batch_size}",
            f"--n_epochs={args.epochs + 1}",
            f"--checkpoints_dir={args.out}",
            "--name=digits",
            "--display_id=0",
            "--no_html",
            "--gpu_ids=0",
        ]
    )
    opt.gpu_ids = [0]
    (args.out / "digits").mkdir(parents=True, exist_ok=True)
    logger = util.get_logger(str(args.out / "digits" / "logger.log"))
    torch.manual_seed(0)
    ready = time.perf_counter()
    mod.Trainer(opt, logger).train()
    done = time.perf_counter()
    print(
        f"release-digits: imports and set-up {ready - START:.2f} s, train() {done - ready:.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
