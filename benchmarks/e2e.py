"""Where a whole run's wall time goes, outside the training step: ``python launch.py ...`` timed
from the outside and broken down from the inside.

The run is launch.py itself, in a child process started as a user starts it (``python -X
importtime``), with timers wrapped around the functions that make up a run: Hydra's composition
and job set-up (everything before the task starts), data and method builds, validation, the
tracker (MLflow: store creation, parameters, metrics, artifacts, the final flush), training
epochs, evaluation, checkpoint and other file writes. Times are exclusive (a timed function
inside another is counted once, in the inner one); ``other`` is what no timer covers. Imports
are reported from ``-X importtime``: every top-level import of the process, grouped by package,
wherever it happens (so ``mlflow`` imported when the tracker is built shows both as an import
and inside ``tracker``).

Each run gets a fresh run directory and a fresh MLflow store (what a first run pays); prints
one JSON line per run and a breakdown table of the median over ``--repeats`` runs::

    python benchmarks/e2e.py                                # the digits quickstart, 8 epochs
    python benchmarks/e2e.py --repeats 3
    python benchmarks/e2e.py -- trainer.epochs=2            # extra launch.py overrides

``--release-checkout PATH`` (a clone of SJLeo/FFSD, never vendored) also times the released
code's own script on the same digits split, interleaved with ffsd's runs (ffsd, release, ffsd,
...): ``benchmarks/release_digits.py`` in a child process, timed from the outside the same way,
and prints both medians and their ratio::

    python benchmarks/e2e.py --repeats 3 --release-checkout /tmp/ffsd-release
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (module, attribute path, phase): the functions timed in the child.
TIMED = [
    ("ffsd.tasks.train", "run", "task (untimed parts)"),
    ("ffsd.tasks.train", "validate", "config validation"),
    ("ffsd.tasks.train", "validate_data", "config validation"),
    ("ffsd.tasks.train", "build_data", "data: build (load, split)"),
    ("ffsd.tasks.train", "instantiate_method", "method: build networks"),
    ("ffsd.training.engine", "Trainer._hold_run_dir", "run directory lock"),
    ("ffsd.training.engine", "Trainer.maybe_resume", "resume check"),
    ("ffsd.training.engine", "Trainer.train_epoch", "training epochs"),
    ("ffsd.training.engine", "Trainer.evaluate", "evaluation"),
    ("ffsd.training.engine", "Trainer.save_state", "checkpoint: last.pt"),
    ("ffsd.training.checkpoint", "save_release", "checkpoint: best network"),
    ("ffsd.training.checkpoint", "atomic_write_text", "files: metrics, config, summary"),
]
#: The tracker's methods, wrapped on the instance the run builds (``logger=...``), so that the
#: tracker's module (and MLflow) is imported when the run imports it, not by this benchmark.
TRACKER = {
    "prepare": "tracker: prepare",
    "start": "tracker: start (store, params)",
    "log_metrics": "tracker: log metrics",
    "log_summary": "tracker: log summary",
    "log_artifact": "tracker: artifacts",
    "finish": "tracker: finish (flush)",
}


class Timers:
    """Exclusive wall time per phase: a timed call's own time, minus the timed calls inside."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []

    def wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            frame = [phase, time.perf_counter(), 0.0]  # phase, start, time of inner calls
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.total[phase] += spent - frame[2]
                self.calls[phase] += 1
                if self.stack:
                    self.stack[-1][2] += spent

        return timed


def child(report: Path, overrides: list[str]) -> None:
    """Inside the run's process: launch.py run as ``python launch.py`` runs it, timers wrapped
    in once its imports are done (when its ``@hydra.main`` decorator is applied)."""
    import importlib
    import runpy

    t0, wall0 = time.perf_counter(), time.time()
    import hydra

    timers, marks = Timers(), {}
    hydra_main = hydra.main

    def install(*args, **kwargs):
        marks["imports"] = time.perf_counter()
        for module, attr, phase in TIMED:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, timers.wrap(getattr(owner, name), phase))
        train = sys.modules["ffsd.tasks.train"]

        def build_tracker(node, *a, **kw):
            tracker = node_instantiate(node, *a, **kw)
            for name, phase in TRACKER.items():
                if hasattr(tracker, name):
                    setattr(tracker, name, timers.wrap(getattr(tracker, name), phase))
            return tracker

        node_instantiate = timers.wrap(train.instantiate, "tracker: construct (imports)")
        train.instantiate = build_tracker
        run = train.run

        def first_entry(*a, **kw):  # when Hydra hands over to the task
            marks.setdefault("task", time.perf_counter())
            return run(*a, **kw)

        train.run = first_entry
        marks["wrapped"] = time.perf_counter()
        return hydra_main(*args, **kwargs)

    hydra.main = install
    sys.argv = [str(ROOT / "launch.py"), *overrides]
    status = 0
    try:
        runpy.run_path(str(ROOT / "launch.py"), run_name="__main__")
    except SystemExit as err:
        status = err.code if isinstance(err.code, int) else 1
    t_end = time.perf_counter()
    phases = dict(timers.total)
    task = marks.get("task", t_end)
    phases["import launch.py (its imports)"] = marks["imports"] - t0
    phases["benchmark: timer set-up"] = marks["wrapped"] - marks["imports"]
    phases["hydra: compose, job set-up"] = task - marks["wrapped"]
    phases["hydra: after the task"] = max(0.0, (t_end - task) - sum(timers.total.values()))
    report.write_text(
        json.dumps(
            {
                "phases": phases,
                "calls": dict(timers.calls),
                "started": wall0,
                "ended": wall0 + (t_end - t0),
            }
        )
    )
    sys.exit(status)


IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")


def top_level_imports(stderr: str) -> dict[str, float]:
    """Seconds of the process's top-level imports (nothing above them), by package."""
    out: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        m = IMPORT.match(line)
        if m and len(m.group(3)) == 0:
            out[m.group(4).split(".")[0]] += int(m.group(2)) / 1e6
    return dict(out)


def one_run(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-X",
            "importtime",
            str(Path(__file__).resolve()),
            "--child",
            str(report),
            "--",
            f"hydra.run.dir={tmp}/run",
            f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
            *overrides,
        ]
        t = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        t_exit = time.time()
        wall = t_exit - t
        if res.returncode != 0 or not report.is_file():
            raise SystemExit(f"the run failed ({res.returncode}):\n{res.stderr[-3000:]}")
        inner = json.loads(report.read_text())
    phases = inner["phases"]
    # Wall-clock stamps on both sides of the process boundary (same host clock).
    phases["interpreter start-up"] = inner["started"] - t
    phases["process exit (atexit, threads, teardown)"] = t_exit - inner["ended"]
    return {
        "bench": "e2e",
        "overrides": overrides,
        "wall_s": wall,
        "outside_training_s": wall - phases.get("training epochs", 0.0),
        "phases_s": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "calls": inner["calls"],
        "imports_s": dict(sorted(top_level_imports(res.stderr).items(), key=lambda kv: -kv[1])),
        "load_average": os.getloadavg(),
    }


def write_digits(path: Path, experiment: str, overrides: list[str]) -> int:
    """The run's own digits split (train and test tensors) for the released script; its epochs."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *overrides])
    if cfg.dataset.name != "digits":
        raise SystemExit("--release-checkout: the released script runs on the digits quickstart")
    data = instantiate(cfg.dataset)
    import torch

    torch.save({split: data.memory_tensors(split) for split in ("train", "test")}, path)
    return int(cfg.trainer.epochs)


RELEASE_LINE = re.compile(r"release-digits: imports and set-up ([\d.]+) s, train\(\) ([\d.]+) s")


RELEASE_IMAGES = re.compile(r"release-digits: (\d+) training and (\d+) test images")


def release_run(checkout: Path, data: Path, epochs: int) -> dict:
    """The released script on ``data``, timed from the outside as ``one_run`` times launch.py."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "release_digits.py"),
            f"--release-checkout={checkout}",
            f"--data={data}",
            f"--out={tmp}/run",
            f"--epochs={epochs}",
        ]
        t = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall = time.time() - t
    m, images = RELEASE_LINE.search(res.stdout), RELEASE_IMAGES.search(res.stdout)
    if res.returncode != 0 or not m or not images:
        raise SystemExit(f"the released script failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return {
        "bench": "e2e-release",
        "iteration": "released code",
        "epochs": epochs,
        "images": {"train": int(images.group(1)), "test": int(images.group(2))},
        "wall_s": wall,
        "phases_s": {
            "imports and set-up (inside)": float(m.group(1)),
            "Trainer.train() (train, test, save per epoch)": float(m.group(2)),
        },
        "load_average": os.getloadavg(),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[3:]
        child(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--release-checkout",
        type=Path,
        default=None,
        metavar="PATH",
        help="a checkout of SJLeo/FFSD: also time its own script on the same digits, interleaved",
    )
    p.add_argument("overrides", nargs="*", help="extra launch.py overrides (after --)")
    a = p.parse_args()
    overrides = [f"experiment={a.experiment}", *a.overrides]
    runs, released = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if a.release_checkout:
            data = Path(tmp) / "digits.pt"
            epochs = write_digits(data, a.experiment, a.overrides)
        for _ in range(a.repeats):
            runs.append(one_run(overrides))
            print(json.dumps(runs[-1]), flush=True)
            if a.release_checkout:
                released.append(release_run(a.release_checkout, data, epochs))
                print(json.dumps(released[-1]), flush=True)
    print(f"\nmedian of {len(runs)} run(s), seconds; python launch.py {' '.join(overrides)}")
    print(f"  {'wall':46s} {statistics.median(r['wall_s'] for r in runs):8.2f}")
    outside = statistics.median(r["outside_training_s"] for r in runs)
    print(f"  {'outside training epochs':46s} {outside:8.2f}")
    for name in runs[0]["phases_s"]:
        print(f"    {name:44s} {median_of(runs, 'phases_s', name):8.2f}")
    print("  top-level imports by package (inside the phases above):")
    for name in list(runs[0]["imports_s"])[:10]:
        print(f"    {name:44s} {median_of(runs, 'imports_s', name):8.2f}")
    if released:
        rel = statistics.median(r["wall_s"] for r in released)
        ours = statistics.median(r["wall_s"] for r in runs)
        print(f"\nthe released script, same digits, {epochs} epochs (benchmarks/release_digits.py)")
        print(f"  {'wall':46s} {rel:8.2f}")
        for name in released[0]["phases_s"]:
            print(f"    {name:44s} {median_of(released, 'phases_s', name):8.2f}")
        print(f"  ffsd's wall / the released script's wall: {ours / rel:.2f}")


def median_of(runs: list[dict], key: str, name: str) -> float:
    """Median over ``runs`` of ``run[key][name]`` (0 in a run that has no such entry)."""
    return statistics.median(r[key].get(name, 0.0) for r in runs)


if __name__ == "__main__":
    main()
