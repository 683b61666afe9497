"""Continual-learning metrics and the per-run record that holds them (``metrics.json``).

Notation. A run trains tasks 0, 1, ..., T-1 in order. After training task i the backbone is
evaluated (kNN or linear probe) and its accuracy on the test data of every task j is recorded:

    A[i][j] = accuracy on task j after training task i,   a fraction in [0, 1].

``A`` is a list of lists (row i = "after task i", column j = "on task j"). All columns are
filled in every row, also for tasks not trained yet (j > i): the probes see all classes, so a
representation can be judged on data it has not been trained on, which forward transfer uses.
A run in progress has R <= T rows; the summary metrics then describe the state after the last
row, t = R - 1, over the tasks seen so far (j <= t). With R = T (a finished run) t = T - 1:

- average accuracy  ``ACC = (1 / (t+1)) * sum_{j=0..t} A[t][j]``
- forgetting (Chaudhry et al., ECCV 2018, "Riemannian Walk", eq. for F_k; the definition CaSSLe
  cites): ``F = (1 / t) * sum_{j=0..t-1} ( max_{i=0..t-1} A[i][j] - A[t][j] )``.
  The max runs over *every* earlier row, also rows from before task j was trained (with
  ``since_learned=True`` it runs over i = j..t-1 only). Positive = accuracy lost.
- backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017, GEM):
  ``BWT = (1 / t) * sum_{j=0..t-1} ( A[t][j] - A[j][j] )``. Negative = forgetting.
- forward transfer (GEM's FWT, relative to a randomly initialised copy of the same
  architecture evaluated the same way, ``random_init[j]``):
  ``FWT = (1 / t) * sum_{j=1..t} ( A[j-1][j] - random_init[j] )``.
  How much training on tasks 0..j-1 helps on task j before task j is trained.

Forgetting, BWT and FWT need t >= 1 and are ``None`` after the first task.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .._io import atomic_write_text

__all__ = [
    "METRICS_FILE",
    "MATRIX_CSV",
    "PROBES",
    "ContinualMetrics",
    "TaskEvaluation",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "per_task_accuracy",
    "top1_accuracy",
]

METRICS_FILE = "metrics.json"
MATRIX_CSV = "accuracy_matrix.csv"
PROBES: tuple[str, ...] = ("knn", "linear")
FORMAT = "timm-branch-metrics"
VERSION = 2
"""The version :meth:`ContinualMetrics.to_dict` writes; 2 added each row's training curve (``epochs``)."""
READABLE_VERSIONS = (1, 2)
"""The versions :meth:`ContinualMetrics.from_dict` reads (a version-1 row has no training curve)."""

DEFINITIONS = {
    "accuracy_matrix": "A[i][j] = top-1 accuracy (fraction in [0, 1]) on task j's test data after training task i",
    "average_accuracy": "mean_{j<=t} A[t][j], t = last trained task",
    "forgetting": "mean_{j<t} (max_{i<t} A[i][j] - A[t][j]) (Chaudhry et al. 2018)",
    "backward_transfer": "mean_{j<t} (A[t][j] - A[j][j]) (Lopez-Paz & Ranzato 2017)",
    "forward_transfer": "mean_{1<=j<=t} (A[j-1][j] - R[j]), R[j] = same probe on a randomly initialised copy",
    "top1": "top-1 accuracy on the test data of all tasks, prediction over all classes",
}


# ---------------------------------------------------------------------------------------------
# accuracies from predictions


