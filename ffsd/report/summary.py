"""Reports of tracked runs, read from MLflow: ``python -m ffsd.report <experiment-or-sweep>``.

The target is an MLflow experiment name (``ffsd/lambda_grid``), a sweep directory (Hydra's
``hydra.sweep.dir``, holding ``multirun.yaml``) or one run's directory. Written to ``--out``:

* ``report.md``: one row per configuration (the job overrides that differ between the runs,
  the seed excepted) with the mean ± sample standard deviation over its finished runs of the
  leader's best and final test top-1, the epoch of the best, the best top-1 of the students' mean
  and of the fusion module, and the number of runs. Failed, killed and still-running runs are
  listed under it and never averaged in.
* ``curves.png``: test top-1 per epoch of the leader, the fusion module and each student of one
  run (the best finished one, or ``--run``).
* ``vs_<key>.png``: the leader's best top-1 against each swept numeric value (each λ).

The store read: ``--tracking-uri``; else, for a directory, the one its jobs logged to (their
``mlflow_run.json``, else as ``multirun.yaml`` or ``.hydra/config.yaml`` resolve now); else
``MLFLOW_TRACKING_URI``; else the default SQLite store of ``conf/logger/mlflow.yaml`` under the
current directory (``outputs/mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from ffsd.config import CONF_DIR
from ffsd.report import plots
from ffsd.tracking.mlflow_tracker import RUN_RECORD, resolve_tracking_uri
from ffsd.tracking.provenance import override_key

#: (column, summary metric logged by the engine) of the table, in order.
COLUMNS = (
    ("leader best", "best/leader/top1"),
    ("leader final", "final/leader/top1"),
    ("best epoch", "best_epoch/leader/top1"),
    ("students best", "best/students_mean/top1"),
    ("fusion best", "best/fusion/top1"),
)
PRIMARY = "best/leader/top1"


class ReportError(RuntimeError):
    """The target or the store cannot be read; the message says what to do."""


# -- which runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What to report on: an experiment by name, or the runs tagged with a directory."""

    uri: str
    experiment: str | None = None
    tag: str | None = None
    directory: Path | None = None

    def describe(self) -> str:
        if self.experiment is not None:
            return f"experiment `{self.experiment}`"
        return f"runs with {self.tag} = `{self.directory}`"


def _logged_uri(cfg: DictConfig, launch_dir: Path, where: Path) -> str:
    logger = cfg.get("logger") or {}
    if "MLflowTracker" not in str(logger.get("_target_", "")):
        raise ReportError(
            f"{where} was run without MLflow tracking (logger._target_="
            f"{logger.get('_target_')}): its metrics are in each job's metrics.jsonl"
        )
    return resolve_tracking_uri(logger.get("tracking_uri"), str(logger.get("store")), launch_dir)


def default_uri(base: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``conf/logger/mlflow.yaml``'s default store under ``base``."""
    node = OmegaConf.load(CONF_DIR / "logger" / "mlflow.yaml")
    return resolve_tracking_uri(node.get("tracking_uri"), str(node.store), base)


def _recorded_uri(records: list[Path], where: Path) -> str | None:
    """The store the jobs wrote in their run record (see ``RUN_RECORD``), if they did."""
    uris = sorted({json.loads(p.read_text())["tracking_uri"] for p in records})
    if len(uris) > 1:
        raise ReportError(
            f"the jobs under {where} logged to several stores ({', '.join(uris)}): "
            "choose one with --tracking-uri"
        )
    return uris[0] if uris else None


def resolve_target(target: str, tracking_uri: str | None = None) -> Target:
    """A directory (sweep or run) when ``target`` is one, else an experiment name."""
    path = Path(target).expanduser()
    if (path / "multirun.yaml").is_file():
        cfg = OmegaConf.load(path / "multirun.yaml")
        launch = Path(OmegaConf.select(cfg, "hydra.runtime.cwd", default=None) or Path.cwd())
        uri = (
            tracking_uri
            or _recorded_uri(sorted(path.glob(f"*/{RUN_RECORD}")), path)
            or _logged_uri(cfg, launch, path)
        )
        return Target(uri, tag="ffsd.sweep_dir", directory=path.resolve())
    if (path / ".hydra" / "config.yaml").is_file():
        cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
        hydra = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        launch = Path(OmegaConf.select(hydra, "hydra.runtime.cwd", default=None) or Path.cwd())
        uri = (
            tracking_uri
            or _recorded_uri([p for p in [path / RUN_RECORD] if p.is_file()], path)
            or _logged_uri(cfg, launch, path)
        )
        return Target(uri, tag="ffsd.run_dir", directory=path.resolve())
    if path.is_dir():
        raise ReportError(
            f"{path} is a directory but neither a sweep (no multirun.yaml) nor a run "
            "(no .hydra/config.yaml)"
        )
    return Target(tracking_uri or default_uri(Path.cwd()), experiment=target)


def file_safe(name: str) -> str:
    """``name`` with every character a file name should not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def fetch_runs(client: MlflowClient, target: Target) -> list[Run]:
    """Every run of the target, oldest first."""
    if target.experiment is not None:
        exp = client.get_experiment_by_name(target.experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ReportError(
                f"{target.uri} has no experiment {target.experiment!r}; it has: "
                f"{', '.join(names) or 'none'}"
            )
        ids, query = [exp.experiment_id], ""
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
        query = f"tags.`{target.tag}` = {_quote(str(target.directory))}"
    runs: list[Run] = []
    token = None
    while ids:
        page = client.search_runs(
            ids, query, max_results=1000, order_by=["attributes.start_time ASC"], page_token=token
        )
        runs += page
        token = page.token
        if not token:
            break
    if not runs:
        raise ReportError(f"no runs for {target.describe()} in {target.uri}")
    return runs


# -- what each run is ------------------------------------------------------------------------
def run_overrides(client: MlflowClient, run: Run) -> list[str]:
    """The job's Hydra overrides (tag ``ffsd.overrides``, or its artifact when too long)."""
    tag = run.data.tags.get("ffsd.overrides")
    if tag is None:
        return []
    try:
        return list(json.loads(tag))
    except json.JSONDecodeError:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, "config/overrides.yaml", tmp)
            return list(yaml.safe_load(Path(local).read_text()) or [])


