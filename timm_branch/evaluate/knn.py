"""Weighted k-nearest-neighbour classification on cosine similarity.

The protocol of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", arXiv 1805.01978), as solo-learn evaluates SSL backbones (defaults k = 20,
T = 0.07). For a test feature q and training features x_i with labels y_i:

    s_i   = cos(q, x_i) = <q / |q|, x_i / |x_i|>              (similarity in [-1, 1])
    N_k   = indices of the k largest s_i                      (k = min(k, N_train))
    w_i   = exp(s_i / T)                                      (T: temperature)
    score_c = sum_{i in N_k, y_i = c} w_i / sum_{i in N_k} w_i

and the prediction is argmax_c score_c. solo-learn returns the unnormalised sums; dividing every
score of a test sample by the same positive number changes no ranking, so predictions and top-k
agree with it. The normalisation makes the scores a distribution over classes (each row sums
to 1) and lets the weights be computed as exp((s_i - max_i s_i) / T), which cannot overflow for
any temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._labels import check_labels

__all__ = ["knn_predict", "knn_accuracy"]

#: Default bound on the elements of one (test chunk x train) similarity block: 2**22 float32
#: values = 16 MiB.
MAX_SIMILARITY_ELEMENTS = 2**22


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> Tensor:
    """Class scores of the weighted kNN vote for every test sample.

    Args:
        train_feats: (N_train, D) float features of the labelled reference set (any scale: rows
            are L2-normalised here).
        train_labels: (N_train,) integer labels in [0, num_classes).
        test_feats: (N_test, D) float features to classify.
        num_classes: number of classes C.
        k: neighbours per test sample; ``min(k, N_train)`` are used when k > N_train.
        temperature: T in ``exp(s / T)``; smaller T gives the nearest neighbours more weight.
        chunk_size: test samples per similarity block; default: as many as keep one block at
            ``MAX_SIMILARITY_ELEMENTS`` (2**22) elements, at least 1.

    Returns:
        float32 tensor (N_test, C) of vote shares: ``scores[n, c]`` is the weight of test sample
        n's neighbours of class c divided by the weight of all its neighbours (see the module
        docstring); rows sum to 1. On ``train_feats``' device (the computation runs there).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N_train, D) and (N_test, D), got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    n_train = train_feats.shape[0]
    if n_train == 0:
        raise ValueError("kNN needs at least one training sample")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = train_feats.device
    labels = check_labels(train_labels, n_train, num_classes, "train_labels").to(device)
    if chunk_size is None:
        chunk_size = max(1, MAX_SIMILARITY_ELEMENTS // n_train)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    k = min(k, n_train)
    train = F.normalize(train_feats.float(), dim=1)
    scores = torch.zeros(test_feats.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, test_feats.shape[0], chunk_size):
        query = F.normalize(test_feats[start : start + chunk_size].to(device).float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # (B, k), largest first
        weights = torch.exp((sims - sims[:, :1]) / temperature)  # exp(s/T) up to a per-row factor
        weights = weights / weights.sum(dim=1, keepdim=True)
        scores[start : start + query.shape[0]].scatter_add_(1, labels[idx], weights)
    return scores


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on ``test_labels`` ((N_test,) integers).

    Ties in the vote go to the lowest class index (``argmax``).
    """
    if test_feats.shape[0] == 0:
        raise ValueError("kNN accuracy needs at least one test sample")
    labels = check_labels(test_labels, test_feats.shape[0], num_classes, "test_labels")
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk_size)
    return (scores.argmax(dim=1).cpu() == labels.cpu()).float().mean().item()
