"""PNG figures of the report (``ffsd.report``), drawn with matplotlib's Agg backend (no display).

* :func:`configuration_curves`: a test metric per epoch of every configuration of a report, the
  mean over its runs (seeds) as a line and mean ± sample standard deviation as a band.
* :func:`training_curves`: test top-1 per epoch of each network of a run (FFSD: the leader, the
  fusion module and each student; another method: its deployed network, ensemble and networks).

Epoch axes have integer ticks; legends sit outside the plotted area, right of it, so they never
hide a curve.
* :func:`metric_vs_value`: a metric against a swept value (a λ): every run as a point and the
  mean ± standard deviation per value as a line.
* :func:`metric_by_category`: a metric per category (a method): every run as a point coloured by
  its seed, and the mean ± standard deviation as an error bar.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = Sequence[tuple[float, float]]


def _epoch_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")


def _legend_outside(ax, drawn: int) -> None:
    if drawn:  # a figure without lines still gets written, without a warning
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _save(fig: Figure, path: Path) -> Path:
    # bbox_inches="tight" widens the image to hold the legend beside the axes.
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_figure(runs_by_label: dict[str, Sequence[Series]], title: str, ylabel: str) -> Figure:
    """One line per label: at each epoch the mean of its runs' values, and a band of mean ±
    sample standard deviation where two or more runs have that epoch."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    drawn = 0
    for label, runs in runs_by_label.items():
        by_epoch: dict[float, list[float]] = defaultdict(list)
        for series in runs:
            for epoch, value in series:
                by_epoch[epoch].append(value)
        if not by_epoch:
            continue
        xs = sorted(by_epoch)
        means = np.array([np.mean(by_epoch[x]) for x in xs])
        stds = np.array([np.std(by_epoch[x], ddof=1) if len(by_epoch[x]) > 1 else 0 for x in xs])
        n = max(len(by_epoch[x]) for x in xs)
        (line,) = ax.plot(
            xs, means, marker="o" if len(xs) < 15 else None, ms=3, label=f"{label} (n={n})"
        )
        if n > 1:
            ax.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2)
        drawn += 1
    _epoch_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax, drawn)
    return fig


def configuration_curves(
    runs_by_label: dict[str, Sequence[Series]], title: str, path: Path, ylabel: str
) -> Path:
    """:func:`curves_figure`, written to ``path``."""
    return _save(curves_figure(runs_by_label, title, ylabel), path)


def _style(label: str) -> dict:
    if label in ("leader", "deploy"):
        return {"linewidth": 2.4, "color": "black", "zorder": 3}
    if label == "fusion":
        return {"linewidth": 1.6, "color": "tab:red", "linestyle": "--"}
    if label == "ensemble":
        return {"linewidth": 1.6, "color": "tab:purple", "linestyle": "--"}
    return {"linewidth": 1.0, "alpha": 0.8}


def training_curves(curves: dict[str, Series], title: str, path: Path, ylabel: str) -> Path:
    """One line per network: ``curves[label] = [(epoch, value), ...]``."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    drawn = 0
    for label, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, ms=3, label=label, **_style(label))
        drawn += 1
    _epoch_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax, drawn)
    return _save(fig, path)


def metric_vs_value(
    points: Sequence[tuple[float, float]], xlabel: str, ylabel: str, title: str, path: Path
) -> Path:
    """Runs as points, mean ± sample std per x as a line; log x when the values span decades."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        by_x[x].append(y)
    xs = sorted(by_x)
    means = [float(np.mean(by_x[x])) for x in xs]
    stds = [float(np.std(by_x[x], ddof=1)) if len(by_x[x]) > 1 else 0.0 for x in xs]
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ax.scatter(*zip(*points, strict=True), s=14, alpha=0.5, color="tab:blue", label="runs")
    ax.errorbar(xs, means, yerr=stds, color="black", capsize=4, marker="o", label="mean ± std")
    positive = all(x > 0 for x in xs)
    if positive and len(xs) > 1 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if len(xs) <= 10:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def metric_by_category(
    groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], ylabel: str, title: str, path: Path
) -> Path:
    """``groups[i] = (category, [(seed label, value), ...])``, the categories in the given order.

    Each value a point, the same colour for the same seed label in every category (a seed that
    is good for one method may be good for all); the mean ± sample std (none for one value) as a
    black error bar. A category without values keeps its place on the axis.
    """
    seeds = list(dict.fromkeys(s for _, points in groups for s, _ in points))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    width = max(5.5, 1.1 * len(groups) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=110)
    for x, (_, points) in enumerate(groups):
        # spread the seeds sideways so that equal values stay visible
        for seed, value in points:
            dx = 0.18 * (seeds.index(seed) / max(len(seeds) - 1, 1) - 0.5)
            ax.scatter(x - 0.15 + dx, value, s=22, color=colours[seed], alpha=0.8, zorder=2)
        if points:
            ys = [v for _, v in points]
            std = float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0
            ax.errorbar(
                x + 0.15,
                float(np.mean(ys)),
                yerr=std,
                color="black",
                capsize=5,
                marker="D",
                ms=5,
                zorder=3,
            )
    for seed in seeds:
        ax.scatter([], [], s=22, color=colours[seed], label=seed)
    ax.errorbar([], [], yerr=[], color="black", capsize=5, marker="D", ms=5, label="mean ± std")
    ax.set_xticks(range(len(groups)), [c for c, _ in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
