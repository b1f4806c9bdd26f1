"""Reports of tracked runs, read from MLflow: ``python -m ffsd.report <experiment-or-sweep>``.

The target is an MLflow experiment name (``ffsd/lambda_grid``), a sweep directory (Hydra's
``hydra.sweep.dir``, holding ``multirun.yaml``) or one run's directory; a directory that is
neither is read as an experiment name (``ffsd/methods`` is also a folder of the repository).
Written to ``--out``:

* ``report.md``: one row per configuration (the keys whose values differ between the runs, the
  seed excepted; a run that does not override a key shows the value it ran with, from its params
  or its group choices) with the mean ± sample standard deviation over its finished runs of the
  leader's best and final test top-1, the epoch of the best, the best top-1 of
  ``students_mean`` and of the fusion module, and the number of runs. Failed, killed and
  still-running runs are listed under it and never averaged in; evaluations of a run's
  checkpoint (child runs, tag ``ffsd.task=eval``) are not runs of the report.
* When the runs differ in the method (``distill=ffsd,dml,...``, :data:`METHOD_KEY`), the table
  is the method table instead: one row per method (FFSD first, then alphabetical; per method and
  values of the other varying keys when there are some) with the mean ± sample standard
  deviation of the deployed network's best and final test top-1 (``deploy/top1``: what the
  method ships, FFSD's leader), the ensemble's best test top-1 (``ensemble/top1``) and the
  number of finished runs; a cell averaging fewer runs than the row has says ``(n=…)``, and a
  metric no run of the row logged is ``–``. Beside it ``deploy_by_method.png``: every run's best
  deploy top-1 per method, coloured by seed, with the mean ± sample std.
* ``curves.png``: every configuration's test top-1 per epoch (the leader's; the deployed
  network's in a method report): the mean over its finished runs as a line, ± the sample
  standard deviation as a band.
* ``networks.png``: test top-1 per epoch of each network of one run (the best finished one, or
  ``--run``): for FFSD the leader, the fusion module and each student; for another method every
  ``test/<net>/top1`` it logged (deploy, ensemble, each network).
* ``vs_<key>.png``: the best top-1 (the leader's; the deployed network's in a method sweep)
  against each swept numeric value (each λ).

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
from dataclasses import dataclass, field, replace
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
    ("students_mean best", "best/students_mean/top1"),
    ("fusion best", "best/fusion/top1"),
)
PRIMARY = "best/leader/top1"

#: The override key naming the method (``distill=dml``): runs that differ in it are compared as
#: methods, on the metrics every method's ``evaluate`` returns rather than FFSD's networks.
METHOD_KEY = "distill"
#: Listed first in the method table: the method the others are compared against.
REFERENCE_METHOD = "ffsd"
METHOD_COLUMNS = (
    ("deploy best", "best/deploy/top1"),
    ("deploy final", "final/deploy/top1"),
    ("ensemble best", "best/ensemble/top1"),
)
METHOD_PRIMARY = "best/deploy/top1"
#: ``test/<name>/top1`` series that are statistics over networks, not one (not drawn as curves).
_NOT_A_CURVE = re.compile(r"oracle|.*_(mean|std)")


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
    #: Said when the experiment is not in the store (why the name was not read as a directory).
    note: str | None = None

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
    note = None
    if path.is_dir():
        # An experiment name can also be a directory here (ffsd/methods from the repository root).
        note = (
            f"{path} is a directory but neither a sweep (no multirun.yaml) nor a run "
            "(no .hydra/config.yaml)"
        )
    return Target(tracking_uri or default_uri(Path.cwd()), experiment=target, note=note)


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
                f"{', '.join(names) or 'none'}" + (f"; and {target.note}" if target.note else "")
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
    #: The value of the seed key(s) the rows average over (None: not set by an override).
    seed: str | None = None
    #: The run's params (its whole config, dotted) and group choices (tag ``ffsd.choices``):
    #: the effective value of a key its overrides leave out.
    params: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)

    def effective(self, key: str) -> str | None:
        """``key``'s value in this run: its override, else its param, else its group choice."""
        if key in self.config:
            return self.config[key]
        return self.params.get(key, self.choices.get(key))


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
    #: :data:`METHOD_KEY` when the runs differ in the method (then ``keys[0]``), else None.
    method_key: str | None = None

    @property
    def primary(self) -> str:
        return METHOD_PRIMARY if self.method_key else PRIMARY


def _sort_key(value: str | None) -> tuple:
    if value is None:
        return (2, "")
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _method_rank(value: str | None) -> tuple:
    if value == REFERENCE_METHOD:
        return (0, "")
    return (1, value) if value is not None else (2, "")


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1; None for one value) and count."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