def top1_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of samples predicted right, in [0, 1].

    ``predictions``: (N,) integer classes, or (N, C) scores (argmax taken). ``labels``: (N,).
    """
    if predictions.ndim == 2:
        predictions = predictions.argmax(dim=1)
    if predictions.ndim != 1 or predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"need (N,) predictions and labels with N > 0, got {tuple(predictions.shape)}, {tuple(labels.shape)}")
    return (predictions.cpu().long() == labels.cpu().long()).float().mean().item()


def per_task_accuracy(
    predictions: Tensor,
    labels: Tensor,
    task_classes: Sequence[Sequence[int]] | None = None,
    task_masks: Sequence[Tensor] | None = None,
) -> list[float]:
    """Top-1 accuracy in [0, 1] restricted to each task's test samples; one value per task.

    Give exactly one of:

    - ``task_classes``: class-incremental split, ``task_classes[j]`` = the classes of task j.
      Task j's samples are those whose label is in ``task_classes[j]``; the prediction stays
      the one over all classes (no masking of logits to the task's classes).
    - ``task_masks``: ``task_masks[j]`` a (N,) bool tensor selecting task j's test samples (for
      data-incremental or domain-incremental splits, where tasks share classes).

    ``predictions``: (N,) integer classes or (N, C) scores (argmax taken); ``labels``: (N,).
    A task without any test sample raises ``ValueError``.
    """
    if (task_classes is None) == (task_masks is None):
        raise ValueError("give exactly one of task_classes and task_masks")
    if predictions.ndim == 2:
        predictions = predictions.argmax(dim=1)
    predictions, labels = predictions.cpu().long(), labels.cpu().long()
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"need (N,) predictions and labels, got {tuple(predictions.shape)}, {tuple(labels.shape)}")
    if task_classes is not None:
        masks = [torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.long)) for classes in task_classes]
    else:
        masks = []
        for j, mask in enumerate(task_masks):
            mask = torch.as_tensor(mask).cpu()
            if mask.dtype != torch.bool or mask.shape != labels.shape:
                raise ValueError(f"task_masks[{j}] must be a bool tensor of shape {tuple(labels.shape)}")
            masks.append(mask)
    correct = predictions == labels
    accuracies = []
    for j, mask in enumerate(masks):
        if not bool(mask.any()):
            raise ValueError(f"task {j} has no test samples")
        accuracies.append(correct[mask].float().mean().item())
    return accuracies


# ---------------------------------------------------------------------------------------------
# summary metrics of an accuracy matrix


def _matrix(A: Sequence[Sequence[float]]) -> list[list[float]]:
    """Validate ``A`` (R rows of equal length T >= R, finite fractions) and return a copy."""
    rows = [[float(a) for a in row] for row in A]
    if not rows:
        raise ValueError("the accuracy matrix has no rows")
    width = len(rows[0])
    if any(len(row) != width for row in rows) or width < len(rows):
        raise ValueError(f"the accuracy matrix must have R rows of equal length T >= R, got lengths {[len(r) for r in rows]}")
    for i, row in enumerate(rows):
        for j, a in enumerate(row):
            if not (math.isfinite(a) and 0.0 <= a <= 1.0):
                raise ValueError(f"A[{i}][{j}] = {a} is not a fraction in [0, 1] (percentages?)")
    return rows


def average_accuracy(A: Sequence[Sequence[float]]) -> float:
    """``mean_{j<=t} A[t][j]`` with t = last row; for a square T x T matrix ``mean_j A[T-1][j]``."""
    rows = _matrix(A)
    t = len(rows) - 1
    return sum(rows[t][: t + 1]) / (t + 1)


def forgetting(A: Sequence[Sequence[float]], since_learned: bool = False) -> float | None:
    """Chaudhry et al. 2018: ``mean_{j<t} (max_{i<t} A[i][j] - A[t][j])``, t = last row.

    ``since_learned=True`` takes the max over ``j <= i < t`` only (rows after task j was
    trained). ``None`` when there is no old task (one row).
    """
    rows = _matrix(A)
    t = len(rows) - 1
    if t == 0:
        return None
    drops = [max(rows[i][j] for i in range(j if since_learned else 0, t)) - rows[t][j] for j in range(t)]
    return sum(drops) / t


def backward_transfer(A: Sequence[Sequence[float]]) -> float | None:
    """``mean_{j<t} (A[t][j] - A[j][j])``, t = last row; ``None`` with one row."""
    rows = _matrix(A)
    t = len(rows) - 1
    if t == 0:
        return None
    return sum(rows[t][j] - rows[j][j] for j in range(t)) / t


def forward_transfer(A: Sequence[Sequence[float]], random_init: Sequence[float]) -> float | None:
    """``mean_{1<=j<=t} (A[j-1][j] - random_init[j])``, t = last row; ``None`` with one row.

    ``random_init[j]``: the same probe's accuracy on task j for a randomly initialised copy of
    the architecture (one value per task, length T; ``random_init[0]`` is not used).
    """
    rows = _matrix(A)
    if random_init is None or len(random_init) != len(rows[0]):
        raise ValueError(f"random_init must have one accuracy per task ({len(rows[0])})")
    baseline = _matrix([random_init])[0]
    t = len(rows) - 1
    if t == 0:
        return None
    return sum(rows[j - 1][j] - baseline[j] for j in range(1, t + 1)) / t


# ---------------------------------------------------------------------------------------------
# the run record


def _fraction(value: Any, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} = {value} is not a fraction in [0, 1]")
    return value


@dataclass
class TaskEvaluation:
    """The evaluation after one task: one row of ``metrics.json``.

    Attributes:
        task: index of the task just trained (``-1`` for the randomly initialised model).
        knn_top1, linear_top1: top-1 on the test data of all tasks, all classes, in [0, 1].
        knn_per_task, linear_per_task: accuracy on each task's test data (length T), in [0, 1]
            (see :func:`per_task_accuracy`); row ``task`` of that probe's accuracy matrix.
        epochs: the task's training curve, one ``{"epoch": E, "loss": L, "lr": R}`` per epoch: ``E``
            1-based as in the logs, ``L`` the mean loss of the epoch's steps (``None`` when it was not
            finite), ``R`` the learning rate when the epoch ended; ``None`` when not recorded (the
            random-init row, a recovered row, a version-1 file).
        extra: any JSON-serialisable values to keep with the row (epoch, seconds, ...).
    """

    task: int
    knn_top1: float | None = None
    linear_top1: float | None = None
    knn_per_task: list[float] | None = None
    linear_per_task: list[float] | None = None
    epochs: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def per_task(self, probe: str) -> list[float] | None:
        """Top-1 per task (fractions in [0, 1]) of ``probe`` (``"knn"`` or ``"linear"``), or ``None``."""
        return getattr(self, f"{_probe(probe)}_per_task")

    def top1(self, probe: str) -> float | None:
        """All-class top-1 (a fraction in [0, 1]) of ``probe`` (``"knn"`` or ``"linear"``), or ``None``."""
        return getattr(self, f"{_probe(probe)}_top1")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "task": self.task,
            "knn_top1": self.knn_top1,
            "linear_top1": self.linear_top1,
            "knn_per_task": None if self.knn_per_task is None else list(self.knn_per_task),
            "linear_per_task": None if self.linear_per_task is None else list(self.linear_per_task),
            "epochs": None if self.epochs is None else [dict(e) for e in self.epochs],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskEvaluation":
        """The evaluation :meth:`to_dict` wrote."""
        return cls(
            task=int(data["task"]),
            knn_top1=data.get("knn_top1"),
            linear_top1=data.get("linear_top1"),
            knn_per_task=data.get("knn_per_task"),
            linear_per_task=data.get("linear_per_task"),
            epochs=data.get("epochs"),
            extra=dict(data.get("extra") or {}),
        )


def _epoch_records(epochs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``epochs`` (see :class:`TaskEvaluation`) checked: epochs 1, 2, ... in order, a finite loss or
    ``None``, a finite non-negative learning rate."""
    records = []
    for k, entry in enumerate(epochs):
        if not isinstance(entry, dict) or set(entry) != {"epoch", "loss", "lr"}:
            raise ValueError(f"epochs[{k}] must be a dict with the keys epoch, loss and lr, got {entry!r}")
        if entry["epoch"] != k + 1:
            raise ValueError(f"epochs[{k}] is epoch {entry['epoch']!r}, expected {k + 1}: one entry per epoch, in order")
        loss, lr = entry["loss"], float(entry["lr"])
        if loss is not None and not math.isfinite(float(loss)) or not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"epochs[{k}] = {entry!r}: the loss must be finite or None, the lr finite and >= 0")
        records.append({"epoch": int(entry["epoch"]), "loss": None if loss is None else float(loss), "lr": lr})
    return records


