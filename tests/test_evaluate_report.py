"""Run comparison (timm_branch.evaluate.report): labels, the Markdown table, plots."""
from __future__ import annotations

import json

import pytest

from timm_branch.evaluate import ContinualMetrics
from timm_branch.evaluate.report import (
    CURVES_FILE,
    load_runs,
    markdown_table,
    matrix_filename,
    report,
    run_labels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A[i][j]: accuracy on task j after training task i; RANDOM: a randomly initialised copy.
A = [
    [0.50, 0.20, 0.10],
    [0.40, 0.60, 0.25],
    [0.30, 0.45, 0.70],
]
RANDOM = [0.15, 0.10, 0.05]
KNN_TOP1 = [0.20, 0.35, 0.42]
LINEAR_TOP1 = [0.25, 0.40, 0.4833]


def meta(strategy="finetune", method="simclr", shape="1x1", bn="frozen", seed=0, model="resnet18"):
    return {"strategy": strategy, "method": method, "model": model, "shape": shape, "bn": bn, "seed": seed,
            "data": ["digits"], "scenario": "class"}


def make_metrics(rows=3, linear=True, random_init=True, **meta_kwargs) -> ContinualMetrics:
    """The hand-made run: kNN and linear share the matrix A, top-1 from the lists above."""
    metrics = ContinualMetrics(num_tasks=3, task_classes=[[0, 1], [2, 3], [4, 5]], meta=meta(**meta_kwargs))
    if random_init:
        metrics.set_random_init(knn_per_task=RANDOM, **({"linear_per_task": RANDOM} if linear else {}))
    for i in range(rows):
        scores = {"knn_top1": KNN_TOP1[i], "knn_per_task": A[i]}
        if linear:
            scores.update(linear_top1=LINEAR_TOP1[i], linear_per_task=A[i])
        metrics.add(i, **scores)
    return metrics


def save_run(folder, metrics):
    metrics.save(folder)
    return folder


def table_rows(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    assert lines[1].startswith("| :---")
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[2:]]
    return {row[0]: row[1:] for row in cells}


def test_table_numbers_by_hand():
    runs = {"done": make_metrics(), "two tasks": make_metrics(rows=2), "one task": make_metrics(rows=1),
            "no random init": make_metrics(random_init=False)}
    table = markdown_table(runs, "linear")
    assert table.splitlines()[0] == ("| run | tasks | kNN top-1 (%) | linear top-1 (%) | avg acc (linear, %) "
                                     "| forgetting (pp) | BWT (pp) | FWT (pp) |")
    rows = table_rows(table)
    # ACC (0.30 + 0.45 + 0.70) / 3 = 48.33 %; F ((0.50 - 0.30) + (0.60 - 0.45)) / 2 = 17.5 pp;
    # BWT ((0.30 - 0.50) + (0.45 - 0.60)) / 2 = -17.5 pp; FWT ((0.20 - 0.10) + (0.25 - 0.05)) / 2 = 15 pp.
    assert rows["done"] == ["3/3", "42.00", "48.33", "48.33", "+17.50", "-17.50", "+15.00"]
    # After task 1: ACC (0.40 + 0.60) / 2; F 0.50 - 0.40; BWT 0.40 - 0.50; FWT 0.20 - 0.10.
    assert rows["two tasks"] == ["2/3", "35.00", "40.00", "50.00", "+10.00", "-10.00", "+10.00"]
    # One task: nothing old to forget or transfer to.
    assert rows["one task"] == ["1/3", "20.00", "25.00", "50.00", "-", "-", "-"]
    assert rows["no random init"][-1] == "-"


def test_table_with_linear_probe_disabled():
    runs = {"knn only": make_metrics(linear=False)}
    linear = table_rows(markdown_table(runs, "linear"))["knn only"]
    assert linear == ["3/3", "42.00", "-", "-", "-", "-", "-"]
    knn = table_rows(markdown_table(runs, "knn"))["knn only"]
    assert knn == ["3/3", "42.00", "-", "48.33", "+17.50", "-17.50", "+15.00"]
    with pytest.raises(ValueError, match="unknown probe"):
        markdown_table(runs, "svm")


def test_labels_from_meta_are_unique():
    # Strategy alone when nothing else differs.
    assert run_labels([meta("finetune"), meta("branch")], ["a", "b"]) == ["finetune", "branch"]
    # Methods differ: the method is added; a fine-tuned run's (unused) shape is ignored, and
    # the shape is added to branch runs only when they differ among themselves.
    labels = run_labels([meta("finetune", "byol", shape="full"), meta("branch", "byol", shape="1x1"),
                         meta("cassle+branch", "simclr", shape="1x1")], ["a", "b", "c"])
    assert labels == ["finetune / byol", "branch / byol", "cassle+branch / simclr"]
    labels = run_labels([meta("branch", shape="1x1"), meta("branch", shape="cross"), meta("finetune")], ["a", "b", "c"])
    assert labels == ["branch / shape=1x1", "branch / shape=cross", "finetune"]
    # Seeds differ.
    assert run_labels([meta(seed=0), meta(seed=1)], ["a", "b"]) == ["finetune / seed=0", "finetune / seed=1"]
    # Identical settings: the folder name, then a counter when folder names clash too.
    assert run_labels([meta(), meta()], ["runs/x", "runs/y"]) == ["finetune (x)", "finetune (y)"]
    labels = run_labels([meta(), meta(), meta()], ["a/run", "b/run", "c/other"])
    assert labels == ["finetune (run)", "finetune (run) #2", "finetune (other)"]
    # No meta (a hand-made record): the folder name.
    assert run_labels([{}, {}], ["runs/first", "runs/second"]) == ["first", "second"]


def test_load_runs(tmp_path):
    a = save_run(tmp_path / "a", make_metrics(strategy="finetune"))
    b = save_run(tmp_path / "b", make_metrics(strategy="branch", rows=2))
    runs = load_runs([a, b / "metrics.json"])  # a folder or the file itself
    assert list(runs) == ["finetune", "branch"]
    assert len(runs["branch"].rows) == 2 and runs["finetune"].accuracy_matrix("linear") == A


def test_load_runs_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-run.*no metrics.json"):
        load_runs([empty])
    with pytest.raises(FileNotFoundError, match="missing-run does not exist"):
        load_runs([tmp_path / "missing-run"])
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken-run"):
        load_runs([broken])
    (broken / "metrics.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="broken-run.*not a timm-branch-metrics record"):
        load_runs([broken])
    with pytest.raises(ValueError, match="no run folder"):
        load_runs([])


def test_matrix_filename_is_safe():
    assert matrix_filename("cassle+branch / byol / shape=cross") == "accuracy_matrix-cassle+branch_byol_shape=cross.png"
    assert matrix_filename("finetune (run) #2") == "accuracy_matrix-finetune_run_#2.png"
    assert matrix_filename("../..") == "accuracy_matrix-run.png"


def test_report_writes_the_plots(tmp_path, monkeypatch):
    runs = [save_run(tmp_path / "runs" / "ft", make_metrics(strategy="finetune")),
            save_run(tmp_path / "runs" / "br", make_metrics(strategy="branch", rows=2)),
            save_run(tmp_path / "runs" / "cb", make_metrics(strategy="cassle+branch", linear=False))]
    monkeypatch.chdir(tmp_path)
    table = report(runs)  # default output: ./report
    out = tmp_path / "report"
    names = sorted(p.name for p in out.iterdir())
    assert names == [CURVES_FILE, "accuracy_matrix-branch.png", "accuracy_matrix-cassle+branch.png", "accuracy_matrix-finetune.png"]
    for path in out.iterdir():
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    from matplotlib.image import imread

    assert imread(out / CURVES_FILE).shape[:2] == (504, 768)
    assert list(table_rows(table)) == ["finetune", "branch", "cassle+branch"]
