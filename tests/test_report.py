"""``python -m ffsd.report`` on a store filled by hand: groups, statistics, unfinished runs, plots.

The report on runs trained through ``launch.py`` is checked in test_mlflow_runs.py.
"""

from __future__ import annotations

import json
import statistics

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from PIL import Image

from ffsd.report import summary as report

LAMBDAS = ("1", "10", "100")


def log_run(client, exp_id, fusion, seed, status, best, final, curve):
    overrides = ["+sweep=lambda_grid", f"distill.lambda_fusion={fusion}", f"trainer.seed={seed}"]
    run = client.create_run(
        exp_id,
        run_name=f"distill.lambda_fusion={fusion},trainer.seed={seed}",
        tags={"ffsd.overrides": json.dumps(overrides)},
    )
    rid = run.info.run_id
    metrics = []
    for epoch, acc in enumerate(curve, start=1):
        for key, value in (
            ("test/leader/top1", acc),
            ("test/fusion/top1", acc - 1),
            ("test/student0/top1", acc - 2),
            ("test/student1/top1", acc - 3),
            ("time/epoch_s", 1.0),
        ):
            metrics.append(Metric(key, value, 1000 * epoch, epoch))
    if status == "FINISHED":
        for key, value in (
            ("best/leader/top1", best),
            ("final/leader/top1", final),
            ("best_epoch/leader/top1", float(curve.index(max(curve)) + 1)),
            ("best/students_mean/top1", best - 2.5),
            ("best/fusion/top1", best - 1),
        ):
            metrics.append(Metric(key, value, 10_000, 0))
    client.log_batch(rid, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(
        "ffsd/unit", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    expected = {}
    for i, fusion in enumerate(LAMBDAS):
        for seed in (0, 1):
            best = 80.0 + 3 * i + seed * (i + 1)
            final = best - 0.5 * seed
            log_run(client, exp_id, fusion, seed, "FINISHED", best, final, [best - 5, best, final])
            expected.setdefault(fusion, []).append((best, final))
    # a failed and a still-running run: listed, never averaged (their config has no other run)
    failed = log_run(client, exp_id, "1000", 0, "FAILED", 0, 0, [10.0])
    running = log_run(client, exp_id, "1000", 1, "RUNNING", 0, 0, [11.0, 12.0])
    return uri, client, expected, {failed: "FAILED", running: "RUNNING"}


def test_rows_are_configurations_with_mean_and_std_over_seeds(store):
    uri, client, expected, unfinished = store
    rep, epochs = report.build(report.Target(uri, experiment="ffsd/unit"), client)
    assert rep.keys == ["distill.lambda_fusion"]
    assert [row.values for row in rep.rows] == [(f,) for f in LAMBDAS]  # numeric order
    for row in rep.rows:
        pairs = expected[row.values[0]]
        best = [b for b, _ in pairs]
        final = [f for _, f in pairs]
        assert row.stats["best/leader/top1"] == pytest.approx(
            (statistics.fmean(best), statistics.stdev(best), 2)
        )
        assert row.stats["final/leader/top1"] == pytest.approx(
            (statistics.fmean(final), statistics.stdev(final), 2)
        )
        assert len(row.runs) == 2
    assert {r.run_id: r.status for r in rep.unfinished} == unfinished
    assert sorted(epochs.values()) == [1, 2]


def test_markdown_plots_and_cli(store, tmp_path, capsys):
    uri, _, expected, unfinished = store
    out = tmp_path / "report"
    assert report.main(["ffsd/unit", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    table = [x for x in md.splitlines() if x.startswith("| `") and "leader best" not in x]
    assert len(table) == len(LAMBDAS)
    for line, fusion in zip(table, LAMBDAS, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        best = [b for b, _ in expected[fusion]]
        assert cells[0] == f"`{fusion}`"
        assert cells[1] == f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}"
        assert cells[-1] == "2"
    assert "1000" not in "\n".join(table)  # unfinished runs are not averaged ...
    for run_id, status in unfinished.items():  # ... but listed
        assert run_id in md and status in md
    for png in ("curves.png", "vs_distill.lambda_fusion.png"):
        assert f"]({png})" in md
        with Image.open(out / png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300
    assert not (out / "deploy_by_method.png").exists()  # one method: no method comparison
    assert "wrote" in capsys.readouterr().out


def test_curves_take_the_latest_value_of_a_repeated_epoch(store):
    _, client, _, _ = store
    exp = client.get_experiment_by_name("ffsd/unit")
    rid = client.search_runs([exp.experiment_id])[0].info.run_id
    # a job killed after logging epoch 3 but before its checkpoint logs epoch 3 again
    client.log_batch(rid, metrics=[Metric("test/leader/top1", 99.0, 50_000, 3)])
    curve = report.history(client, rid, "test/leader/top1")
    assert [s for s, _ in curve] == [1, 2, 3] and curve[-1][1] == 99.0


def test_unknown_experiment_names_the_ones_there(store, capsys):
    uri, *_ = store
    assert report.main(["ffsd/nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "ffsd/nope" in err and "ffsd/unit" in err


def test_directory_without_tracking_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "multirun.yaml").write_text(
        "logger:\n  _target_: ffsd.tracking.NullTracker\nhydra:\n  runtime:\n    cwd: /x\n"
    )
    assert report.main([str(tmp_path)]) == 2
    assert "without MLflow tracking" in capsys.readouterr().err
