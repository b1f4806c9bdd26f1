"""``python -m ffsd.report`` on a method sweep (``+sweep=methods``), on a store filled by hand.

The runs differ in ``distill``: the report's table is the method table (deploy and ensemble
top-1 per method) and ``deploy_by_method.png`` is drawn. The λ-grid report is test_report.py's.
"""

from __future__ import annotations

import json
import statistics

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from PIL import Image

from ffsd.report import summary as report

# The sweep's methods in its order; the table lists FFSD first, then alphabetically.
METHODS = ("ffsd", "independent", "dml", "kdcl")
TABLE_ORDER = ["ffsd", "dml", "independent", "kdcl"]
SEEDS = {"ffsd": (0, 1, 2), "independent": (0, 1), "dml": (0, 1, 2), "kdcl": (0, 1, 2)}
# What each method's evaluate logs besides deploy/top1 (independent's runs predate an ensemble
# metric: its column must read "–").
NETWORKS = {
    "ffsd": ("leader", "fusion", "student0", "student1", "ensemble", "students_mean", "oracle"),
    "independent": ("net0", "net1", "net_mean", "net_std"),
    "dml": ("net0", "net1", "ensemble", "net_mean", "net_std"),
    "kdcl": ("net0", "net1", "net2", "ensemble", "net_mean"),
}


