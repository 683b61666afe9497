"""Continual metrics and metrics.json (timm_branch.evaluate.metrics) on hand-made values."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from timm_branch.evaluate import (
    ContinualMetrics,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    per_task_accuracy,
    top1_accuracy,
)

# A[i][j]: accuracy on task j after training task i.
A = [
    [0.50, 0.20, 0.10],
    [0.40, 0.60, 0.25],
    [0.30, 0.45, 0.70],
]
RANDOM = [0.15, 0.10, 0.05]


def test_metrics_on_a_hand_written_matrix():
    # ACC = (0.30 + 0.45 + 0.70) / 3 = 1.45 / 3 = 0.483333
    assert average_accuracy(A) == pytest.approx(1.45 / 3)
    # F: task 0: max(0.50, 0.40) - 0.30 = 0.20; task 1: max(0.20, 0.60) - 0.45 = 0.15 -> 0.175
    assert forgetting(A) == pytest.approx(0.175)
    # BWT: (0.30 - 0.50) + (0.45 - 0.60) = -0.35, / 2 = -0.175
    assert backward_transfer(A) == pytest.approx(-0.175)
    # FWT: (A[0][1] - 0.10) + (A[1][2] - 0.05) = 0.10 + 0.20 = 0.30, / 2 = 0.15
    assert forward_transfer(A, RANDOM) == pytest.approx(0.15)


def test_partial_runs_and_undefined_values():
    two = A[:2]  # after task 1: ACC (0.40 + 0.60) / 2; F 0.50 - 0.40; BWT 0.40 - 0.50; FWT 0.20 - 0.10
    assert average_accuracy(two) == pytest.approx(0.5)
    assert forgetting(two) == pytest.approx(0.10)
    assert backward_transfer(two) == pytest.approx(-0.10)
    assert forward_transfer(two, RANDOM) == pytest.approx(0.10)
    one = A[:1]
    assert average_accuracy(one) == pytest.approx(0.5)
    assert forgetting(one) is None and backward_transfer(one) is None and forward_transfer(one, RANDOM) is None


def test_forgetting_max_over_all_earlier_rows_or_since_learned():
    # Task 1 scores 0.65 after task 0, before it is trained; 0.60 after training it; 0.45 at the end.
    B = [[0.50, 0.65, 0.10], [0.40, 0.60, 0.25], [0.30, 0.45, 0.70]]
    assert forgetting(B) == pytest.approx((0.20 + 0.20) / 2)  # max over i < 2: 0.65 - 0.45
    assert forgetting(B, since_learned=True) == pytest.approx((0.20 + 0.15) / 2)  # max over i = 1


def test_matrix_validation():
    with pytest.raises(ValueError, match="fraction"):
        average_accuracy([[50.0, 20.0], [40.0, 60.0]])  # percentages
    with pytest.raises(ValueError):
        average_accuracy([[0.5], [0.4]])  # more rows than tasks
    with pytest.raises(ValueError):
        forward_transfer(A, [0.1, 0.1])


LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
PREDS = torch.tensor([0, 1, 2, 0, 0, 2, 2, 1])


def test_per_task_accuracy_by_classes_and_masks():
    # task {0, 1}: samples 0, 1, 4, 5 -> predicted 0, 1, 0, 2 -> 3 of 4 right (class 2 counts wrong)
    # task {2, 3}: samples 2, 3, 6, 7 -> predicted 2, 0, 2, 1 -> 2 of 4 right
    assert per_task_accuracy(PREDS, LABELS, task_classes=[[0, 1], [2, 3]]) == [0.75, 0.5]
    scores = torch.nn.functional.one_hot(PREDS, 4).float()
    assert per_task_accuracy(scores, LABELS, task_classes=[[0, 1], [2, 3]]) == [0.75, 0.5]
    # masks: first half -> 0, 1, 2, 0 vs 0, 1, 2, 3 = 0.75; second half -> 0, 2, 2, 1 vs 0, 1, 2, 3 = 0.5
    first = torch.arange(8) < 4
    assert per_task_accuracy(PREDS, LABELS, task_masks=[first, ~first]) == [0.75, 0.5]
    assert top1_accuracy(PREDS, LABELS) == 5 / 8
    with pytest.raises(ValueError):
        per_task_accuracy(PREDS, LABELS)
    with pytest.raises(ValueError):
        per_task_accuracy(PREDS, LABELS, task_classes=[[0, 1]], task_masks=[first])
    with pytest.raises(ValueError, match="no test samples"):
        per_task_accuracy(PREDS, LABELS, task_classes=[[0, 1], [7]])


def _record() -> ContinualMetrics:
    metrics = ContinualMetrics(num_tasks=3, task_classes=[[0, 1], [2, 3], [4, 5]], meta={"strategy": "branch"})
    metrics.set_random_init(linear_top1=0.1, linear_per_task=RANDOM, knn_top1=0.12, knn_per_task=[0.2, 0.2, 0.2])
    for i, row in enumerate(A):
        metrics.add(i, linear_top1=sum(row) / 3, linear_per_task=row, knn_top1=0.3, knn_per_task=[0.3] * 3, epoch=10 * (i + 1))
    return metrics


def test_summary_and_round_trip(tmp_path):
    metrics = _record()
    summary = metrics.summary("linear")
    assert summary["tasks_done"] == 3
    assert summary["final_top1"] == pytest.approx(1.45 / 3)
    assert summary["average_accuracy"] == pytest.approx(1.45 / 3)
    assert summary["forgetting"] == pytest.approx(0.175)
    assert summary["backward_transfer"] == pytest.approx(-0.175)
    assert summary["forward_transfer"] == pytest.approx(0.15)
    assert metrics.summary("knn")["forward_transfer"] == pytest.approx(0.1)  # 0.3 - 0.2 per task

    path = metrics.save(tmp_path)
    assert path == tmp_path / "metrics.json"
    assert sorted(os.listdir(tmp_path)) == ["accuracy_matrix.csv", "metrics.json"]  # no temp files
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["summary"]["linear"]["forgetting"] == pytest.approx(0.175)
    assert data["rows"][2]["extra"] == {"epoch": 30}
    assert data["meta"] == {"strategy": "branch"} and data["task_classes"] == [[0, 1], [2, 3], [4, 5]]
    loaded = ContinualMetrics.load(tmp_path)
    assert loaded.to_dict() == metrics.to_dict()
    assert ContinualMetrics.load(path).accuracy_matrix("linear") == A

    with open(tmp_path / "accuracy_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["probe", "after_task", "task_0", "task_1", "task_2"]
    linear = [r for r in rows[1:] if r[0] == "linear"]
    assert [int(r[1]) for r in linear] == [-1, 0, 1, 2]
    assert [[float(v) for v in r[2:]] for r in linear[1:]] == A


def test_resume_appends_and_redo_replaces(tmp_path):
    metrics = ContinualMetrics(num_tasks=3)
    metrics.add(0, knn_top1=0.4, knn_per_task=A[0])
    metrics.save(tmp_path)
    resumed = ContinualMetrics.load(tmp_path)
    assert resumed.summary("knn")["forgetting"] is None
    assert resumed.summary("linear")["average_accuracy"] is None  # no linear matrix recorded
    with pytest.raises(ValueError):
        resumed.add(2, knn_per_task=A[2])  # task 1 is missing
    resumed.add(1, knn_per_task=A[1])
    resumed.add(2, knn_per_task=A[2])
    assert resumed.accuracy_matrix("knn") == A
    resumed.add(1, knn_per_task=A[2])  # task 1 redone: rows 1.. replaced
    assert resumed.accuracy_matrix("knn") == [A[0], A[2]]
    with pytest.raises(ValueError):
        resumed.add(2, knn_per_task=[0.5, 0.5])  # wrong length
    with pytest.raises(ValueError):
        resumed.add(2, knn_top1=75.0)  # a percentage


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    metrics = _record()
    metrics.save(tmp_path)
    old = (tmp_path / "metrics.json").read_text()
    metrics.add(1, linear_per_task=A[1])  # changes the record (drops task 2)

    def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        metrics.save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "metrics.json").read_text() == old
    assert sorted(os.listdir(tmp_path)) == ["accuracy_matrix.csv", "metrics.json"]


CURVE = [{"epoch": 1, "loss": 4.9, "lr": 0.3}, {"epoch": 2, "loss": 4.7, "lr": 0.15}]


def test_each_row_keeps_its_training_curve_and_version_1_files_still_read(tmp_path):
    metrics = ContinualMetrics(num_tasks=3)
    metrics.add(0, knn_top1=0.5, epochs=CURVE, seconds=1.0)
    metrics.add(1, knn_top1=0.6, epochs=[{"epoch": 1, "loss": None, "lr": 0.3}])  # a non-finite mean loss
    metrics.save(tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["version"] == 2 and data["rows"][0]["epochs"] == CURVE and data["rows"][0]["extra"] == {"seconds": 1.0}
    assert ContinualMetrics.load(tmp_path).rows[1].epochs == [{"epoch": 1, "loss": None, "lr": 0.3}]
    # A file of version 1 (no training curves) reads as before.
    data["version"] = 1
    for row in data["rows"]:
        del row["epochs"]
    old = ContinualMetrics.from_dict(data)
    assert [row.epochs for row in old.rows] == [None, None] and old.rows[0].knn_top1 == 0.5
    data["version"] = 3
    with pytest.raises(ValueError, match="version 3 .*reads 1, 2"):
        ContinualMetrics.from_dict(data)


@pytest.mark.parametrize("epochs, problem", [
    ([{"epoch": 2, "loss": 1.0, "lr": 0.1}], "expected 1"),
    ([{"epoch": 1, "loss": float("nan"), "lr": 0.1}], "finite"),
    ([{"epoch": 1, "loss": 1.0, "lr": -0.1}], "finite"),
    ([{"epoch": 1, "loss": 1.0}], "keys epoch, loss and lr"),
])
def test_a_bad_training_curve_is_refused(epochs, problem):
    with pytest.raises(ValueError, match=problem):
        ContinualMetrics(num_tasks=2).add(0, knn_top1=0.5, epochs=epochs)