def override_config(overrides: list[str], seed_keys: tuple[str, ...]) -> dict[str, str]:
    """``{key: value}`` of ``key=value`` overrides (``+``/``~`` dropped), seed keys left out."""
    out: dict[str, str] = {}
    for item in overrides:
        _, sep, value = item.partition("=")
        key = override_key(item)
        if sep and key not in seed_keys:
            out[key] = value
    return out


@dataclass
class RunInfo:
    run_id: str
    name: str
    status: str
    config: dict[str, str]
    metrics: dict[str, float]


@dataclass
class Row:
    """One configuration: its values of the varying keys, its finished runs, their statistics."""

    values: tuple[str, ...]
    runs: list[RunInfo]
    stats: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)


@dataclass
class Report:
    target: Target
    keys: list[str]
    rows: list[Row]
    unfinished: list[RunInfo]
    finished: list[RunInfo]


def _sort_key(value: str | None) -> tuple:
    if value is None:
        return (2, "")
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1; None for one value) and count."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


def summarize(runs: list[RunInfo], target: Target) -> Report:
    """Group the finished runs by the keys whose values differ between runs."""
    every = {k for r in runs for k in r.config}
    keys = sorted(k for k in every if len({r.config.get(k) for r in runs}) > 1)
    finished = [r for r in runs if r.status == "FINISHED"]
    groups: dict[tuple, list[RunInfo]] = {}
    for r in finished:
        groups.setdefault(tuple(r.config.get(k) for k in keys), []).append(r)
    rows = []
    for values in sorted(groups, key=lambda v: tuple(_sort_key(x) for x in v)):
        row = Row(values=values, runs=groups[values])
        for _, metric in COLUMNS:
            got = [r.metrics[metric] for r in row.runs if metric in r.metrics]
            if got:
                row.stats[metric] = mean_std(got)
        rows.append(row)
    unfinished = [r for r in runs if r.status != "FINISHED"]
    return Report(target=target, keys=keys, rows=rows, unfinished=unfinished, finished=finished)


# -- writing ---------------------------------------------------------------------------------
def fmt(stat: tuple[float, float | None, int] | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    mean, std, _ = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: str | None) -> str:
    return "–" if value is None else f"`{value}`".replace("|", "\\|")


