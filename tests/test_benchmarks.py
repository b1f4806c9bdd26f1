"""benchmarks/step.py keeps running: its JSON lines carry the figures and the record of the run.

Only the output's shape is checked; speed itself is measured by hand (benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

TINY = ["--model", "resnet20", "--batch-size", "8", "--steps", "1", "--warmup", "1"]


def bench(*args: str) -> list[dict]:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), *TINY, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_step_and_epoch_lines_record_figures_options_and_machine():
    step, epoch = bench("--epoch", "--epoch-images", "20", "--epoch-repeats", "1", "--profile")
    for line in (step, epoch):
        assert line["model"] == "resnet20" and line["batch_size"] == 8
        assert line["options"]["host_malloc"] != {} and "cpu_capability" in line["machine"]
        assert line["images_per_s"] > 0
    assert step["bench"] == "step" and step["iteration"] == "ffsd"
    assert step["minor_faults_per_step"] >= 0 and step["peak_rss_mb"] > 0
    prof = step["profile"]  # one profiled step: every op's self time lands in one family
    assert sum(prof["families_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert prof["families_ms"]["convolution backward"] > 0 and len(prof["top_ops"]) == 15
    assert prof["top_ops"][0]["self_ms"] >= prof["top_ops"][-1]["self_ms"]
    assert epoch["bench"] == "epoch" and epoch["pipeline"] == "tensor"
    assert epoch["epoch_s"] > 0 and epoch["in_memory_s"] > 0 and epoch["pipeline_alone_s"] > 0


def test_release_shaped_baseline_and_glibc_defaults_by_override():
    (step,) = bench(
        "--release-shaped",
        "--override",
        "trainer.host_malloc.mmap_threshold_mb=null",
        "trainer.host_malloc.trim_threshold_mb=null",
    )
    assert step["iteration"] == "release-shaped stand-in" and step["images_per_s"] > 0
    assert "NOT the released code" in step["iteration_note"]
    assert step["options"]["host_malloc"] == "C library defaults"


def test_every_method_steps_with_its_own_network_count():
    for method in ("independent", "dml", "kdcl", "cl_ilr"):  # kdcl: a view per network
        (step,) = bench("--method", method, "--students", "3")
        assert step["method"] == method and step["students"] == 3 and step["images_per_s"] > 0


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu.sh --device cpu --tiny: every part (fast and baseline epochs of each model,
    the bf16 and compiled numerics checks) runs and lands in one JSON file."""
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"] == "cpu" and not report["skipped"]
    (model,) = report["epochs"]
    pair = report["epochs"][model]
    assert pair["fast"]["pipeline"] == "tensor" and pair["baseline"]["pipeline"] == "dataloader"
    assert "channels_last" in pair["fast"]["applied"] and "autocast bf16" in pair["fast"]["applied"]
    assert pair["baseline"]["applied"] == [] and pair["speedup_fast_over_baseline"] > 0
    checks = report["numerics"][model]
    assert set(checks) == {"bf16", "compile", "fast"} and report["numerics_failed"] == []
    assert all(c["update_rel_diff"] >= 0 and c["worst_loss_term"] for c in checks.values())


def test_compare_interleaves_variants_and_labels_the_stand_in():
    release, cl = bench("--compare", "release,ffsd+channels_last", "--rounds", "2", "--roofline")
    assert release["bench"] == cl["bench"] == "compare"
    assert release["iteration"] == "release-shaped stand-in" and cl["iteration"] == "ffsd"
    assert cl["applied"][0] == "channels_last" and len(cl["per_round_images_per_s"]) == 2
    assert cl["applied"][1].startswith("precise NHWC BatchNorm statistics")
    assert release["ratio_to_release"] == 1.0 and cl["ratio_to_release"] > 0
    for line in (release, cl):  # --roofline: the same networks count the same FLOPs
        roof = line["roofline"]
        assert roof["gflop_per_step"] == release["roofline"]["gflop_per_step"] > 0
        assert roof["peak_matmul_gflop_per_s"] > 0 and roof["peak_dtype"] == "float32"
        assert roof["floor_ms"] == pytest.approx(
            1e3 * roof["gflop_per_step"] / roof["peak_matmul_gflop_per_s"], rel=0.01
        )
        assert roof["ceiling_ratio_to_release"] == pytest.approx(
            release["ms_per_step"] / roof["floor_ms"], rel=0.01
        )


