"""Across seeds: mean ± std, paired differences and their Student-t intervals."""
from __future__ import annotations

import math

import pytest

from timm_branch.evaluate.metrics import ContinualMetrics
from timm_branch.evaluate.seeds import mean_std, paired_difference, run_figures, seed_summary, seed_table


def test_paired_difference_by_hand():
    est = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.30265272975 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert (est.mean, est.std, est.n) == (2.0, 1.0, 3)
    assert est.low == pytest.approx(2.0 - half, rel=1e-9) and est.high == pytest.approx(2.0 + half, rel=1e-9)
    assert str(est) == f"+2.00 ± 1.00 [{2 - half:+.2f}, {2 + half:+.2f}]"


def test_pairing_cancels_the_common_seed_noise():
    """Seeds that shift both strategies alike leave the paired difference exact, with no spread."""
    a, b = [10.0, 30.0, 50.0], [9.0, 29.0, 49.0]
    est = paired_difference(a, b)
    assert (est.mean, est.std, est.low, est.high) == (1.0, 0.0, 1.0, 1.0)
    assert mean_std(a).std == 20.0


def test_one_seed_has_no_interval_and_bad_input_is_named():
    assert paired_difference([1.0], [0.5]).low == -math.inf
    assert mean_std([3.0]).std == 0.0
    with pytest.raises(ValueError, match="one per seed on both sides, got 2 and 1"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one seed"):
        mean_std([])


def _run(folder, finals: list[float], first_task: list[float]):
    """A two-task run's metrics.json: per-task linear/kNN accuracies after task 0 and task 1."""
    metrics = ContinualMetrics(num_tasks=2)
    metrics.set_random_init(knn_top1=0.1, knn_per_task=[0.1, 0.1])
    metrics.add(0, knn_top1=first_task[0], linear_top1=first_task[0], knn_per_task=first_task, linear_per_task=first_task)
    metrics.add(1, knn_top1=sum(finals) / 2, linear_top1=sum(finals) / 2, knn_per_task=finals, linear_per_task=finals)
    folder.mkdir(parents=True)
    metrics.save(folder)
    return folder


def test_seed_summary_reads_run_folders(tmp_path):
    runs = {
        "finetune": {s: _run(tmp_path / f"f{s}", [0.2, 0.4], [0.3, 0.1]) for s in (0, 1)},
        "branch": {s: _run(tmp_path / f"b{s}", [0.3 + 0.02 * s, 0.4], [0.3, 0.1]) for s in (0, 1)},
    }
    figures = run_figures(runs["finetune"][0])
    assert figures["linear_final"] == pytest.approx(30.0) and figures["linear_forgetting"] == pytest.approx(10.0)
    assert figures["task0_learned"] == pytest.approx(3.0)  # kNN 0.3 on task 0 after it, against 0.1 at random init
    summary = seed_summary(runs, [("branch", "finetune")])
    diff = summary["pairs"]["branch - finetune"]
    assert diff["linear_final"].mean == pytest.approx(5.5) and diff["linear_forgetting"].mean == pytest.approx(-11.0)
    table = seed_table(summary)
    assert "| branch (2) |" in table and "| branch - finetune | +5.50 ± 0.71 [" in table