def same_value(value: str | None) -> tuple:
    """What a value is, for grouping: ``10`` (an override) and ``10.0`` (a param) are one."""
    if value is None:
        return (2, "")
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def summarize(runs: list[RunInfo], target: Target) -> Report:
    """Group the finished runs by the keys whose values differ between runs.

    A run that does not override a key another run overrides has that key's effective value
    (its param or group choice), not none: runs of an experiment launched one by one compare
    on what they ran with.
    """
    every = sorted({k for r in runs for k in r.config})
    runs = [
        replace(r, config={k: v for k in every if (v := r.effective(k)) is not None}) for r in runs
    ]
    keys = [k for k in every if len({same_value(r.config.get(k)) for r in runs}) > 1]
    method = METHOD_KEY if METHOD_KEY in keys else None
    if method is not None:
        keys = [method, *(k for k in keys if k != method)]
    finished = [r for r in runs if r.status == "FINISHED"]
    groups: dict[tuple, list[RunInfo]] = {}
    shown: dict[tuple, tuple] = {}  # the first run's way of writing the values
    for r in finished:
        values = tuple(r.config.get(k) for k in keys)
        same = tuple(map(same_value, values))
        groups.setdefault(shown.setdefault(same, values), []).append(r)

    def order(values: tuple) -> tuple:
        if method is None:
            return tuple(_sort_key(x) for x in values)
        return (_method_rank(values[0]), *(_sort_key(x) for x in values[1:]))

    rows = []
    metrics = dict.fromkeys(m for _, m in (*COLUMNS, *METHOD_COLUMNS))
    for values in sorted(groups, key=order):
        row = Row(values=values, runs=groups[values])
        for metric in metrics:
            got = [r.metrics[metric] for r in row.runs if metric in r.metrics]
            if got:
                row.stats[metric] = mean_std(got)
        rows.append(row)
    unfinished = [r for r in runs if r.status != "FINISHED"]
    return Report(
        target=target,
        keys=keys,
        rows=rows,
        unfinished=unfinished,
        finished=finished,
        method_key=method,
    )


# -- writing ---------------------------------------------------------------------------------
def fmt(stat: tuple[float, float | None, int] | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    mean, std, _ = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: str | None) -> str:
    return "–" if value is None else f"`{value}`".replace("|", "\\|")


