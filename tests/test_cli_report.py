"""``timm-branch report`` (timm_branch.cli.report): the printed table, the plots, a missing run's error."""
from __future__ import annotations

import argparse

import pytest

from test_evaluate_report import make_metrics, save_run
from timm_branch.cli.report import configure_parser, run_command
from timm_branch.evaluate.metrics import ContinualMetrics
from timm_branch.evaluate.report import CURVES_FILE


def test_report_command(tmp_path, capsys):
    run = save_run(tmp_path / "run-a", make_metrics(strategy="branch"))
    empty = save_run(tmp_path / "run-b", make_metrics(strategy="finetune", rows=0))  # nothing evaluated yet
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([str(run), str(empty), "--output", str(tmp_path / "plots"), "--probe", "knn"])
    assert args.probe == "knn"
    assert run_command(args) == 0
    printed = capsys.readouterr().out
    assert "| branch | 3/3 | 42.00 | 48.33 | 48.33 | +17.50 | -17.50 | +15.00 |" in printed
    assert "| finetune | 0/3 | - | - | - | - | - | - |" in printed
    assert str(tmp_path / "plots") in printed and "accuracy_matrix-branch.png" in printed
    # The run without any evaluation has no matrix; the other plots are written.
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [CURVES_FILE, "accuracy_matrix-branch.png"]

    args = parser.parse_args([str(tmp_path / "nowhere")])
    assert args.output.name == "report" and args.probe == "linear"
    assert run_command(args) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(run), "--probe", "svm"])


@pytest.mark.parametrize("tasks, why", [(0, "no run has finished a task yet"),
                                        (2, "no finished task has accuracies to plot: the runs' data has no labelled test split")])
def test_no_plots_says_why(tmp_path, capsys, tasks, why):
    unscored = ContinualMetrics(num_tasks=2, meta={"strategy": "branch"})
    for task in range(tasks):
        unscored.add(task)  # unlabelled data: a task finishes without scores
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run_command(parser.parse_args([str(save_run(tmp_path / "run", unscored)), "--output", str(tmp_path / "plots")])) == 0
    assert f"no plots written: {why}" in capsys.readouterr().out
