"""Linear CKA estimator (timm_branch.evaluate.cka): unbiased HSIC and the minibatch form, against numpy."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from timm_branch.evaluate.cka import MinibatchCKA, _u_center, gram_linear, hsic_unbiased, linear_cka

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- numpy references, written from the formulas --------------------------------------------------


def _np_hsic_ustat(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC1 as the U-statistic of Song et al. (2012), summing over distinct index tuples."""
    n = K.shape[0]
    t1 = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    return t1 + t2 - 2 * t3


def _np_hsic_closed(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al.'s closed form, on zero-diagonal copies."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    value = np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ L @ one)
    return value / (n * (n - 3))


def _np_cka(X: np.ndarray, Y: np.ndarray, hsic=_np_hsic_closed) -> float:
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def _np_biased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


# -- the estimator ----------------------------------------------------------------------------------


def test_hsic_against_the_u_statistic_and_closed_form():
    X, Y = _randn(6, 4, seed=1), _randn(6, 3, seed=2)
    K, L = (X @ X.T).numpy(), (Y @ Y.T).numpy()
    brute = _np_hsic_ustat(K, L)
    assert _np_hsic_closed(K, L) == pytest.approx(brute, rel=1e-10)
    assert float(hsic_unbiased(torch.from_numpy(K), torch.from_numpy(L))) == pytest.approx(brute, rel=1e-10)
    u = float((_u_center(torch.from_numpy(K)) * _u_center(torch.from_numpy(L))).sum()) / (6 * 3)
    assert u == pytest.approx(brute, rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(_np_cka(X.numpy(), Y.numpy(), _np_hsic_ustat), rel=1e-10)
    # the inputs' diagonals are left alone
    assert torch.equal(torch.from_numpy(K).diagonal(), (X @ X.T).diagonal())


def test_direct_cka_against_numpy_on_small_matrices():
    for seed, (n, p, q) in enumerate([(5, 2, 7), (9, 12, 3), (16, 8, 8)]):
        X = _randn(n, p, seed=seed)
        Y = torch.tanh(X @ _randn(p, q, seed=seed + 10)) + 0.3 * _randn(n, q, seed=seed + 20)
        assert linear_cka(X, Y) == pytest.approx(_np_cka(X.numpy(), Y.numpy()), rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="n > 3"):
        linear_cka(_randn(3, 4), _randn(3, 4))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(_randn(5, 4), _randn(6, 4))


def test_cka_of_a_representation_with_itself_is_one():
    X = _randn(40, 10, 3, 3, seed=3)  # (n, C, H, W): flattened per sample
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X.float(), X.float()) == pytest.approx(1.0, abs=1e-12)  # float64 inside


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    X = _randn(50, 20, seed=4)
    Y = torch.relu(X @ _randn(20, 30, seed=5)) + 0.5 * _randn(50, 30, seed=6)
    Qx = torch.linalg.qr(_randn(20, 20, seed=7)).Q
    Qy = torch.linalg.qr(_randn(30, 30, seed=8)).Q
    reference = linear_cka(X, Y)
    assert 0.1 < reference < 0.99
    for a, b in [(X @ Qx, Y), (X, Y @ Qy), (3.7 * X, Y), (X, 0.01 * Y), (-2.0 * X @ Qx, 5.0 * Y @ Qy),
                 (X + 4.0, Y - 1.0)]:  # the unbiased estimator is centred: feature means do not matter
        assert linear_cka(a, b) == pytest.approx(reference, rel=1e-9)
    # not vacuous: a non-isotropic scaling changes it
    scale = torch.linspace(0.1, 3.0, 20, dtype=torch.float64)
    assert abs(linear_cka(X * scale, Y) - reference) > 1e-3


def test_near_zero_for_independent_features():
    """Under independence HSIC1 has expectation exactly 0, and as a degenerate U-statistic its
    spread shrinks like 1/n: for isotropic Gaussian features std(HSIC1(K, L)) ~ sqrt(2 p q) / n,
    while HSIC1(K, K) ~ p and HSIC1(L, L) ~ q, so std(CKA) ~ sqrt(2) / n = 0.007 at n = 200
    (measured: 0.0049 at n = 256 over 40 seeds). The bound 0.05 is about 7 standard deviations.
    The biased estimator on the same data is about p / (p + n) = 0.6, far from 0."""
    n, p, q = 200, 300, 300
    for seed in range(3):
        X, Y = _randn(n, p, seed=100 + seed), _randn(n, q, seed=200 + seed)
        assert abs(linear_cka(X, Y)) < 0.05
        assert _np_biased_cka(X.numpy(), Y.numpy()) > 0.4


def test_minibatch_accumulator():
    X, Y = _randn(12, 5, seed=9), _randn(12, 7, seed=10)
    one = MinibatchCKA()
    assert math.isnan(one.result())
    one.update(X, Y)
    assert one.result() == pytest.approx(linear_cka(X, Y), rel=1e-12)
    # several batches of different sizes: sum of HSIC1 terms, then the ratio
    batches = [(_randn(10, 4, seed=s), _randn(10, 6, seed=s + 50)) for s in range(2)] + [(_randn(7, 4, seed=3), _randn(7, 6, seed=4))]
    acc = MinibatchCKA()
    sums = np.zeros(3)
    for A, B in batches:
        acc.update_grams(gram_linear(A), gram_linear(B))
        K, L = (A @ A.T).numpy(), (B @ B.T).numpy()
        sums += [_np_hsic_closed(K, L), _np_hsic_closed(K, K), _np_hsic_closed(L, L)]
    assert acc.batches == 3
    assert acc.result() == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), rel=1e-10)
    # a constant representation has no defined CKA
    const = MinibatchCKA()
    const.update(torch.ones(8, 3), X[:8])
    assert math.isnan(const.result())
