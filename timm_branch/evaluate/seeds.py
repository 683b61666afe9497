"""Across seeds: mean ± std of each strategy's final figures, and paired differences with intervals.

A claim that one strategy beats another needs several seeds and an interval for the *paired*
difference: each seed's runs share the class order, data subset and task 0 schedule, so the
seed-to-seed noise common to both strategies cancels in the difference. The interval is
Student's t over the per-seed differences (``n - 1`` degrees of freedom).
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .metrics import ContinualMetrics

FIGURES: tuple[str, ...] = ("knn_final", "linear_final", "knn_forgetting", "linear_forgetting", "task0_learned")
"""The per-run figures compared: final all-class top-1 of the kNN and linear probes, and
forgetting (Chaudhry et al.) of each probe's per-task accuracies, in percentage points; and
``task0_learned``, the kNN top-1 on task 0's classes after task 0 as a multiple of a randomly
initialised network's (did the representation learn anything worth keeping?)."""


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its spread: ``mean``, sample ``std`` (0 for one seed), ``n`` seeds and,
    for paired differences, the two-sided ``low``/``high`` bounds of the confidence interval."""

    mean: float
    std: float
    n: int
    low: float | None = None
    high: float | None = None

    def __str__(self) -> str:
        text = f"{self.mean:+.2f}" if self.low is not None else f"{self.mean:.2f}"
        text += f" ± {self.std:.2f}"
        return text + (f" [{self.low:+.2f}, {self.high:+.2f}]" if self.low is not None else "")


def run_figures(run_dir: str | os.PathLike) -> dict[str, float | None]:
    """:data:`FIGURES` of one run folder (its ``metrics.json``), in percentage points."""
    metrics = ContinualMetrics.load(Path(run_dir) / "metrics.json")
    out: dict[str, float | None] = {}
    for probe in ("knn", "linear"):
        summary = metrics.summary(probe)
        for key, name in (("final_top1", "final"), ("forgetting", "forgetting")):
            value = summary[key]
            out[f"{probe}_{name}"] = None if value is None else 100 * value
    first = metrics.rows[0].per_task("knn") if metrics.rows else None
    random = None if metrics.random_init is None else metrics.random_init.per_task("knn")
    out["task0_learned"] = first[0] / random[0] if first and random and random[0] > 0 else None
    return out


def mean_std(values: Sequence[float]) -> Estimate:
    """Mean and sample standard deviation of ``values`` (one value or more)."""
    if not values:
        raise ValueError("no values: at least one seed is needed")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Estimate(statistics.fmean(values), std, len(values))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Estimate:
    """``a - b`` seed by seed: mean, std and the Student-t ``confidence`` interval of the mean.

    ``a[i]`` and ``b[i]`` must come from the same seed. With one seed the interval is unbounded.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    est = mean_std(diffs)
    if est.n < 2:
        return Estimate(est.mean, est.std, est.n, -math.inf, math.inf)
    from scipy.stats import t  # scikit-learn's own dependency

    half = float(t.ppf(0.5 + confidence / 2, est.n - 1)) * est.std / math.sqrt(est.n)
    return Estimate(est.mean, est.std, est.n, est.mean - half, est.mean + half)


def seed_summary(runs: Mapping[str, Mapping[int, str | os.PathLike]], pairs: Sequence[tuple[str, str]],
                 confidence: float = 0.95) -> dict:
    """Per strategy and figure the :func:`mean_std` over seeds, and per pair ``(a, b)`` the
    :func:`paired_difference` ``a - b`` over the seeds both have.

    Args:
        runs: ``{strategy: {seed: run folder}}``.
        pairs: strategy pairs to compare, e.g. ``[("branch", "finetune")]``.

    Returns:
        ``{"strategies": {name: {figure: Estimate}}, "pairs": {"a - b": {figure: Estimate}},
        "seeds": {name: [seeds]}}``; a figure undefined in some run (one task: no forgetting) is
        left out.
    """
    figures = {name: {seed: run_figures(folder) for seed, folder in sorted(by_seed.items())} for name, by_seed in runs.items()}
    strategies = {
        name: {f: mean_std([v[f] for v in per_seed.values()]) for f in FIGURES
               if all(v[f] is not None for v in per_seed.values())}
        for name, per_seed in figures.items()
    }
    compared = {}
    for a, b in pairs:
        seeds = sorted(set(figures[a]) & set(figures[b]))
        compared[f"{a} - {b}"] = {
            f: paired_difference([figures[a][s][f] for s in seeds], [figures[b][s][f] for s in seeds], confidence)
            for f in FIGURES if all(figures[x][s][f] is not None for x in (a, b) for s in seeds)
        }
    return {"strategies": strategies, "pairs": compared, "seeds": {name: sorted(v) for name, v in figures.items()}}


def seed_table(summary: dict) -> str:
    """:func:`seed_summary` as two Markdown tables: strategies (mean ± std) and paired differences
    (mean ± std [95 % interval]); percentage points, ``task0_learned`` a ratio."""
    header = "| {} | " + " | ".join(FIGURES) + " |"
    rule = "|---|" + "---:|" * len(FIGURES)
    lines = [header.format("strategy (seeds)"), rule]
    for name, est in summary["strategies"].items():
        lines.append(f"| {name} ({len(summary['seeds'][name])}) | " + " | ".join(str(est.get(f, "–")) for f in FIGURES) + " |")
    lines += ["", header.format("paired difference"), rule]
    for name, est in summary["pairs"].items():
        lines.append(f"| {name} | " + " | ".join(str(est.get(f, "–")) for f in FIGURES) + " |")
    return "\n".join(lines)
