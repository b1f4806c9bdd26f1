"""Export a leader of every architecture through ``task=export`` and print the check.

For each ``conf/model`` option: build a leader (3 students by default) whose BatchNorm
statistics are set by a few training-mode passes over random images (so activations have the
scale of a trained network's, not the blow-up of random statistics), save it in the release's
format, run the export task on it, and print file sizes, export times, the largest difference
from the eager network and the largest logit. Usage::

    python benchmarks/export_all_models.py                      # every model
    python benchmarks/export_all_models.py resnet20 wrn40_2     # some
    python benchmarks/export_all_models.py --formats torchscript,onnx resnet32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from ffsd.config import CONF_DIR, group_options
from ffsd.tasks.export import ExportError


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@torch.no_grad()
def calibrated_leader(cfg, num_classes: int, students: int, size: int) -> nn.Module:
    torch.manual_seed(0)
    net = instantiate(cfg.model.net, num_classes=num_classes, leader=True, num_students=students)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes below
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, size, size))
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=group_options("model"))
    parser.add_argument("--formats", default="torchscript,exported_program,onnx")
    parser.add_argument("--students", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = int(compose_cfg(f"model={name}").model.input_size)
            classes = 100 if size == 32 else 1000
            work = Path(tmp) / name
            work.mkdir()
            cfg = compose_cfg(
                "task=export",
                f"checkpoint={work / 'modelleader_best.pth'}",
                f"model={name}",
                "dataset=synthetic",
                f"dataset.num_classes={classes}",
                f"dataset.image_size={size}",
                f"trainer.output_dir={work / 'out'}",
                f"task.formats=[{args.formats}]",
            )
            net = calibrated_leader(cfg, classes, args.students, size)
            torch.save(
                {"weight": net.state_dict(), "epoch": 0, "cfg": name, "index": "leader"},
                work / "modelleader_best.pth",
            )
            try:
                instantiate(cfg.task, _partial_=True)(cfg)
            except ExportError as err:
                print(f"{name}: {err}")
            report = json.loads((work / "out" / "export.json").read_text())
            for fmt, rec in report["formats"].items():
                rows.append(
                    [
                        name,
                        fmt,
                        f"{rec['bytes'] / 1e6:.1f}",
                        f"{rec['export_s']:.1f}",
                        f"{rec['max_abs_diff']:.2e}",
                        f"{rec['max_abs_logit']:.3g}",
                        "yes" if rec["within_tolerance"] else "NO",
                    ]
                )
    head = ["model", "format", "MB", "export s", "max |diff|", "max |logit|", "ok"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
