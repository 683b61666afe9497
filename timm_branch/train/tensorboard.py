"""Training curves for TensorBoard, when it is installed (``pip install "timm-branch[tensorboard]"``).

:class:`TensorBoardLogger` writes event files with ``torch.utils.tensorboard.SummaryWriter`` into
``RUN_DIR/tensorboard/``, beside the run's ``metrics.json``, ``accuracy_matrix.csv`` and PNGs
(``tensorboard --logdir runs/`` compares runs). Scalars:

- ``train/loss``, ``train/lr``: the mean loss of the epoch's steps and the learning rate at the
  end of every epoch (the training curve ``metrics.json`` keeps too); the step is the number of epochs trained since the run began (``task * epochs + epoch + 1``);
- ``eval/<probe>_top1`` (all classes) and ``eval/<probe>_task<j>`` (per task), after every task,
  at step ``task``, for each probe that was evaluated (``knn``, ``linear``, ``online``);
- ``eval/<probe>_average_accuracy``, ``eval/<probe>_forgetting``,
  ``eval/<probe>_backward_transfer``, ``eval/<probe>_forward_transfer``: the summary of
  ``metrics.json`` after every task, where defined (definitions: docs/METRICS.md).

Without the ``tensorboard`` package every method does nothing, and one INFO log per process says
so. The writer is created at the first scalar, so a run that never trains leaves no folder.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ..evaluate.metrics import PROBES, ContinualMetrics

log = logging.getLogger(__name__)

_SUMMARY_KEYS = ("average_accuracy", "forgetting", "backward_transfer", "forward_transfer")
_missing_reported = False


def _summary_writer_class():
    """``SummaryWriter``, or ``None`` (after one INFO log per process) when tensorboard is missing."""
    global _missing_reported
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _missing_reported:
            log.info("TensorBoard is not installed: training curves go to metrics.json and the PNGs only "
                     "(pip install 'timm-branch[tensorboard]' to get event files too)")
            _missing_reported = True
        return None
    return SummaryWriter


class TensorBoardLogger:
    """Scalars of one run for TensorBoard, written under ``log_dir`` (a no-op without tensorboard)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None
        self._unavailable = False

    def _add(self, scalars: dict[str, float | None], step: int) -> None:
        if self._unavailable:
            return
        if self._writer is None:
            writer_class = _summary_writer_class()
            if writer_class is None:
                self._unavailable = True
                return
            self._writer = writer_class(log_dir=str(self.log_dir))
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, value, step)
        # Flush now: epochs are minutes apart, and a crash must not lose the curve so far.
        self._writer.flush()

    def log_epoch(self, step: int, loss: float, lr: float) -> None:
        """The loss and learning rate at the end of an epoch; ``step`` counts epochs since the run began."""
        self._add({"train/loss": loss, "train/lr": lr}, step)

    def log_task(self, task: int, scores: dict, metrics: ContinualMetrics | None = None) -> None:
        """The evaluation after ``task``: ``scores`` as the trainer records them (``knn_top1``,
        ``knn_per_task``, ...) and, for each probe with an accuracy matrix, ``metrics.summary``."""
        scalars: dict[str, float | None] = {}
        for key, value in scores.items():
            if key.endswith("_top1"):
                scalars[f"eval/{key}"] = value
            elif key.endswith("_per_task"):
                probe = key[: -len("_per_task")]
                scalars.update({f"eval/{probe}_task{j}": v for j, v in enumerate(value)})
        for probe in PROBES:
            if metrics is not None and metrics.has_matrix(probe):
                summary = metrics.summary(probe)
                scalars.update({f"eval/{probe}_{k}": summary[k] for k in _SUMMARY_KEYS})
        self._add(scalars, task)

    def close(self) -> None:
        """Flush and close the event file (logging again opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
