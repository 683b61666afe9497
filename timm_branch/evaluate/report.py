"""Compare continual runs: a Markdown table of the final figures and the PNG plots.

:func:`report` (and ``timm-branch report RUN_DIR [RUN_DIR ...]``, :mod:`timm_branch.cli.report`)
reads each run folder's ``metrics.json`` (written by ``timm-branch train`` after every task, so a
run in progress can be reported too), makes the table and writes into the output folder (default
``./report``):

- ``accuracy_curves.png``: all-class top-1 after each task, one line per run;
- ``accuracy_matrix-<label>.png``: one heatmap of ``A[i][j]`` per run.

Labels. Each run is named by its strategy (``finetune``, ``branch``, ``cassle+branch``, ...),
followed by the settings that differ among the runs given: method and model, the branch shape
and BN policy (for branch strategies only, where they apply) and the seed, e.g.
``branch / byol / shape=cross``. Runs still alike get their folder name, then ``#2``, ``#3``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .metrics import METRICS_FILE, PROBES, ContinualMetrics

__all__ = [
    "CURVES_FILE",
    "DEFAULT_OUTPUT",
    "load_runs",
    "markdown_table",
    "matrix_filename",
    "report",
    "run_labels",
    "write_plots",
]

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("report")
CURVES_FILE = "accuracy_curves.png"

# Settings that may tell runs apart, in label order; the flag says whether the setting applies
# to branch strategies only (a fine-tuned run records a shape and a BN policy it never used).
_DISTINGUISHING = (("method", False, False), ("model", False, False), ("shape", True, True), ("bn", True, True), ("seed", False, True))


# ---------------------------------------------------------------------------------------------
# loading and labels


def _uses_branches(meta: Mapping) -> bool:
    return "branch" in str(meta.get("strategy", ""))


def run_labels(metas: Sequence[Mapping], folders: Sequence[str | os.PathLike]) -> list[str]:
    """One unique label per run from its ``meta`` (see the module docstring)."""
    if len(metas) != len(folders):
        raise ValueError("need one folder per meta")
    labels = []
    for meta, folder in zip(metas, folders):
        strategy = meta.get("strategy")
        labels.append([str(strategy) if strategy else Path(folder).resolve().name or str(folder)])
    for key, branch_only, keyed in _DISTINGUISHING:
        concerned = [k for k, meta in enumerate(metas) if not branch_only or _uses_branches(meta)]
        values = {json.dumps(metas[k].get(key), sort_keys=True) for k in concerned}
        if len(values) < 2:
            continue
        for k in concerned:
            value = metas[k].get(key)
            if value is None:
                continue
            labels[k].append(f"{key}={value}" if keyed else str(value))
    out = [" / ".join(parts) for parts in labels]
    # Still alike: add the folder name, then a counter.
    base = list(out)
    for k, label in enumerate(base):
        if base.count(label) > 1:
            out[k] = f"{label} ({Path(folders[k]).resolve().name})"
    seen: dict[str, int] = {}
    for k, label in enumerate(out):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            candidate = f"{label} #{seen[label]}"
            while candidate in out:
                seen[label] += 1
                candidate = f"{label} #{seen[label]}"
            out[k] = candidate
    return out


def _read(run_dir: Path) -> ContinualMetrics:
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (not a run folder of timm-branch train, or no task finished yet)")
    try:
        return ContinualMetrics.load(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: cannot read the run's metrics: {error}") from error


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> dict[str, ContinualMetrics]:
    """Read each run folder's ``metrics.json`` (a path to the file itself works too).

    Returns ``{label: metrics}`` in the order given, labels unique (see the module docstring).
    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder when ``metrics.json`` is
    missing or unreadable.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("no run folder given")
    loaded = [_read(d) for d in dirs]
    folders = [d.parent if d.is_file() else d for d in dirs]
    labels = run_labels([m.meta for m in loaded], folders)
    return dict(zip(labels, loaded))


# ---------------------------------------------------------------------------------------------
# the table


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100.0 * value:+.2f}" if signed else f"{100.0 * value:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(runs: Mapping[str, ContinualMetrics], probe: str = "linear") -> str:
    """A Markdown table of the runs' final figures, one row per run.

    Columns: run label; tasks done (``R/T``); final all-class top-1 of the kNN and of the
    linear probe (%); then, for ``probe``, average accuracy (%), forgetting, backward transfer
    and forward transfer (percentage points, signed). ``-`` marks a value that is undefined:
    the probe was not run, only one task is done (forgetting, transfers), or no random-init
    evaluation was recorded (forward transfer). Definitions: :mod:`timm_branch.evaluate.metrics`.
    """
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    header = ["run", "tasks", "kNN top-1 (%)", "linear top-1 (%)", f"avg acc ({probe}, %)",
              "forgetting (pp)", "BWT (pp)", "FWT (pp)"]
    align = [":---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for label, metrics in runs.items():
        summary = metrics.summary(probe)
        row = [
            _cell(label),
            f"{len(metrics.rows)}/{metrics.num_tasks}",
            _percent(metrics.summary("knn")["final_top1"]),
            _percent(metrics.summary("linear")["final_top1"]),
            _percent(summary["average_accuracy"]),
            _percent(summary["forgetting"], signed=True),
            _percent(summary["backward_transfer"], signed=True),
            _percent(summary["forward_transfer"], signed=True),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the plots


def matrix_filename(label: str) -> str:
    """``accuracy_matrix-<label>.png`` with the label made safe for a file name."""
    slug = re.sub(r"[^A-Za-z0-9.+=#-]+", "_", label).strip("_.") or "run"
    return f"accuracy_matrix-{slug}.png"


def write_plots(runs: Mapping[str, ContinualMetrics], output_dir: str | os.PathLike = DEFAULT_OUTPUT, probe: str = "linear") -> list[Path]:
    """Write ``accuracy_curves.png`` and one ``accuracy_matrix-<label>.png`` per run.

    A plot that cannot be drawn (a run with no evaluation yet, or without per-task accuracies)
    is skipped with a logged warning. Returns the paths written.
    """
    from .plots import plot_accuracy_curves, plot_accuracy_matrix

    output_dir = Path(output_dir)
    written = []
    try:
        written.append(plot_accuracy_curves(runs, output_dir / CURVES_FILE, probe=probe))
    except ValueError as error:
        log.warning("no accuracy curves: %s", error)
    names: dict[str, int] = {}
    for label, metrics in runs.items():
        name = matrix_filename(label)
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:  # two labels that differ only in unsafe characters
            name = name[: -len(".png")] + f"-{names[name]}.png"
        try:
            written.append(plot_accuracy_matrix(metrics, output_dir / name, probe=probe, title=label))
        except ValueError as error:
            log.warning("no accuracy matrix for %s: %s", label, error)
    return written


def report(run_dirs: Iterable[str | os.PathLike], output_dir: str | os.PathLike | None = None, probe: str = "linear") -> str:
    """Load the runs, write their plots into ``output_dir`` and return the Markdown table.

    ``output_dir`` defaults to ``./report`` (relative to the current directory), created if
    needed; existing plots of the same name are replaced.
    """
    runs = load_runs(run_dirs)
    table = markdown_table(runs, probe)
    write_plots(runs, DEFAULT_OUTPUT if output_dir is None else output_dir, probe)
    return table
