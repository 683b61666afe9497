"""Linear CKA between two representations: the estimator, and nothing about models or data.

Linear CKA with the unbiased HSIC estimator of Song et al. (2012), in the minibatch form of
Nguyen, Raghu and Kornblith (arXiv 2010.15327)::

    CKA(X, Y) = sum_b HSIC1(K_b, L_b) / sqrt(sum_b HSIC1(K_b, K_b) * sum_b HSIC1(L_b, L_b))

with ``K_b = X_b X_b^T`` and ``L_b = Y_b Y_b^T`` the linear-kernel Gram matrices of minibatch
``b`` (each sample's activation flattened to one vector), and, for ``n > 3`` samples and Gram
matrices with their diagonals set to zero::

    HSIC1(K, L) = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n (n-3))

(:func:`hsic_unbiased`). :class:`MinibatchCKA` computes the same value through "U-centred" Gram
matrices (Szekely and Rizzo 2014: ``HSIC1(K, L) = <U(K), U(L)> / (n (n-3))``), which is cheaper
and makes ``HSIC1(K, K) >= 0``, so the result lies in [-1, 1]. Gram matrices, HSIC terms and
sums are float64 whatever the models' dtype. Unlike the biased estimator, the unbiased one is
near 0 for independent representations even when the feature dimension exceeds the number of
samples (see the tests). A representation constant over the samples (a dead ReLU) has
``HSIC1(K, K) = 0`` and an undefined CKA: NaN.

The layer-wise comparison of two models is :mod:`timm_branch.evaluate.cka_compare`, its plot
:mod:`timm_branch.evaluate.cka_plot`, the command line ``timm-branch cka`` :mod:`timm_branch.cli.cka`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MinibatchCKA", "gram_linear", "hsic_unbiased", "linear_cka"]

_GRAM_CHUNK = 1 << 24  # elements of one float64 feature chunk in gram_linear (128 MiB)


def gram_linear(x: Tensor) -> Tensor:
    """The linear-kernel Gram matrix ``X X^T`` (float64, ``(n, n)``) of ``x`` with shape
    ``(n, ...)``, each sample flattened to one vector. The features are cast to float64 a chunk
    at a time, so the float64 copy never exceeds 128 MiB."""
    x = x.detach().reshape(x.shape[0], -1)
    n, p = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _GRAM_CHUNK // max(n, 1))
    for start in range(0, p, step):
        chunk = x[:, start : start + step].to(torch.float64)
        gram.addmm_(chunk, chunk.T)
    return gram


def _check_gram(k: Tensor, what: str) -> Tensor:
    if not isinstance(k, Tensor) or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{what} must be a square (n, n) tensor, got {getattr(k, 'shape', type(k))}")
    if k.shape[0] <= 3:
        raise ValueError(f"the unbiased HSIC estimator needs n > 3 samples, got n = {k.shape[0]}")
    return k


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator of Song et al. (2012), from Gram matrices ``K``, ``L`` ``(n, n)``.

    The diagonals are set to zero here (on float64 copies; the inputs are not changed), then::

        HSIC1 = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n (n-3))

    Returns a float64 scalar tensor. Raises ``ValueError`` unless ``n > 3`` and the shapes agree.
    """
    _check_gram(K, "K")
    _check_gram(L, "L")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
    n = K.shape[0]
    K = K.to(torch.float64).clone().fill_diagonal_(0)
    L = L.to(torch.float64).clone().fill_diagonal_(0)
    trace = (K * L.T).sum()
    sums = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = K.sum(0) @ L.sum(1) * 2 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _u_center(K: Tensor) -> Tensor:
    """U-centring (Szekely and Rizzo 2014) of a symmetric Gram matrix, float64, zero diagonal:
    ``<U(K), U(L)> / (n (n-3))`` equals :func:`hsic_unbiased` ``(K, L)``."""
    n = K.shape[0]
    K = K.to(torch.float64).clone().fill_diagonal_(0)
    means = K.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    K = K - means[:, None] - means[None, :]
    return K.fill_diagonal_(0)


def _flat(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{what} must be a tensor of shape (n, ...)")
    return x.reshape(x.shape[0], -1)


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of one batch, directly: ``HSIC1(K, L) / sqrt(HSIC1(K, K) HSIC1(L, L))``.

    ``X`` ``(n, p, ...)`` and ``Y`` ``(n, q, ...)`` hold the same ``n > 3`` samples in the same
    order (each sample flattened); ``p`` and ``q`` may differ. Computed in float64 with
    :func:`hsic_unbiased`. NaN when either side is constant over the samples.
    """
    X, Y = _flat(X, "X"), _flat(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same samples, got n = {X.shape[0]} and {Y.shape[0]}")
    K, L = gram_linear(X), gram_linear(Y)
    xy, xx, yy = (float(hsic_unbiased(a, b)) for a, b in ((K, L), (K, K), (L, L)))
    return _ratio(xy, xx, yy)


def _ratio(xy: float, xx: float, yy: float) -> float:
    den = xx * yy
    return xy / math.sqrt(den) if den > 0 and math.isfinite(den) else float("nan")


class MinibatchCKA:
    """Accumulates the minibatch linear CKA of Nguyen et al. over batches of two representations.

    ``update(X, Y)`` (features, ``(n, ...)`` each) or ``update_grams(K, L)`` (their Gram
    matrices) adds ``HSIC1(K, L)``, ``HSIC1(K, K)`` and ``HSIC1(L, L)`` of one batch (``n > 3``;
    batches may differ in size) to running float64 sums; :meth:`result` is
    ``sum HSIC1(K, L) / sqrt(sum HSIC1(K, K) * sum HSIC1(L, L))``. With a single batch this
    equals :func:`linear_cka`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.hsic_xy = 0.0
        self.hsic_xx = 0.0
        self.hsic_yy = 0.0
        self.batches = 0

    def update(self, X: Tensor, Y: Tensor) -> None:
        """Add one minibatch of features ``X`` ``(n, ...)`` and ``Y`` ``(n, ...)`` of the same ``n > 3`` samples."""
        X, Y = _flat(X, "X"), _flat(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X and Y must hold the same samples, got n = {X.shape[0]} and {Y.shape[0]}")
        self.update_grams(gram_linear(X), gram_linear(Y))

    def update_grams(self, K: Tensor, L: Tensor) -> None:
        """Add one minibatch given as Gram matrices ``K``, ``L`` ``(n, n)`` of the same ``n > 3`` samples."""
        _check_gram(K, "K")
        _check_gram(L, "L")
        if K.shape != L.shape:
            raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
        n = K.shape[0]
        Ku, Lu = _u_center(K), _u_center(L.to(K.device))
        scale = 1.0 / (n * (n - 3))
        self.hsic_xy += float((Ku * Lu).sum()) * scale
        self.hsic_xx += float((Ku * Ku).sum()) * scale
        self.hsic_yy += float((Lu * Lu).sum()) * scale
        self.batches += 1

    def result(self) -> float:
        """The CKA so far (NaN before any batch or when a side is constant)."""
        return _ratio(self.hsic_xy, self.hsic_xx, self.hsic_yy)