def markdown_table(report: Report) -> str:
    """The configuration table, or the method table when the runs differ in the method."""
    if report.method_key is not None:
        return method_table(report)
    head = [*(f"`{k}`" for k in report.keys), *(c for c, _ in COLUMNS), "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        cells = [_cell(v) for v in row.values]
        for _, metric in COLUMNS:
            cells.append(fmt(row.stats.get(metric), 1 if metric.startswith("best_epoch/") else 2))
        cells.append(str(len(row.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_table(report: Report) -> str:
    """One row per method (and values of the other varying keys), on the methods' own metrics."""
    head = ["method", *(f"`{k}`" for k in report.keys[1:]), *(c for c, _ in METHOD_COLUMNS)]
    lines = ["| " + " | ".join([*head, "runs"]) + " |", "|" + "---|" * (len(head) + 1)]
    for row in report.rows:
        cells = [_cell(v) for v in row.values]
        for _, metric in METHOD_COLUMNS:
            stat = row.stats.get(metric)
            cell = fmt(stat)
            # Methods log different metrics: a mean over fewer runs than the row has says so.
            if stat is not None and stat[2] < len(row.runs):
                cell += f" (n={stat[2]})"
            cells.append(cell)
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


def _natural(name: str) -> tuple:
    """``student2`` before ``student10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def curve_labels(metrics: dict[str, float]) -> list[str]:
    """The ``<net>`` of the ``test/<net>/top1`` curves to draw for a run with these metrics.

    An FFSD run (a leader and a fusion module): the leader, the fusion module and each student.
    Any other method: its deployed network and ensemble first, then each network it logged.
    """
    nets = {m.group(1) for k in metrics if (m := re.fullmatch(r"test/(.+)/top1", k))}
    if {"leader", "fusion"} <= nets:
        students = sorted((n for n in nets if re.fullmatch(r"student\d+", n)), key=_natural)
        return ["leader", "fusion", *students]
    first = [n for n in ("deploy", "ensemble") if n in nets]
    rest = sorted((n for n in nets - set(first) if not _NOT_A_CURVE.fullmatch(n)), key=_natural)
    return [*first, *rest]


def row_label(keys: list[str], values: tuple) -> str:
    """``distill.lambda_fusion=10, trainer.epochs=4``; ``all runs`` when no key varies."""
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all runs"


def draw_curves(client: MlflowClient, report: Report, out: Path) -> Path:
    """``curves.png``: every configuration's test top-1 per epoch (the leader's; the deployed
    network's in a method report), the mean over its finished runs and a ± std band."""
    metric = "test/" + report.primary.removeprefix("best/")
    runs_by_label = {
        row_label(report.keys, row.values): [history(client, r.run_id, metric) for r in row.runs]
        for row in report.rows
    }
    what = "deployed network" if report.method_key else "leader"
    title = f"test top-1 of the {what} per epoch: mean ± std over each configuration's runs"
    return plots.configuration_curves(runs_by_label, title, out / "curves.png", f"{metric} (%)")


def draw_networks(client: MlflowClient, run: RunInfo, keys: list[str], out: Path) -> Path:
    """``networks.png``: test top-1 per epoch of each network of one run."""
    curves = {
        label: history(client, run.run_id, f"test/{label}/top1")
        for label in curve_labels(run.metrics)
    }
    conf = ", ".join(f"{k}={run.config.get(k)}" for k in keys)
    title = f"run {run.name}" + (f" ({conf})" if conf and conf not in run.name else "")
    return plots.training_curves(curves, title, out / "networks.png", "test top-1 (%)")


def draw_sweeps(report: Report, out: Path) -> list[Path]:
    """``vs_<key>.png`` for every varying key whose values are all numbers."""
    primary = report.primary
    what = "deploy" if report.method_key else "leader"
    paths = []
    for key in report.keys:
        points = []
        for r in report.finished:
            try:
                x = float(r.config[key])
            except (KeyError, ValueError):
                points = []
                break
            if primary in r.metrics:
                points.append((x, r.metrics[primary]))
        if len({x for x, _ in points}) < 2:
            continue
        others = [k for k in report.keys if k != key]
        title = f"best {what} top-1 vs {key}"
        if others:
            title += "\n(runs of every other setting: " + ", ".join(others) + ")"
        name = file_safe(key)
        paths.append(
            plots.metric_vs_value(
                points, key, f"best {what} top-1 (%)", title, out / f"vs_{name}.png"
            )
        )
    return paths


def draw_methods(report: Report, out: Path) -> Path:
    """``deploy_by_method.png``: each row's runs (one point per seed) and their mean ± std."""
    groups = []
    for row in report.rows:
        label = row.values[0] or "–"
        others = [f"{k}={v}" for k, v in zip(report.keys[1:], row.values[1:], strict=True)]
        if others:
            label += "\n" + "\n".join(others)
        runs = sorted(row.runs, key=lambda r: _sort_key(r.seed))
        points = [
            (f"seed {r.seed}" if r.seed is not None else "run", r.metrics[METHOD_PRIMARY])
            for r in runs
            if METHOD_PRIMARY in r.metrics
        ]
        groups.append((label, points))
    return plots.metric_by_category(
        groups,
        "best deploy top-1 (%)",
        "best test top-1 of the deployed network, per method",
        out / "deploy_by_method.png",
    )


def build(
    target: Target, client: MlflowClient, seed_keys: tuple[str, ...] = ("trainer.seed",)
) -> tuple[Report, dict[str, int]]:
    """The report of ``target`` and, for its unfinished runs, the number of epochs logged."""
    runs = []
    for run in fetch_runs(client, target):
        tags, params = run.data.tags, dict(run.data.params)
        if tags.get("ffsd.task", "train") != "train":
            continue  # an evaluation or export of a run's checkpoint (a child run), no training
        overrides = run_overrides(client, run)
        given = override_config(overrides, ())
        seeds = [given.get(k, params.get(k)) for k in seed_keys]
        try:
            choices = dict(json.loads(tags.get("ffsd.choices", "{}")))
        except (json.JSONDecodeError, TypeError, ValueError):
            choices = {}  # cut to fit a tag: the overrides and params still say most
        runs.append(
            RunInfo(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                config=override_config(overrides, seed_keys),
                metrics=dict(run.data.metrics),
                seed=",".join(s for s in seeds if s is not None) or None,
                params=params,
                choices=choices,
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
        f"{'method' if report.method_key else 'configuration'}: mean ± sample standard "
        "deviation (n − 1) over its finished runs (seeds); *best* is the best epoch's value, "
        "*final* the last epoch's."
        + (
            " *deploy* is the network the method ships (FFSD: the leader), *ensemble* the "
            "argmax of the mean of its networks' logits; – where no run logged the metric."
            if report.method_key
            else ""
        ),
        "",
    ]
    parts += [markdown_table(report) if report.rows else "No finished runs.", ""]
    images = []
    if report.method_key is not None and report.rows:
        figure = draw_methods(report, out)
        images.append(figure)
        parts += [f"![{figure.stem}]({figure.name})", ""]
    if report.unfinished:
        parts += ["Not averaged in (failed, killed or still running):", ""]
        parts += [unfinished_table(report, epochs), ""]
    pool = {r.run_id: r for r in report.finished + report.unfinished}
    if run_id is not None and run_id not in pool:
        raise ReportError(f"--run {run_id} is not one of the runs of {target.describe()}")
    chosen = pool.get(run_id) if run_id else None
    if chosen is None and report.finished:
        chosen = max(report.finished, key=lambda r: r.metrics.get(report.primary, float("-inf")))
    if report.rows:
        curves = draw_curves(client, report, out)
        images.append(curves)
        parts += [
            "Test top-1 per epoch of every configuration (mean ± std over its runs):",
            "",
            f"![curves]({curves.name})",
            "",
        ]
    if chosen is not None:
        networks = draw_networks(client, chosen, report.keys, out)
        images.append(networks)
        why = "" if run_id else " (the best finished run)"
        parts += [
            f"Every network of run `{chosen.name}`{why}:",
            "",
            f"![networks]({networks.name})",
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
    parser.add_argument(
        "--run", help="run id whose networks to draw in networks.png (default: the best)"
    )
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
