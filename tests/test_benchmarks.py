"""benchmarks/step.py keeps running: its JSON lines carry the figures and the record of the run.

Only the output's shape is checked; speed itself is measured by hand (benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    step, epoch = bench("--epoch", "--epoch-images", "20", "--epoch-repeats", "1")
    for line in (step, epoch):
        assert line["model"] == "resnet20" and line["batch_size"] == 8
        assert line["options"]["host_malloc"] != {} and "cpu_capability" in line["machine"]
        assert line["images_per_s"] > 0
    assert step["bench"] == "step" and step["iteration"] == "ffsd"
    assert step["minor_faults_per_step"] >= 0 and step["peak_rss_mb"] > 0
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
    release, cl = bench("--compare", "release,ffsd+channels_last", "--rounds", "2")
    assert release["bench"] == cl["bench"] == "compare"
    assert release["iteration"] == "release-shaped stand-in" and cl["iteration"] == "ffsd"
    assert cl["applied"] == ["channels_last"] and len(cl["per_round_images_per_s"]) == 2
    assert release["ratio_to_release"] == 1.0 and cl["ratio_to_release"] > 0