def log_run(client, exp_id, method, seed, status, best, final, ensemble, curve, final_deploy=True):
    overrides = ["+sweep=methods", f"distill={method}", f"trainer.seed={seed}"]
    run = client.create_run(
        exp_id,
        run_name=f"distill={method},trainer.seed={seed}",
        tags={"ffsd.overrides": json.dumps(overrides)},
    )
    rid = run.info.run_id
    metrics = []
    for epoch, acc in enumerate(curve, start=1):
        metrics.append(Metric("test/deploy/top1", acc, 1000 * epoch, epoch))
        for i, net in enumerate(NETWORKS[method]):
            metrics.append(Metric(f"test/{net}/top1", acc - 1 - i, 1000 * epoch, epoch))
        metrics.append(Metric("time/epoch_s", 1.0, 1000 * epoch, epoch))
    if best is not None:  # a job may log its summary and still fail (e.g. uploading a checkpoint)
        summary = {"best/deploy/top1": best, "best_epoch/deploy/top1": 2.0}
        if final_deploy:
            summary["final/deploy/top1"] = final
        if "ensemble" in NETWORKS[method]:
            summary["best/ensemble/top1"] = ensemble
            summary["final/ensemble/top1"] = ensemble - 0.25
        if method == "ffsd":
            summary["best/leader/top1"] = best
            summary["final/leader/top1"] = final
        metrics += [Metric(k, v, 10_000, 0) for k, v in summary.items()]
    client.log_batch(rid, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(
        "ffsd/methods", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    expected: dict[str, dict[str, list[float]]] = {}
    ids: dict[tuple[str, int], str] = {}
    for i, method in enumerate(METHODS):
        got = expected.setdefault(method, {"best": [], "final": [], "ensemble": []})
        for seed in SEEDS[method]:
            best = 70.0 + 2.5 * i + 0.75 * seed * (i + 1)
            final = best - 0.3 * (seed + 1)
            ensemble = best + 1.0 + 0.5 * seed
            # one DML run ended without its final deploy metric: the cell averages the other two
            final_deploy = not (method == "dml" and seed == 2)
            ids[method, seed] = log_run(
                client,
                exp_id,
                method,
                seed,
                "FINISHED",
                best,
                final,
                ensemble,
                [best - 4, best, final],
                final_deploy=final_deploy,
            )
            got["best"].append(best)
            if final_deploy:
                got["final"].append(final)
            if "ensemble" in NETWORKS[method]:
                got["ensemble"].append(ensemble)
    # unfinished runs whose values would move the means: listed, never averaged
    unfinished = {
        log_run(client, exp_id, "kdcl", 3, "FAILED", 99.0, 99.0, 99.0, [99.0]): "FAILED",
        log_run(client, exp_id, "independent", 3, "KILLED", 99.0, 99.0, 99.0, [99.0]): "KILLED",
        log_run(client, exp_id, "dml", 3, "RUNNING", None, None, None, [98.0, 99.0]): "RUNNING",
    }
    return uri, client, expected, ids, unfinished


def cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_rows_are_methods_ffsd_first_with_stats_over_finished_seeds(store):
    uri, client, expected, _, unfinished = store
    rep, epochs = report.build(report.Target(uri, experiment="ffsd/methods"), client)
    assert rep.method_key == "distill" and rep.keys == ["distill"]
    assert [row.values for row in rep.rows] == [(m,) for m in TABLE_ORDER]
    for row in rep.rows:
        method = row.values[0]
        want = expected[method]
        assert len(row.runs) == len(SEEDS[method])  # the unfinished runs are not in the row
        for metric, values in (
            ("best/deploy/top1", want["best"]),
            ("final/deploy/top1", want["final"]),
            ("best/ensemble/top1", want["ensemble"]),
        ):
            if values:
                assert row.stats[metric] == pytest.approx(
                    (statistics.fmean(values), statistics.stdev(values), len(values))
                )
            else:
                assert metric not in row.stats
    assert {r.run_id: r.status for r in rep.unfinished} == unfinished
    assert sorted(epochs.values()) == [1, 1, 2]


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_method_table_figure_and_cli(store, tmp_path, capsys):
    uri, _, expected, _, unfinished = store
    out = tmp_path / "report"
    assert report.main(["ffsd/methods", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| method | deploy best | deploy final | ensemble best | runs |" in md
    assert "leader best" not in md  # the λ table's FFSD columns are not the comparison
    rows = table_rows(md)
    assert list(rows) == TABLE_ORDER
    for method, cells in rows.items():
        want = expected[method]
        assert cells[0] == cell(want["best"])
        assert cells[-1] == str(len(SEEDS[method]))
    assert rows["ffsd"][1] == cell(expected["ffsd"]["final"])
    assert rows["dml"][1] == cell(expected["dml"]["final"]) + " (n=2)"  # 3 runs, 2 with the metric
    assert rows["kdcl"][2] == cell(expected["kdcl"]["ensemble"])
    assert rows["independent"][2] == "–"  # no run of the row logged the metric
    for run_id, status in unfinished.items():  # listed below, not averaged in
        assert run_id in md and status in md
    for png in ("deploy_by_method.png", "curves.png"):
        assert f"]({png})" in md
        with Image.open(out / png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300
    assert not list(out.glob("vs_*.png"))  # the method is no numeric value
    # the best run (by deploy top-1) is a KDCL run: its own curves, drawn without a leader
    best = max(SEEDS["kdcl"])
    assert f"`distill=kdcl,trainer.seed={best}`" in md
    printed = capsys.readouterr().out
    assert "| method |" in printed and "deploy_by_method.png" in printed


def test_curves_of_another_method_are_the_networks_it_logged(store, tmp_path):
    uri, client, _, ids, _ = store
    run = client.get_run(ids["dml", 0])
    assert report.curve_labels(run.data.metrics) == ["deploy", "ensemble", "net0", "net1"]
    ffsd = client.get_run(ids["ffsd", 0])
    assert report.curve_labels(ffsd.data.metrics) == ["leader", "fusion", "student0", "student1"]
    many = {f"test/net{i}/top1": 1.0 for i in (10, 2, 1)} | {"test/net2/ce": 1.0}
    assert report.curve_labels(many) == ["net1", "net2", "net10"]
    out = tmp_path / "one"
    args = ["ffsd/methods", "--tracking-uri", uri, "--out", str(out), "--run", ids["dml", 0]]
    assert report.main(args) == 0
    with Image.open(out / "curves.png") as img:
        img.verify()


def info(method: str, seed: int, model: str, status: str = "FINISHED", **metrics: float):
    return report.RunInfo(
        run_id=f"{method}-{model}-{seed}",
        name=f"{method}-{model}-{seed}",
        status=status,
        config={"sweep": "methods", "distill": method, "model": model},
        metrics={f"best/{k.replace('_', '/')}": v for k, v in metrics.items()},
        seed=str(seed),
    )


def test_other_varying_keys_split_the_method_rows(tmp_path):
    runs = [
        info(method, seed, model, deploy_top1=60.0 + seed + (model == "resnet56"))
        for method in ("kdcl", "ffsd", "dml")
        for model in ("resnet56", "resnet20")
        for seed in (0, 1)
    ]
    rep = report.summarize(runs, report.Target("sqlite://", experiment="ffsd/methods"))
    assert rep.keys == ["distill", "model"]
    assert [row.values for row in rep.rows] == [
        (m, a) for m in ("ffsd", "dml", "kdcl") for a in ("resnet20", "resnet56")
    ]
    assert all(row.stats["best/deploy/top1"][2] == 2 for row in rep.rows)
    table = report.markdown_table(rep).splitlines()
    assert table[0] == "| method | `model` | deploy best | deploy final | ensemble best | runs |"
    assert table[2] == "| `ffsd` | `resnet20` | 60.50 ± 0.71 | – | – | 2 |"
    figure = report.draw_methods(rep, tmp_path)
    with Image.open(figure) as img:
        img.verify()
        assert figure.name == "deploy_by_method.png" and img.format == "PNG"


def test_a_method_without_finished_runs_has_no_row_and_a_single_seed_no_std(tmp_path):
    runs = [
        info("ffsd", 0, "resnet32", deploy_top1=71.0),
        info("dml", 0, "resnet32", status="FAILED", deploy_top1=99.0),
        info("dml", 1, "resnet32", status="KILLED"),
    ]
    rep = report.summarize(runs, report.Target("sqlite://", experiment="ffsd/methods"))
    assert rep.method_key == "distill"
    assert [row.values for row in rep.rows] == [("ffsd",)]
    assert report.markdown_table(rep).splitlines()[2] == "| `ffsd` | 71.00 | – | – | 1 |"
    with Image.open(report.draw_methods(rep, tmp_path)) as img:
        img.verify()


def test_an_experiment_named_like_a_directory_here_is_the_experiment(store, tmp_path, monkeypatch):
    uri, *_ = store
    (tmp_path / "ffsd" / "methods").mkdir(parents=True)  # as in the repository's root
    (tmp_path / "ffsd" / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    target = report.resolve_target("ffsd/methods", uri)
    assert target.experiment == "ffsd/methods" and target.directory is None
    with pytest.raises(report.ReportError, match=r"neither a sweep.*nor a run"):
        report.fetch_runs(MlflowClient(uri), report.resolve_target("ffsd/other", uri))
