"""PNG plots of continual runs (timm_branch.evaluate.plots) from hand-made metrics, no training."""
from __future__ import annotations

import os
import sys

import pytest

from _helpers import recorded_figures
from timm_branch.evaluate import ContinualMetrics
from timm_branch.evaluate.plots import DPI, _spread_labels, plot_accuracy_curves, plot_accuracy_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A[i][j]: accuracy on task j after training task i (as in test_evaluate_metrics).
A = [
    [0.50, 0.20, 0.10],
    [0.40, 0.60, 0.25],
    [0.30, 0.45, 0.70],
]


def make_metrics(rows: int = 3, linear: bool = True, knn: bool = True, strategy: str = "finetune") -> ContinualMetrics:
    metrics = ContinualMetrics(num_tasks=3, task_classes=[[0, 1], [2, 3], [4, 5]], meta={"strategy": strategy})
    for i in range(rows):
        scores = {}
        if knn:
            scores.update(knn_top1=sum(A[i]) / 3 - 0.05, knn_per_task=[a * 0.9 for a in A[i]])
        if linear:
            scores.update(linear_top1=sum(A[i]) / 3, linear_per_task=A[i])
        metrics.add(i, **scores)
    return metrics


def read_png(path):
    """Check ``path`` is a complete, decodable PNG and return its pixels (H, W, channels)."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # axes, text and colours, not a blank image
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"  # ends with the IEND chunk
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.std() > 0.05  # not one flat colour
    return pixels


def no_temporaries(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_accuracy_curves_png(tmp_path):
    runs = {"finetune": make_metrics(), "branch": make_metrics(strategy="branch")}
    path = plot_accuracy_curves(runs, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    pixels = read_png(path)
    assert pixels.shape[:2] == (round(4.2 * DPI), round(6.4 * DPI))
    assert no_temporaries(path.parent)
    reference = tmp_path / "reference"
    reference.write_text("")  # an ordinary file: the umask's permissions, not mkstemp's 0600
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_accuracy_matrix_png_and_overwrite(tmp_path):
    path = tmp_path / "matrix.png"
    path.write_bytes(b"old")
    out = plot_accuracy_matrix(make_metrics(), path, title="finetune")
    assert out == path
    pixels = read_png(path)
    height, width = pixels.shape[:2]
    assert width > height > 400  # square heatmap plus a colour bar
    assert no_temporaries(tmp_path)


def test_runs_in_progress_and_without_linear_probe(tmp_path):
    in_progress = make_metrics(rows=2)
    knn_only = make_metrics(rows=3, linear=False)  # linear_probe: false in the run's config
    # Curves: the in-progress run draws 2 points, the kNN-only run falls back to kNN.
    read_png(plot_accuracy_curves({"a": in_progress, "b": knn_only}, tmp_path / "curves.png"))
    # Matrix: grey rows for tasks to come; the kNN-only run draws its kNN matrix.
    read_png(plot_accuracy_matrix(in_progress, tmp_path / "progress.png"))
    read_png(plot_accuracy_matrix(knn_only, tmp_path / "knn.png", probe="linear"))


def test_nothing_to_draw_raises_naming_the_probe(tmp_path):
    empty = make_metrics(rows=0)
    with pytest.raises(ValueError, match="linear"):
        plot_accuracy_matrix(empty, tmp_path / "m.png")
    no_per_task = ContinualMetrics(num_tasks=2)
    no_per_task.add(0, linear_top1=0.5)  # top-1 only, no per-task accuracies
    with pytest.raises(ValueError, match="knn accuracy matrix"):
        plot_accuracy_matrix(no_per_task, tmp_path / "m.png", probe="knn")
    with pytest.raises(ValueError, match="linear probe"):
        plot_accuracy_curves({"empty": empty}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="unknown probe"):
        plot_accuracy_curves({"x": make_metrics()}, tmp_path / "c.png", probe="svm")
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "c.png").exists()


def test_no_pyplot(tmp_path, monkeypatch):
    # The plots draw on Figure + FigureCanvasAgg, never through pyplot's global figure registry.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any "import matplotlib.pyplot" fails
    read_png(plot_accuracy_matrix(make_metrics(rows=1), tmp_path / "m.png"))


def test_matrix_plot_of_a_run_without_per_task_scores_says_why(tmp_path):
    unscored = ContinualMetrics(num_tasks=2)
    with pytest.raises(ValueError, match="no task has finished yet"):
        plot_accuracy_matrix(unscored, tmp_path / "m.png")
    unscored.add(0)
    unscored.add(1)
    with pytest.raises(ValueError, match=r"2 of 2 tasks finished, but none was scored per task \(the data has no labelled"):
        plot_accuracy_matrix(unscored, tmp_path / "m.png")


def test_tasks_are_numbered_from_0_as_in_the_logs_and_folders(tmp_path, monkeypatch):
    made = recorded_figures(monkeypatch, "timm_branch.evaluate.plots")
    plot_accuracy_curves({"finetune": make_metrics()}, tmp_path / "curves.png")
    plot_accuracy_matrix(make_metrics(), tmp_path / "matrix.png")
    curves, matrix = (figure.axes[0] for figure in made)
    assert list(curves.lines[0].get_xdata()) == [0, 1, 2]
    assert [t.get_text() for t in matrix.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in matrix.get_yticklabels()] == ["0", "1", "2"]


def test_end_labels_of_close_curves_are_moved_apart(tmp_path, monkeypatch):
    made = recorded_figures(monkeypatch, "timm_branch.evaluate.plots")
    runs = {name: make_metrics(strategy=name) for name in ("finetune", "branch", "cassle")}  # three equal curves
    plot_accuracy_curves(runs, tmp_path / "curves.png")
    ax = made[0].axes[0]
    heights = sorted(text.xy[1] for text in ax.texts)
    low, high = ax.get_ylim()
    assert len(heights) == 3 and min(b - a for a, b in zip(heights, heights[1:])) >= 0.05 * (high - low)


def test_spread_labels():
    assert _spread_labels([10.0, 50.0, 30.0], 5.0) == [10.0, 50.0, 30.0]  # already apart: unchanged
    assert _spread_labels([30.0, 30.0, 30.0], 4.0) == [26.0, 30.0, 34.0]  # a cluster spaced around its mean
    assert _spread_labels([30.0, 31.0, 60.0], 4.0) == [28.5, 32.5, 60.0]
    assert _spread_labels([30.0, 31.0, 35.0], 4.0) == [28.0, 32.0, 36.0]  # the pushed-up label meets the next
