"""Weighted kNN (timm_branch.evaluate.knn) against hand-computed votes and synthetic features."""
from __future__ import annotations

import math

import pytest
import torch

from timm_branch.evaluate import knn_accuracy, knn_predict

# Four training points in 2-D; x2 has norm 2*sqrt(2), so only cosine (normalised) similarity
# gives the values below.
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[3.0, 0.0]])  # cosine with the training points: 1, 0, 1/sqrt(2), -1


def test_weighted_vote_by_hand():
    # k = 3, T = 0.5: neighbours x0 (s = 1), x2 (s = 0.70711), x1 (s = 0).
    #   w0 = exp(1 / 0.5)       = 7.389056  (class 0)
    #   w2 = exp(0.70711 / 0.5) = 4.113250  (class 1)
    #   w1 = exp(0 / 0.5)       = 1.000000  (class 1)
    #   total = 12.502306; class 0: 7.389056 / 12.502306 = 0.591015,
    #                      class 1: 5.113250 / 12.502306 = 0.408985.
    # A plain majority vote would say class 1 (two of three neighbours); the weights say 0.
    scores = knn_predict(TRAIN, LABELS, QUERY, num_classes=3, k=3, temperature=0.5)
    assert scores.shape == (1, 3) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([[0.591015, 0.408985, 0.0]]), atol=1e-6, rtol=0)
    assert scores.argmax(1).item() == 0


def test_high_temperature_is_majority_vote():
    # T = 1000: all three weights are exp(~0) = 1 (to 1e-3), so class 1 wins with 2/3.
    scores = knn_predict(TRAIN, LABELS, QUERY, num_classes=2, k=3, temperature=1000.0)
    torch.testing.assert_close(scores, torch.tensor([[1 / 3, 2 / 3]]), atol=1e-3, rtol=0)


def test_k_larger_than_train_set_uses_all_points():
    # k = 20 > N = 4: all four neighbours; x3 (s = -1) adds exp(-2) = 0.135335 to class 0:
    #   total = 12.637642; class 0: 7.524391 / 12.637642 = 0.595395; class 1: 0.404605.
    scores = knn_predict(TRAIN, LABELS, QUERY, num_classes=2, k=20, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[0.595395, 0.404605]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores, knn_predict(TRAIN, LABELS, QUERY, num_classes=2, k=4, temperature=0.5))


def test_no_overflow_at_tiny_temperature():
    # exp(1 / 0.001) overflows float32; the vote shares must still be finite and exact.
    scores = knn_predict(TRAIN, LABELS, QUERY, num_classes=2, k=3, temperature=1e-3)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0]]))


def _clusters(n_per_class: int, num_classes: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes] * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=gen)
    return feats, labels


def test_separable_features_give_full_accuracy_and_chunking_is_invisible():
    train, y_train = _clusters(30, 4, 8, seed=0)
    test, y_test = _clusters(10, 4, 8, seed=1)
    assert knn_accuracy(train, y_train, test, y_test, num_classes=4) == 1.0
    full = knn_predict(train, y_train, test, num_classes=4)
    torch.testing.assert_close(knn_predict(train, y_train, test, num_classes=4, chunk_size=3), full)
    torch.testing.assert_close(full.sum(1), torch.ones(len(test)))


def test_random_labels_give_about_chance():
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    y_train, y_test = torch.randint(0, 4, (400,), generator=gen), torch.randint(0, 4, (400,), generator=gen)
    accuracy = knn_accuracy(train, y_train, test, y_test, num_classes=4)
    assert abs(accuracy - 0.25) < 0.1


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        knn_predict(TRAIN, torch.tensor([0, 1, 2, 0]), QUERY, num_classes=2)  # label out of range
    with pytest.raises(ValueError):
        knn_predict(TRAIN[:0], LABELS[:0], QUERY, num_classes=2)  # empty train set
    with pytest.raises(ValueError):
        knn_predict(TRAIN, LABELS, QUERY, num_classes=2, k=0)
    assert math.isclose(knn_accuracy(TRAIN, LABELS, QUERY, torch.tensor([0]), 2, k=3, temperature=0.5), 1.0)
