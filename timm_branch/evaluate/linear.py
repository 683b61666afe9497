"""Offline linear probe: multinomial logistic regression on frozen features.

Recipe (fixed, so numbers are comparable between tasks, strategies and runs):

1. Standardise: ``z = (x - mu) / sigma`` with the per-dimension mean ``mu`` and standard deviation
   ``sigma`` (population, ``unbiased=False``) of the **training** features; dimensions with
   ``sigma < 1e-6`` (constant on the training set) get ``sigma = 1``. The same ``mu, sigma`` are
   applied to the test features.
2. Model: ``logits = z @ W.T + b`` with ``W`` (C, D) and ``b`` (C,), both initialised to zero.
3. Objective, over all N training samples at once (full batch)::

       L(W, b) = (1 / N) * sum_n cross_entropy(logits_n, y_n) + (l2 / 2) * ||W||_F^2

   with ``l2 = 1e-4`` by default (the bias is not penalised). L is strictly convex in W, so the
   probe has one optimum and the result does not depend on the starting point.
4. Optimiser: ``torch.optim.LBFGS`` (lr 1, strong-Wolfe line search, history 20) for at most
   ``max_iter = 200`` iterations, stopping early when the gradient's largest entry falls below
   ``tolerance_grad = 1e-6`` or the loss and step stop changing (``tolerance_change = 1e-9``).
5. Prediction: ``argmax`` of the test logits; accuracy = fraction of test samples predicted right.

Determinism: nothing is random (zero initialisation, full batch, no shuffling, no dropout), so
there is no seed: the same features give the same predictions on the same device and thread
count, whatever the state of any random number generator.

Cost: each L-BFGS function evaluation is about three (N x D) @ (D x C) matrix products; 200
iterations take roughly 250 evaluations. CIFAR-100 with a ResNet-18 (N = 50000, D = 512,
C = 100) is about 4 TFLOP in float32 in the worst case: seconds on a GPU, a minute or two on a
multi-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._labels import check_labels

__all__ = ["LinearProbeResult", "linear_probe"]


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: top-1 accuracy on the test features, in [0, 1].
        predictions: (N_test,) int64 predicted classes, on the CPU.
        train_accuracy: top-1 accuracy on the training features, in [0, 1].
        loss: final value of the objective L (cross-entropy in nats plus the L2 term).
        n_iter: L-BFGS iterations run.
    """

    accuracy: float
    predictions: Tensor
    train_accuracy: float
    loss: float
    n_iter: int


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 200,
    tolerance_grad: float = 1e-6,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Train the linear probe of the module docstring on ``train_feats`` and test it.

    Args:
        train_feats: (N_train, D) float features (for example from ``extract_features``).
        train_labels: (N_train,) integer labels in [0, num_classes).
        test_feats: (N_test, D) float features.
        test_labels: (N_test,) integer labels in [0, num_classes).
        num_classes: number of classes C (all classes of the benchmark, also ones absent from
            the training features).
        l2: L2 penalty on W (see the objective); >= 0.
        max_iter: most L-BFGS iterations.
        tolerance_grad: stop when max |gradient| falls below this.
        device: where to optimise; default: ``train_feats``' device. Computation is float32.

    Returns:
        :class:`LinearProbeResult`.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N_train, D) and (N_test, D), got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("the linear probe needs at least one training and one test sample")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if l2 < 0 or max_iter < 1:
        raise ValueError(f"need l2 >= 0 and max_iter >= 1, got l2={l2}, max_iter={max_iter}")
    device = train_feats.device if device is None else torch.device(device)
    y_train = check_labels(train_labels, train_feats.shape[0], num_classes, "train_labels").to(device)
    y_test = check_labels(test_labels, test_feats.shape[0], num_classes, "test_labels").to(device)

    x_train = train_feats.to(device=device, dtype=torch.float32)
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    z_train = (x_train - mean) / std
    z_test = (test_feats.to(device=device, dtype=torch.float32) - mean) / std

    dim = z_train.shape[1]
    weight = torch.zeros(num_classes, dim, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        logits = F.linear(z_train, weight, bias)
        return F.cross_entropy(logits, y_train) + 0.5 * l2 * weight.square().sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    n_iter = int(optimizer.state[weight].get("n_iter", 0))

    with torch.no_grad():
        loss = objective().item()
        train_pred = F.linear(z_train, weight, bias).argmax(dim=1)
        test_pred = F.linear(z_test, weight, bias).argmax(dim=1)
        return LinearProbeResult(
            accuracy=(test_pred == y_test).float().mean().item(),
            predictions=test_pred.cpu(),
            train_accuracy=(train_pred == y_train).float().mean().item(),
            loss=loss,
            n_iter=n_iter,
        )
