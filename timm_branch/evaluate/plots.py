"""PNG plots of continual runs: the accuracy curves and the accuracy matrix.

Both functions draw on a :class:`matplotlib.figure.Figure` with its own Agg canvas, never through
``pyplot``: no global figure registry, no backend switch, nothing left open, safe in threads and
in a process that uses matplotlib for something else. Each PNG is written atomically
(temporary file in the target folder, then ``os.replace``), so a reader never sees a half file.

Tasks are numbered from 0 in the plots (``task 0 .. T-1``), as everywhere else: the logs, the
``task-K`` folders, ``metrics.json`` and :class:`~timm_branch.evaluate.metrics.ContinualMetrics`.

Probes. Both plots take ``probe`` (``"knn"`` or ``"linear"``). A run recorded without that probe
(``linear_probe: false`` in its configuration) falls back to the other probe, and the plot says
so (legend entry or title); a run without any usable value raises ``ValueError`` naming the
probe.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .._io import atomic_write
from .metrics import PROBES, ContinualMetrics

__all__ = ["PROBE_NAMES", "plot_accuracy_curves", "plot_accuracy_matrix"]

PROBE_NAMES = {"knn": "kNN", "linear": "linear probe"}
DPI = 120
_LABEL_GAP = 0.055
"""Least vertical distance between two end labels of the curves, as a fraction of the y-axis span."""


def _check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    return probe


def _other(probe: str) -> str:
    return next(p for p in PROBES if p != probe)


def _curve_probe(metrics: ContinualMetrics, probe: str) -> str | None:
    """``probe`` if the run has an all-class top-1 for it, else the other probe, else None."""
    for candidate in (probe, _other(probe)):
        if any(value is not None for value in metrics.top1_curve(candidate)):
            return candidate
    return None


def _matrix_probe(metrics: ContinualMetrics, probe: str) -> str | None:
    """``probe`` if the run has its accuracy matrix, else the other probe, else None."""
    for candidate in (probe, _other(probe)):
        if metrics.has_matrix(candidate):
            return candidate
    return None


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def _progress(metrics: ContinualMetrics) -> str:
    done = len(metrics.rows)
    return "" if done >= metrics.num_tasks else f" ({done}/{metrics.num_tasks} tasks)"


def plot_accuracy_curves(runs: Mapping[str, ContinualMetrics], path: str | os.PathLike, probe: str = "linear") -> Path:
    """All-class top-1 (%) after each task, one line per run: the papers' main figure.

    ``runs`` maps a legend label to a run's metrics (see
    :func:`timm_branch.evaluate.report.load_runs`). x = task 0..T-1 (T = the largest number of
    tasks among the runs), y = top-1 in percent on the test data of all tasks with the
    prediction over all classes. A run in progress draws the tasks done so far and its legend
    entry says ``(R/T tasks)``; a run recorded without ``probe`` is drawn with the other probe,
    dashed, and its legend entry says which. Runs with no evaluation yet are left out. With up to
    6 runs each line ends in its last value, the labels moved apart where they would overlap.
    Returns the path of the PNG.

    Raises ``ValueError`` when no run has a top-1 value for either probe.
    """
    _check_probe(probe)
    if not runs:
        raise ValueError("no run to plot")
    lines = []
    for label, metrics in runs.items():
        used = _curve_probe(metrics, probe)
        if used is None:
            continue
        values = [math.nan if v is None else 100.0 * v for v in metrics.top1_curve(used)]
        note = _progress(metrics)
        if used != probe:
            note += f" [{PROBE_NAMES[used]}]"
        lines.append((f"{label}{note}", values, used != probe))
    if not lines:
        raise ValueError(f"no run has an all-class top-1 for the {probe} probe (or the other one) to plot: {', '.join(runs)}")

    num_tasks = max(metrics.num_tasks for metrics in runs.values())
    figure = _new_figure(6.4, 4.2)
    ax = figure.add_subplot()
    ends = []  # (x, value, colour) of each line's last value
    for label, values, fallback in lines:
        x = list(range(len(values)))
        line, = ax.plot(x, values, marker="o", markersize=5, linewidth=1.8, linestyle="--" if fallback else "-", label=label)
        last = max((i for i, v in enumerate(values) if not math.isnan(v)), default=None)
        if last is not None:
            ends.append((x[last], values[last], line.get_color()))
    ax.set_xlim(-0.3, num_tasks - 0.7 + (0.35 if len(lines) <= 6 else 0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_tasks, 12)))
    ax.set_xlabel("after training task")
    ax.set_ylabel("top-1 accuracy, all classes (%)")
    finite = [v for _, values, _ in lines for v in values if not math.isnan(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(2.0, 0.12 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
    if len(lines) <= 6:
        _label_ends(ax, ends)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"All-class top-1 after each task ({PROBE_NAMES[probe]})")
    ax.legend(loc="best", fontsize=8, frameon=True)
    return _save(figure, path)


def plot_accuracy_matrix(metrics: ContinualMetrics, path: str | os.PathLike, probe: str = "linear", title: str | None = None) -> Path:
    """Heatmap of ``A[i][j]`` in percent, the number written in each cell.

    Rows ``after task i``, columns ``task j`` (i, j = 0..T-1). The colour scale is fixed to
    0-100 % so heatmaps of different runs compare by eye. Cells on the diagonal (the task just
    trained) are outlined; cells right of it show tasks not trained yet (the basis of forward
    transfer). A run in progress has grey, empty rows for the tasks still to come. A run
    recorded without ``probe``'s matrix is drawn with the other probe's, and the title says so.
    ``title`` (e.g. the run's label) heads the figure. Returns the path of the PNG.

    Raises ``ValueError`` naming the probe when the run has no accuracy matrix for either probe
    (no task evaluated yet, or per-task accuracies not recorded).
    """
    _check_probe(probe)
    used = _matrix_probe(metrics, probe)
    if used is None:
        why = ("no task has finished yet" if not metrics.rows else
               f"{len(metrics.rows)} of {metrics.num_tasks} tasks finished, but none was scored per task "
               "(the data has no labelled test split)")
        raise ValueError(f"the run has no {probe} accuracy matrix (nor a {_other(probe)} one) to plot: {why}")
    A = metrics.accuracy_matrix(used)
    T, R = metrics.num_tasks, len(A)
    grid = [[100.0 * a for a in row] for row in A] + [[math.nan] * T for _ in range(T - R)]

    size = min(12.0, max(4.2, 0.62 * T + 2.4))
    figure = _new_figure(size + 1.0, size)
    ax = figure.add_subplot()
    cmap = _colormap()
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=100.0, aspect="equal", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("top-1 accuracy (%)")

    if T <= 30:
        fontsize = max(5.0, min(10.0, 0.25 * 72.0 * (size - 2.0) / T))  # a quarter of a cell's width
        for i in range(R):
            for j in range(T):
                value = grid[i][j]
                red, green, blue, _ = cmap(value / 100.0)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if dark else "black", fontweight="bold" if i == j else "normal")
        for i in range(R):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
        for i in range(R, T):
            ax.text((T - 1) / 2, i, "not trained yet", ha="center", va="center", fontsize=9, color="dimgray")

    ticks = list(range(T))
    step = max(1, math.ceil(T / 20))
    ax.set_xticks(ticks[::step], [str(j) for j in ticks[::step]])
    ax.set_yticks(ticks[::step], [str(i) for i in ticks[::step]])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    heading = f"Accuracy matrix A[i][j] ({PROBE_NAMES[used]}"
    if used != probe:
        heading += f"; no {PROBE_NAMES[probe]} in this run"
    heading += ")"
    if title:
        heading = f"{title}{_progress(metrics)}\n{heading}"
    elif R < T:
        heading += f"\nin progress: {R}/{T} tasks"
    ax.set_title(heading, fontsize=10)
    return _save(figure, path)


def _spread_labels(values: list[float], gap: float) -> list[float]:
    """Heights for labels of ``values`` (one each, same order) at least ``gap`` apart: each
    cluster of too-close values is spaced by ``gap`` around its own mean, so labels stay beside
    their points; values already ``gap`` apart keep their height."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    clusters: list[list[int]] = []  # runs of indices, in rising value, each spaced by gap
    for k in order:
        clusters.append([k])
        while len(clusters) > 1:  # merge while a cluster's lowest label would overlap the one below
            below, above = clusters[-2], clusters[-1]
            if _placed(values, below, gap)[-1] + gap <= _placed(values, above, gap)[0] + 1e-12:
                break
            clusters[-2:] = [below + above]
    heights = [0.0] * len(values)
    for cluster in clusters:
        for k, y in zip(cluster, _placed(values, cluster, gap)):
            heights[k] = y
    return heights


def _placed(values: list[float], cluster: list[int], gap: float) -> list[float]:
    """The heights of a cluster's labels: ``gap`` apart, centred on the mean of its values."""
    centre = sum(values[k] for k in cluster) / len(cluster)
    return [centre + gap * (i - (len(cluster) - 1) / 2) for i in range(len(cluster))]


def _label_ends(ax, ends: list[tuple[int, float, str]]) -> None:
    """Write each line's last value beside it, labels at one x moved apart (:func:`_spread_labels`)."""
    low, high = ax.get_ylim()
    for x in sorted({x for x, _, _ in ends}):
        here = [(value, colour) for at, value, colour in ends if at == x]
        heights = _spread_labels([value for value, _ in here], _LABEL_GAP * (high - low))
        for (value, colour), y in zip(here, heights):
            ax.annotate(f"{value:.1f}", (x, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8,
                        color=colour, annotation_clip=False)


def _colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#e8e8e8")
