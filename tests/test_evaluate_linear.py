"""Offline linear probe (timm_branch.evaluate.linear) on synthetic features."""
from __future__ import annotations

import math

import pytest
import torch

from timm_branch.evaluate import LinearProbeResult, linear_probe


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int, sep: float = 4.0):
    gen = torch.Generator().manual_seed(100)  # same class means for train and test
    means = torch.randn(num_classes, dim, generator=gen) * sep
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return means[labels] + torch.randn(len(labels), dim, generator=gen), labels


def test_separable_blobs_reach_full_accuracy():
    x_train, y_train = _blobs(50, 4, 16, seed=0)
    x_test, y_test = _blobs(25, 4, 16, seed=1)
    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=5)  # class 4 never seen
    assert isinstance(result, LinearProbeResult)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0
    assert result.predictions.shape == (100,) and result.predictions.dtype == torch.int64
    assert torch.equal(result.predictions, y_test)
    assert 0 < result.loss < math.log(5) and result.n_iter >= 1


def test_deterministic_whatever_the_rng_state():
    x_train, y_train = _blobs(40, 3, 8, seed=2, sep=1.0)  # overlapping: the optimum is interior
    x_test, y_test = _blobs(40, 3, 8, seed=3, sep=1.0)
    torch.manual_seed(0)
    a = linear_probe(x_train, y_train, x_test, y_test, num_classes=3)
    torch.manual_seed(12345)
    torch.rand(1000)
    b = linear_probe(x_train, y_train, x_test, y_test, num_classes=3)
    assert a.accuracy == b.accuracy and a.loss == b.loss and a.n_iter == b.n_iter
    assert torch.equal(a.predictions, b.predictions)
    assert 0.4 < a.accuracy < 1.0  # a real, non-trivial problem


def test_standardisation_makes_scale_and_offset_irrelevant():
    x_train, y_train = _blobs(40, 3, 8, seed=4, sep=1.5)
    x_test, y_test = _blobs(40, 3, 8, seed=5, sep=1.5)
    scale = torch.logspace(-3, 3, 8)
    a = linear_probe(x_train, y_train, x_test, y_test, num_classes=3)
    b = linear_probe(x_train * scale + 7, y_train, x_test * scale + 7, y_test, num_classes=3)
    assert abs(a.loss - b.loss) < 1e-4
    assert (a.predictions != b.predictions).sum() <= 1


def test_constant_dimension_and_random_labels():
    gen = torch.Generator().manual_seed(6)
    x_train, x_test = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    x_train[:, 0] = 3.0  # zero variance on the training set
    y_train, y_test = torch.randint(0, 4, (300,), generator=gen), torch.randint(0, 4, (300,), generator=gen)
    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=4)
    assert math.isfinite(result.loss)
    assert abs(result.accuracy - 0.25) < 0.1


def test_reaches_the_optimum_of_the_documented_objective():
    # Reference: plain gradient descent in float64 on the same objective,
    # mean cross-entropy(z W^T + b) + l2 / 2 * ||W||^2 on standardised z.
    x_train, y_train = _blobs(40, 3, 8, seed=7, sep=1.0)
    x_test, y_test = _blobs(10, 3, 8, seed=8, sep=1.0)
    l2 = 1e-2
    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=3, l2=l2)

    x = x_train.double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    onehot = torch.nn.functional.one_hot(y_train, 3).double()
    weight = torch.zeros(3, 8, dtype=torch.float64)
    bias = torch.zeros(3, dtype=torch.float64)
    for _ in range(1500):  # hand-written gradients: d/dlogits of mean CE = (softmax - onehot) / N
        residual = (torch.softmax(z @ weight.T + bias, dim=1) - onehot) / len(z)
        grad_w, grad_b = residual.T @ z + l2 * weight, residual.sum(0)
        weight -= grad_w
        bias -= grad_b
    assert max(grad_w.abs().max(), grad_b.abs().max()) < 1e-6  # the reference converged
    logp = torch.log_softmax(z @ weight.T + bias, dim=1)
    optimum = -(logp * onehot).sum(1).mean() + 0.5 * l2 * weight.square().sum()
    assert result.loss == pytest.approx(optimum.item(), abs=1e-5)
