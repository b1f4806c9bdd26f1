"""PNG figures of the report (``ffsd.report``), drawn with matplotlib's Agg backend (no display).

* :func:`training_curves`: test top-1 of the leader, the fusion module and each student per epoch.
* :func:`metric_vs_value`: a metric against a swept value (a λ): every run as a point and the
  mean ± standard deviation per value as a line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np
from matplotlib.ticker import MaxNLocator

Series = Sequence[tuple[float, float]]


def _style(label: str) -> dict:
    if label == "leader":
        return {"linewidth": 2.4, "color": "black", "zorder": 3}
    if label == "fusion":
        return {"linewidth": 1.6, "color": "tab:red", "linestyle": "--"}
    return {"linewidth": 1.0, "alpha": 0.8}


def training_curves(curves: dict[str, Series], title: str, path: Path, ylabel: str) -> Path:
    """One line per network: ``curves[label] = [(epoch, value), ...]``."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, ms=3, label=label, **_style(label))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