def test_roofline_counts_a_convolution_step_as_its_multiply_adds():
    from benchmarks import roofline

    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    forward = 2 * (2 * 8 * 5 * 5) * (4 * 3 * 3)  # a multiply-add per output and weight tap

    counted = roofline.count_flops(lambda: conv(x).sum().backward())
    # Backward: the input's gradient and the weight's, each as many multiply-adds as forward.
    assert counted["flops"] == 3 * forward
    assert counted["flops_by_op"] == {"convolution_backward": 2 * forward, "convolution": forward}
    assert roofline.floor_ms(3.0, 150.0) == pytest.approx(20.0)
    rate = roofline.convolution_rate(
        {"convolution": 1.0, "convolution_backward": 2.0, "mm": 5.0},
        {"convolution forward": 10.0, "convolution backward": 20.0, "other": 99.0},
    )
    assert rate == pytest.approx(100.0)  # 3 GFLOP in 30 ms; the product's FLOPs are not counted
    assert roofline.convolution_rate({"mm": 1.0}, {"other": 5.0}) is None
    assert roofline.matmul_peak(torch.device("cpu"), size=256) > 0


def test_roofline_peak_dtype_follows_each_variants_precision():
    import argparse

    from benchmarks.step import variant_precision

    args = argparse.Namespace(precision="bf16")  # the command line's, for the bare "ffsd"
    assert variant_precision(args, "release") == "fp32"
    assert variant_precision(args, "ffsd") == "bf16"
    assert variant_precision(args, "ffsd+channels_last") == "fp32"
    assert variant_precision(args, "ffsd+channels_last+bf16") == "bf16"