def _probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    return probe


@dataclass
class ContinualMetrics:
    """Per-task evaluations of one continual run, their accuracy matrices and summary metrics.

    Usage in a trainer: ``metrics = ContinualMetrics(num_tasks=5, task_classes=...)`` (or
    ``ContinualMetrics.load(run_dir)`` when resuming); optionally ``set_random_init(...)`` with
    the evaluation of the randomly initialised model (needed for forward transfer); after each
    task ``add(task, knn_top1=..., knn_per_task=..., linear_top1=..., linear_per_task=...)``
    then ``save(run_dir)``, which writes ``metrics.json`` and ``accuracy_matrix.csv``
    atomically.

    Attributes:
        num_tasks: T, the number of tasks of the run (the length of every per-task list).
        task_classes: classes of each task (class-incremental splits), or ``None``.
        rows: ``rows[i]`` is the evaluation after task i, for i = 0..R-1.
        random_init: the evaluation of the randomly initialised model (``task = -1``), or None.
        meta: JSON-serialisable facts about the run (strategy, model, seed, ...).
    """

    num_tasks: int
    task_classes: list[list[int]] | None = None
    rows: list[TaskEvaluation] = field(default_factory=list)
    random_init: TaskEvaluation | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if self.task_classes is not None:
            self.task_classes = [[int(c) for c in classes] for classes in self.task_classes]
            if len(self.task_classes) != self.num_tasks:
                raise ValueError(f"task_classes has {len(self.task_classes)} tasks, num_tasks is {self.num_tasks}")
        rows, self.rows = list(self.rows), []
        for row in rows:
            self._validate(row, expect_task=len(self.rows))
            self.rows.append(row)
        if self.random_init is not None:
            self._validate(self.random_init, expect_task=-1)
        _json_ok(self.meta, "meta")

    # -- recording ------------------------------------------------------------------------------

    def _validate(self, row: TaskEvaluation, expect_task: int) -> None:
        if row.task != expect_task:
            raise ValueError(f"expected an evaluation of task {expect_task}, got task {row.task}")
        for probe in PROBES:
            top1 = row.top1(probe)
            if top1 is not None:
                setattr(row, f"{probe}_top1", _fraction(top1, f"{probe}_top1"))
            per_task = row.per_task(probe)
            if per_task is not None:
                if len(per_task) != self.num_tasks:
                    raise ValueError(f"{probe}_per_task has {len(per_task)} values, expected num_tasks = {self.num_tasks}")
                setattr(row, f"{probe}_per_task", [_fraction(a, f"{probe}_per_task[{j}]") for j, a in enumerate(per_task)])
        if row.epochs is not None:
            row.epochs = _epoch_records(row.epochs)
        _json_ok(row.extra, "extra")

    def add(
        self,
        task: int,
        *,
        knn_top1: float | None = None,
        linear_top1: float | None = None,
        knn_per_task: Sequence[float] | None = None,
        linear_per_task: Sequence[float] | None = None,
        epochs: Sequence[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> TaskEvaluation:
        """Record the evaluation after training ``task`` (0-based) and return the row.

        Tasks come in order: ``task`` must be ``len(rows)`` (the next one) or an earlier task.
        Recording an earlier task t again (a resumed run that redoes task t) replaces row t and
        drops rows t+1.. . Accuracies are fractions in [0, 1]; per-task lists have T values;
        ``epochs`` is the task's training curve (see :class:`TaskEvaluation`).
        """
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        if task > len(self.rows):
            raise ValueError(f"task {task} recorded before task {len(self.rows)}")
        row = TaskEvaluation(
            task=task,
            knn_top1=knn_top1,
            linear_top1=linear_top1,
            knn_per_task=None if knn_per_task is None else list(knn_per_task),
            linear_per_task=None if linear_per_task is None else list(linear_per_task),
            epochs=None if epochs is None else list(epochs),
            extra=extra,
        )
        self._validate(row, expect_task=task)
        del self.rows[task:]
        self.rows.append(row)
        return row

    def set_random_init(
        self,
        *,
        knn_top1: float | None = None,
        linear_top1: float | None = None,
        knn_per_task: Sequence[float] | None = None,
        linear_per_task: Sequence[float] | None = None,
        **extra: Any,
    ) -> TaskEvaluation:
        """Record the evaluation of a randomly initialised copy of the architecture."""
        row = TaskEvaluation(
            task=-1,
            knn_top1=knn_top1,
            linear_top1=linear_top1,
            knn_per_task=None if knn_per_task is None else list(knn_per_task),
            linear_per_task=None if linear_per_task is None else list(linear_per_task),
            extra=extra,
        )
        self._validate(row, expect_task=-1)
        self.random_init = row
        return row

    # -- derived values -------------------------------------------------------------------------

    def has_matrix(self, probe: str) -> bool:
        """Whether every recorded row has ``probe``'s per-task accuracies (and there is a row)."""
        return bool(self.rows) and all(row.per_task(probe) is not None for row in self.rows)

    def accuracy_matrix(self, probe: str = "linear") -> list[list[float]]:
        """``A[i][j]`` for ``probe``: R rows (tasks trained so far) x T columns, fractions."""
        if not self.has_matrix(probe):
            raise ValueError(f"not every recorded task has {probe}_per_task")
        return [list(row.per_task(probe)) for row in self.rows]

    def top1_curve(self, probe: str = "linear") -> list[float | None]:
        """All-class top-1 after each recorded task (the paper's main figure), in [0, 1]."""
        _probe(probe)
        return [row.top1(probe) for row in self.rows]

    def summary(self, probe: str = "linear") -> dict[str, float | None]:
        """Final all-class top-1 and the metrics of the module docstring, for ``probe``.

        Keys: ``tasks_done``, ``final_top1``, ``average_accuracy``, ``forgetting``,
        ``backward_transfer``, ``forward_transfer``; a value is ``None`` when it is undefined
        (no matrix, one row, or no random-init evaluation for forward transfer).
        """
        out: dict[str, float | None] = {
            "tasks_done": len(self.rows),
            "final_top1": self.rows[-1].top1(probe) if self.rows else None,
            "average_accuracy": None,
            "forgetting": None,
            "backward_transfer": None,
            "forward_transfer": None,
        }
        if not self.has_matrix(probe):
            return out
        A = self.accuracy_matrix(probe)
        out["average_accuracy"] = average_accuracy(A)
        out["forgetting"] = forgetting(A)
        out["backward_transfer"] = backward_transfer(A)
        baseline = None if self.random_init is None else self.random_init.per_task(probe)
        if baseline is not None:
            out["forward_transfer"] = forward_transfer(A, baseline)
        return out

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the recorded data, plus derived ``summary`` and ``definitions``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_tasks": self.num_tasks,
            "task_classes": self.task_classes,
            "meta": dict(self.meta),
            "random_init": None if self.random_init is None else self.random_init.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "summary": {probe: self.summary(probe) for probe in PROBES},
            "definitions": dict(DEFINITIONS),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContinualMetrics":
        """Inverse of :meth:`to_dict` (``summary`` and ``definitions`` are recomputed, not read)."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record (format = {data.get('format')!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported {FORMAT} version {data.get('version')!r} (this code reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; a newer timm-branch wrote it?)")
        random_init = data.get("random_init")
        return cls(
            num_tasks=int(data["num_tasks"]),
            task_classes=data.get("task_classes"),
            rows=[TaskEvaluation.from_dict(row) for row in data.get("rows", [])],
            random_init=None if random_init is None else TaskEvaluation.from_dict(random_init),
            meta=dict(data.get("meta") or {}),
        )

    def matrix_csv(self) -> str:
        """The accuracy matrices as CSV text.

        Header ``probe,after_task,task_0,...,task_{T-1}``; one line per probe and recorded task
        (``after_task = -1``: the randomly initialised model). Only probes with a full matrix.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["probe", "after_task", *(f"task_{j}" for j in range(self.num_tasks))])
        for probe in PROBES:
            if not self.has_matrix(probe):
                continue
            rows = ([self.random_init] if self.random_init is not None and self.random_init.per_task(probe) else []) + self.rows
            for row in rows:
                writer.writerow([probe, row.task, *(repr(a) for a in row.per_task(probe))])
        return buffer.getvalue()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/accuracy_matrix.csv`` then ``directory/metrics.json``, each atomically
        (temporary file, fsync, ``os.replace``); returns the path of ``metrics.json``."""
        directory = Path(directory)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write_text(directory / MATRIX_CSV, self.matrix_csv())
        return atomic_write_text(directory / METRICS_FILE, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContinualMetrics":
        """Read ``metrics.json`` (``path`` is the file or the run directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / METRICS_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _json_ok(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable with finite numbers: {error}") from None
