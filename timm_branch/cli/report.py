"""Compare continual runs: a Markdown table of the final figures and the PNG plots.

``timm-branch report RUN_DIR [RUN_DIR ...]`` prints the table of
:func:`~timm_branch.evaluate.report.markdown_table` and the folder of each label, and writes the
plots of :func:`~timm_branch.evaluate.report.write_plots` into ``--output``. A missing or
unreadable ``metrics.json`` prints ``timm-branch report: error: ...`` naming the folder, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluate.metrics import PROBES
from ..evaluate.report import DEFAULT_OUTPUT, load_runs, markdown_table, write_plots

__all__ = ["configure_parser", "run_command"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``timm-branch report`` arguments to ``parser``."""
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders of timm-branch train (each holds metrics.json)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR", help=f"folder for the PNG plots (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--probe", choices=PROBES, default="linear", help="probe of the plots and of the summary columns (default: linear)")


def run_command(args: argparse.Namespace) -> int:
    """Print the table of ``args.runs``, write the plots into ``args.output``; 0 on success.

    A missing or unreadable ``metrics.json`` prints an error naming the folder and returns 2.
    """
    try:
        runs = load_runs(args.runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"timm-branch report: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(runs, args.probe))
    for label, path in zip(runs, args.runs):
        print(f"  {label}: {path}")
    written = write_plots(runs, args.output, args.probe)
    print()
    if written:
        print(f"plots ({args.probe} probe) written to {Path(args.output).resolve()}:")
        for path in written:
            print(f"  {path.name}")
    else:
        print(f"no plots written: {_why_no_plots(runs)}")
    return 0


def _why_no_plots(runs) -> str:
    """Why no run gave a plot: no task finished yet, or the tasks were not scored (unlabelled data)."""
    if not any(metrics.rows for metrics in runs.values()):
        return "no run has finished a task yet"
    return ("no finished task has accuracies to plot: the runs' data has no labelled test split, so the tasks "
            "were trained but not scored")