def script(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_numerics_measures_each_variants_distance_to_float64():
    """One step from a shared state, against the float64 step: eager fp32 is the yardstick; bf16
    (8 mantissa bits) must land far further from float64 than fp32 does, or nothing is measured;
    channels_last with the precise BatchNorm statistics (the CPU default) lands as close as fp32
    (median measured 0.8-1.1x at this size; bounded at 3x)."""
    variants = ("fp32", "channels_last", "channels_last+native_bn", "bf16")
    res = script(
        "numerics.py",
        *("--model", "resnet20", "--batch-size", "8", "--image-size", "16"),
        *("--num-classes", "10", "--states", "1", "--warmup-steps", "1"),
        *("--variants", ",".join(variants)),
    )
    lines = {d["variant"]: d for d in map(json.loads, res.stdout.splitlines()[: len(variants)])}
    assert set(lines) == set(variants)
    fp32, bf16 = (lines[v]["update_distance_to_float64"] for v in ("fp32", "bf16"))
    assert 0 < fp32["median"] < 1e-3 and fp32["loss_max"] < 1e-5
    assert bf16["median"] > 30 * fp32["median"] and lines["bf16"]["ratio_to_fp32"]["median"] > 30
    assert lines["channels_last"]["update_distance_to_float64"]["median"] < 3 * fp32["median"]
    assert lines["fp32"]["ratio_to_fp32"] == {"median": 1.0, "p90": 1.0, "max": 1.0}
    assert all(len(d["update_distance_to_float64"]["worst_tensors"]) == 5 for d in lines.values())
    assert "x fp32 (p90)" in res.stdout


FAKE_RELEASE = {
    # The few names benchmarks/release_digits.py uses of SJLeo/FFSD, with the same signatures.
    "options/options.py": """
import argparse
parser = argparse.ArgumentParser()
for name in ("--dataroot", "--model", "--dataset", "--checkpoints_dir", "--name", "--gpu_ids"):
    parser.add_argument(name)
for name in ("--model_num", "--train_batch_size", "--n_epochs", "--display_id"):
    parser.add_argument(name, type=int)
parser.add_argument("--test_batch_size", type=int, default=128)
parser.add_argument("--start_epoch", type=int, default=1)
parser.add_argument("--no_html", action="store_true")
""",
    "utils/util.py": "import logging\ndef get_logger(path):\n    return logging.getLogger(path)\n",
    "CIFARTrainer.py": """
from data import create_dataLoader
class Trainer:
    def __init__(self, opt, logger):
        self.opt, loaders = opt, create_dataLoader(opt)
        self.train_loader, self.test_loader = loaders.trainLoader, loaders.testLoader
    def train(self):
        for epoch in range(self.opt.start_epoch, self.opt.n_epochs):
            n = sum(len(y) for _, y in self.train_loader)
            m = sum(len(y) for _, y in self.test_loader)
            print(f"fake epoch {epoch}: {n} train, {m} test", flush=True)
""",
    "data/__init__.py": "def create_dataLoader(opt):\n    raise RuntimeError('replaced')\n",
    "models/__init__.py": "",
}


def test_e2e_times_launch_and_the_released_script_on_the_same_split(tmp_path):
    """e2e.py with --release-checkout: launch.py's run broken down, then the released script's
    Trainer.train() (a stand-in checkout here, with the released code's names) fed the run's own
    digits split, both timed from the outside; the summary prints both walls and their ratio."""
    for rel, text in FAKE_RELEASE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    res = script(
        "e2e.py",
        *("--release-checkout", str(tmp_path), "--"),
        *("trainer.epochs=1", "dataset.test_fraction=0.8"),
    )
    ours, released = (json.loads(x) for x in res.stdout.splitlines()[:2])
    assert ours["bench"] == "e2e" and ours["phases_s"]["training epochs"] > 0
    assert ours["wall_s"] > ours["outside_training_s"] > 0
    assert released["bench"] == "e2e-release" and released["epochs"] == 1
    assert released["images"] == {"train": 359, "test": 1438}  # digits: 1,797 images, 80 % held out
    assert released["wall_s"] > sum(released["phases_s"].values()) > 0
    assert "ffsd's wall / the released script's wall:" in res.stdout


def test_concurrency_splits_networks_evenly_and_times_both_ways_with_equal_gradients():
    from benchmarks.concurrency import split

    assert split([1, 2, 3], 2) == [[1, 2], [3]]
    assert split([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split([1, 2], 4) == [[1], [2]]  # never an empty worker

    res = script(
        "concurrency.py",
        "--model",
        "resnet20",
        "--batch-size",
        "4",
        "--rounds",
        "1",
        "--workers",
        "3",
    )
    (line,) = [json.loads(s) for s in res.stdout.splitlines() if s.startswith("{")]
    assert line["bench"] == "concurrency" and line["networks"] == 3  # 2 students, the leader
    assert line["concurrent"]["networks_per_worker"] == [1, 1, 1]
    assert line["concurrent"]["intra_op_threads_per_worker"] == [1, 1, 1]
    assert line["sequential"]["ms"] > 0 and line["concurrent"]["ms"] > 0
    assert line["speedup_concurrent_over_sequential"] == pytest.approx(
        line["sequential"]["ms"] / line["concurrent"]["ms"]
    )
    # The same computation: only the order of some sums follows the thread count.
    assert line["gradients_rel_diff"] < 1e-4
    assert line["worst_gradient"]["tensor"].split(".")[0] in {"0", "1", "2"}
    assert "precise NHWC BatchNorm statistics" in " ".join(line["applied"])
