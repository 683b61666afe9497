"""Evaluation of frozen backbones during continual SSL: features, kNN, linear probe, metrics.

After every task the trainer extracts features once (:func:`extract_features`), scores them with
the weighted kNN (:func:`knn_predict`, :func:`knn_accuracy`) and the offline linear probe
(:func:`linear_probe`), splits the accuracy per task (:func:`per_task_accuracy`) and records the
row in a :class:`ContinualMetrics`, which writes ``metrics.json`` and ``accuracy_matrix.csv``.
"""
from .features import extract_features
from .knn import knn_accuracy, knn_predict
from .linear import LinearProbeResult, linear_probe
from .metrics import (
    MATRIX_CSV,
    METRICS_FILE,
    PROBES,
    ContinualMetrics,
    TaskEvaluation,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    per_task_accuracy,
    top1_accuracy,
)

__all__ = [
    "MATRIX_CSV",
    "METRICS_FILE",
    "PROBES",
    "ContinualMetrics",
    "LinearProbeResult",
    "TaskEvaluation",
    "average_accuracy",
    "backward_transfer",
    "extract_features",
    "forgetting",
    "forward_transfer",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "per_task_accuracy",
    "top1_accuracy",
]