def markdown_table(report: Report) -> str:
    head = [*(f"`{k}`" for k in report.keys), *(c for c, _ in COLUMNS), "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        cells = [_cell(v) for v in row.values]
        for _, metric in COLUMNS:
            cells.append(fmt(row.stats.get(metric), 1 if metric.startswith("best_epoch/") else 2))
        cells.append(str(len(row.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unfinished_table(report: Report, epochs: dict[str, int]) -> str:
    lines = ["| run | status | configuration | epochs logged |", "|---|---|---|---|"]
    for r in report.unfinished:
        conf = ", ".join(f"{k}={r.config.get(k)}" for k in report.keys) or "–"
        lines.append(
            f"| {r.name} (`{r.run_id}`) | {r.status} | {conf} | {epochs.get(r.run_id, 0)} |"
        )
    return "\n".join(lines)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[float, float]]:
    """``[(step, value)]`` of a metric, the latest value per step (a resumed epoch counts once)."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return sorted((float(s), v) for s, (_, v) in latest.items())


def draw_curves(client: MlflowClient, run: RunInfo, keys: list[str], out: Path) -> Path:
    names = sorted(
        (m.group(1) for k in run.metrics if (m := re.fullmatch(r"test/(student\d+)/top1", k))),
        key=lambda s: int(s[len("student") :]),
    )
    curves = {
        label: history(client, run.run_id, f"test/{label}/top1")
        for label in ("leader", "fusion", *names)
    }
    conf = ", ".join(f"{k}={run.config.get(k)}" for k in keys)
    title = f"run {run.name}" + (f" ({conf})" if conf and conf not in run.name else "")
    return plots.training_curves(curves, title, out / "curves.png", "test top-1 (%)")


def draw_sweeps(report: Report, out: Path) -> list[Path]:
    """``vs_<key>.png`` for every varying key whose values are all numbers."""
    paths = []
    for key in report.keys:
        points = []
        for r in report.finished:
            try:
                x = float(r.config[key])
            except (KeyError, ValueError):
                points = []
                break
            if PRIMARY in r.metrics:
                points.append((x, r.metrics[PRIMARY]))
        if len({x for x, _ in points}) < 2:
            continue
        others = [k for k in report.keys if k != key]
        title = f"best leader top-1 vs {key}"
        if others:
            title += "\n(runs of every other setting: " + ", ".join(others) + ")"
        name = file_safe(key)
        paths.append(
            plots.metric_vs_value(
                points, key, "best leader top-1 (%)", title, out / f"vs_{name}.png"
            )
        )
    return paths


def build(
    target: Target, client: MlflowClient, seed_keys: tuple[str, ...] = ("trainer.seed",)
) -> tuple[Report, dict[str, int]]:
    """The report of ``target`` and, for its unfinished runs, the number of epochs logged."""
    runs = []
    for run in fetch_runs(client, target):
        runs.append(
            RunInfo(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                config=override_config(run_overrides(client, run), seed_keys),
                metrics=dict(run.data.metrics),
            )
        )
    report = summarize(runs, target)
    epochs = {r.run_id: len(history(client, r.run_id, "time/epoch_s")) for r in report.unfinished}
    return report, epochs


def write(
    report: Report,
    epochs: dict[str, int],
    client: MlflowClient,
    out: Path,
    run_id: str | None = None,
) -> list[Path]:
    """Write ``report.md`` and the PNGs into ``out``; returns their paths, Markdown first."""
    out.mkdir(parents=True, exist_ok=True)
    target = report.target
    parts = [
        f"# Report: {target.describe()}",
        "",
        f"Store `{target.uri}`: {len(report.finished)} finished run(s), "
        f"{len(report.unfinished)} failed, killed or running. Test top-1 (%) of each "
        "configuration: mean ± sample standard deviation (n − 1) over its finished runs (seeds); "
        "*best* is the best epoch's value, *final* the last epoch's.",
        "",
    ]
    parts += [markdown_table(report) if report.rows else "No finished runs.", ""]
    if report.unfinished:
        parts += ["Not averaged in (failed, killed or still running):", ""]
        parts += [unfinished_table(report, epochs), ""]
    pool = {r.run_id: r for r in report.finished + report.unfinished}
    if run_id is not None and run_id not in pool:
        raise ReportError(f"--run {run_id} is not one of the runs of {target.describe()}")
    chosen = pool.get(run_id) if run_id else None
    if chosen is None and report.finished:
        chosen = max(report.finished, key=lambda r: r.metrics.get(PRIMARY, float("-inf")))
    images = []
    if chosen is not None:
        curves = draw_curves(client, chosen, report.keys, out)
        images.append(curves)
        why = "" if run_id else " (the best finished run)"
        parts += [
            f"Training curves of run `{chosen.name}`{why}:",
            "",
            f"![curves]({curves.name})",
            "",
        ]
    for path in draw_sweeps(report, out):
        images.append(path)
        parts += [f"![{path.stem}]({path.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return [md, *images]


def default_out(target: Target) -> Path:
    if target.directory is not None:
        return target.directory / "report"
    return Path("outputs") / "reports" / file_safe(target.experiment or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ffsd.report",
        description="Markdown table and PNG plots of tracked runs (an MLflow experiment, a sweep "
        "directory or a run directory).",
    )
    parser.add_argument("target", help="experiment name (ffsd/lambda_grid) or a sweep/run dir")
    parser.add_argument("--tracking-uri", help="MLflow store (default: where the runs went)")
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: <dir>/report or outputs/reports/<experiment>)",
    )
    parser.add_argument("--run", help="run id whose training curves to draw (default: the best)")
    parser.add_argument(
        "--seed-key", action="append", help="override key(s) averaged over (default: trainer.seed)"
    )
    args = parser.parse_args(argv)
    try:
        target = resolve_target(args.target, args.tracking_uri)
        client = MlflowClient(tracking_uri=target.uri)
        report, epochs = build(target, client, tuple(args.seed_key or ("trainer.seed",)))
        written = write(report, epochs, client, args.out or default_out(target), args.run)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(report) if report.rows else "No finished runs.")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
