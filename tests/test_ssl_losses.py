"""Every SSL loss against values worked out by hand on tiny float64 tensors, and known properties."""
from __future__ import annotations

import math

import pytest
import torch

from timm_branch.ssl import barlow_twins_loss, byol_loss, moco_loss, nt_xent_loss, sinkhorn, swav_loss, vicreg_loss
from timm_branch.ssl.vicreg import covariance_loss, invariance_loss, variance_loss


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


E1, E2 = t([[1, 0]]), t([[0, 1]])


# ---------------------------------------------------------------- SimCLR


def test_nt_xent_identical_views_orthogonal_samples_by_hand():
    # z1 = z2 = [e1, e2]. Anchor e1 (view 1): positive e1 (view 2), cos 1; negatives e2, e2, cos 0.
    # Every one of the 4 anchors sees the same: loss = -log(e^{1/T} / (e^{1/T} + 2)) = log(1 + 2 e^{-1/T}).
    z = torch.cat([E1, E2])
    assert nt_xent_loss(z, z.clone(), 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-12)  # 0.55144
    assert nt_xent_loss(z, z.clone(), 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-12)  # 0.23954


def test_nt_xent_pairs_each_sample_with_its_own_other_view():
    # z1 = [e1, e2], z2 = [e2, e1]: every positive is orthogonal (cos 0) while one negative is
    # identical (cos 1). Anchor e1 (view 1): positive e2 (z2[0]), negatives e2 (z1[1]) and e1 (z2[1]):
    # -log(e^0 / (e^0 + e^0 + e^1)) = log(2 + e) = 1.55144, the same for all 4 anchors (T = 1).
    z1 = torch.cat([E1, E2])
    z2 = torch.cat([E2, E1])
    assert nt_xent_loss(z1, z2, 1.0).item() == pytest.approx(math.log(2 + math.e), abs=1e-12)


def test_nt_xent_is_scale_invariant_and_minimal_for_identical_views():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))[0]  # orthonormal samples
    best = nt_xent_loss(z1, z1.clone(), 0.2)
    assert nt_xent_loss(3 * z1, 0.5 * z1, 0.2).item() == pytest.approx(best.item(), abs=1e-12)
    for _ in range(10):  # moving the positives off the anchors only raises the loss
        z2 = z1 + 0.3 * torch.randn(4, 4, dtype=torch.float64, generator=gen)
        assert nt_xent_loss(z1, z2, 0.2) > best


# ---------------------------------------------------------------- BYOL


def test_byol_loss_by_hand():
    # cos((1,0), (1,1)) = 1/sqrt(2); cos((0,2), (0,-3)) = -1.
    # loss = 2 - 2 * mean(0.70711, -1) = 2 - 2 * (-0.146447) = 2.292893
    p = t([[1, 0], [0, 2]])
    z = t([[1, 1], [0, -3]])
    assert byol_loss(p, z).item() == pytest.approx(2 - (1 / math.sqrt(2) - 1), abs=1e-12)


def test_byol_loss_zero_for_same_direction_four_for_opposite():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    assert byol_loss(p, 2.5 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-12)


def test_byol_loss_stops_the_gradient_of_the_target():
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# ---------------------------------------------------------------- Barlow Twins


def test_barlow_twins_loss_by_hand():
    # z1 = [[1, 0], [3, 4]]: column means (2, 2), biased stds (1, 2) -> z1n = [[-1, -1], [1, 1]]
    # z2 = [[0, 5], [2, 1]]: column means (1, 3), biased stds (1, 2) -> z2n = [[-1, 1], [1, -1]]
    # C = z1n.T @ z2n / 2 = [[1, -1], [1, -1]]
    # on-diagonal: (1 - 1)^2 + (1 - (-1))^2 = 4; off-diagonal: (-1)^2 + 1^2 = 2
    # loss = scale * (4 + lamb * 2) = 0.1 * (4 + 0.5 * 2) = 0.5
    z1 = t([[1, 0], [3, 4]])
    z2 = t([[0, 5], [2, 1]])
    assert barlow_twins_loss(z1, z2, lamb=0.5, scale=0.1, eps=0.0).item() == pytest.approx(0.5, abs=1e-12)
    # lamb weights the off-diagonal part only: 0.1 * (4 + 0) and 0.1 * (4 + 2)
    assert barlow_twins_loss(z1, z2, lamb=0.0, scale=0.1, eps=0.0).item() == pytest.approx(0.4, abs=1e-12)
    assert barlow_twins_loss(z1, z2, lamb=1.0, scale=0.1, eps=0.0).item() == pytest.approx(0.6, abs=1e-12)


def test_barlow_twins_loss_zero_when_cross_correlation_is_identity():
    # Columns (1, 1, -1, -1) and (1, -1, 1, -1): mean 0, biased std 1, orthogonal: C = I.
    z = t([[1, 1], [1, -1], [-1, 1], [-1, -1]])
    assert barlow_twins_loss(z, z.clone(), lamb=5e-3, scale=1.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # BatchNorm's eps = 1e-5 divides each view by sqrt(1 + 1e-5), so C = I / (1 + 1e-5):
    # loss = 2 * (1 - 1/1.00001)^2 = 2.0e-10
    expected = 2 * (1 - 1 / (1 + 1e-5)) ** 2
    assert barlow_twins_loss(z, z.clone(), lamb=5e-3, scale=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Standardisation makes it invariant to per-column affine maps of either view.
    shifted = z * t([[3, 0.5]]) + t([[10, -2]])
    assert barlow_twins_loss(shifted, z, lamb=5e-3, scale=1.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- MoCo


def test_moco_loss_by_hand():
    # q = [e1, e2], k = [(0.6, 0.8), e2], queue = [e2], T = 0.5.
    # sample 0: logits [0.6, 0] / 0.5 = [1.2, 0] -> -log(e^1.2 / (e^1.2 + 1)) = log(1 + e^-1.2) = 0.263282
    # sample 1: logits [1, 1] / 0.5 = [2, 2]      -> log(2) = 0.693147
    # mean = 0.478215
    q = torch.cat([E1, E2])
    k = t([[0.6, 0.8], [0, 1]])
    expected = (math.log(1 + math.exp(-1.2)) + math.log(2)) / 2
    assert moco_loss(q, k, E2, 0.5).item() == pytest.approx(expected, abs=1e-12)
    # q and k are normalised inside: scaling them changes nothing.
    assert moco_loss(3 * q, 0.1 * k, E2, 0.5).item() == pytest.approx(expected, abs=1e-12)


def test_moco_loss_with_empty_queue_is_zero_and_with_batch_queue_is_infonce():
    q = torch.randn(3, 4, dtype=torch.float64)
    k = torch.randn(3, 4, dtype=torch.float64)
    assert moco_loss(q, k, torch.zeros(0, 4, dtype=torch.float64), 0.2).item() == pytest.approx(0.0, abs=1e-12)
    # One negative per query, written out: log(1 + exp((q.n - q.k) / T)) averaged.
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    neg = torch.nn.functional.normalize(torch.randn(1, 4, dtype=torch.float64), dim=1)
    by_hand = torch.log1p(torch.exp(((qn @ neg.T).squeeze(1) - (qn * kn).sum(1)) / 0.2)).mean()
    assert moco_loss(q, k, neg, 0.2).item() == pytest.approx(by_hand.item(), abs=1e-12)


def test_moco_loss_gradient_reaches_queries_only():
    q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    moco_loss(q, k, torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1), 0.2).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None


# ---------------------------------------------------------------- VICReg


def test_vicreg_loss_by_hand():
    # z1 = [[0, 0], [2, 2]], z2 = [[1, 0], [1, 2]], B = 2, D = 2, eps = 1e-4, unbiased statistics.
    # invariance: mean of (z1 - z2)^2 = (1 + 0 + 1 + 0) / 4 = 0.5
    # variance z1: column variances (2, 2) -> std 1.414 > 1 -> 0
    # variance z2: column variances (0, 2) -> relu(1 - sqrt(1e-4)) = 0.99 and 0 -> mean 0.495
    # covariance z1: centred [[-1, -1], [1, 1]] -> cov [[2, 2], [2, 2]] -> (2^2 + 2^2) / D = 4
    # covariance z2: centred [[0, -1], [0, 1]] -> cov [[0, 0], [0, 2]] -> 0
    # loss = 25 * 0.5 + 25 * (0 + 0.495) + 1 * (4 + 0) = 28.875
    z1 = t([[0, 0], [2, 2]])
    z2 = t([[1, 0], [1, 2]])
    assert invariance_loss(z1, z2).item() == pytest.approx(0.5, abs=1e-12)
    assert variance_loss(z1).item() == pytest.approx(0.0, abs=1e-12)
    assert variance_loss(z2).item() == pytest.approx(0.495, abs=1e-12)
    assert covariance_loss(z1).item() == pytest.approx(4.0, abs=1e-12)
    assert covariance_loss(z2).item() == pytest.approx(0.0, abs=1e-12)
    assert vicreg_loss(z1, z2, 25.0, 25.0, 1.0).item() == pytest.approx(28.875, abs=1e-12)
    assert vicreg_loss(z1, z2, 1.0, 0.0, 0.0).item() == pytest.approx(0.5, abs=1e-12)


def test_vicreg_variance_term_zero_when_std_at_least_one():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(16, 5, dtype=torch.float64, generator=gen)
    z = (z - z.mean(0)) / z.std(0)  # unbiased std exactly 1
    assert variance_loss(2 * z).item() == 0.0
    assert variance_loss(z, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert variance_loss(0.5 * z, eps=0.0).item() == pytest.approx(0.5, abs=1e-12)  # relu(1 - 0.5) per column


# ---------------------------------------------------------------- SwAV


def test_sinkhorn_one_iteration_by_hand():
    # exp(scores / eps) = M = [[1, 2], [3, 4]] (B = 2 samples, K = 2 prototypes), eps = 1, 1 iteration.
    # Prototype step divides each column of M by its sum (4, 6): [[1/4, 1/3], [3/4, 2/3]];
    # the sample step then makes each row sum to 1: [[3/7, 4/7], [9/17, 8/17]].
    scores = torch.log(t([[1, 2], [3, 4]]))
    codes = sinkhorn(scores, epsilon=1.0, iters=1)
    assert torch.allclose(codes, t([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]), atol=1e-12)


def test_sinkhorn_row_and_column_sums():
    gen = torch.Generator().manual_seed(3)
    scores = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64, generator=gen), dim=1)
    codes = sinkhorn(scores, epsilon=0.05, iters=3)
    assert (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-12)  # one unit per sample
    converged = sinkhorn(scores, epsilon=0.05, iters=500)
    assert torch.allclose(converged.sum(0), torch.full((4,), 8 / 4, dtype=torch.float64), atol=1e-6)  # B / K each
    assert not torch.allclose(sinkhorn(scores, 0.05, 1).sum(0), converged.sum(0), atol=1e-3)


def test_sinkhorn_is_stable_gradient_free_and_keeps_dtype():
    scores = torch.tensor([[30.0, -30.0, 0.0], [0.0, 30.0, -30.0]], requires_grad=True)
    codes = sinkhorn(scores, epsilon=0.05, iters=3)  # exp(+-600) over- or underflows outside the log domain
    assert torch.isfinite(codes).all() and codes.dtype == torch.float32 and not codes.requires_grad
    half = sinkhorn(scores.detach().to(torch.bfloat16), 0.05, 3)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


def test_swav_loss_by_hand():
    # B = 1, K = 2, T = 1. scores1 = (0, ln 3) -> softmax (1/4, 3/4); scores2 = (ln 3, 0) -> (3/4, 1/4).
    # codes1 = (1, 0), codes2 = (1/2, 1/2).
    # code 1 -> scores 2: -log(3/4) = 0.287682
    # code 2 -> scores 1: -(1/2 log(1/4) + 1/2 log(3/4)) = 0.836988
    # mean = 0.562335
    s1 = t([[0, math.log(3)]])
    s2 = t([[math.log(3), 0]])
    c1, c2 = t([[1, 0]]), t([[0.5, 0.5]])
    expected = (-math.log(3 / 4) - 0.5 * (math.log(1 / 4) + math.log(3 / 4))) / 2
    assert swav_loss([s1, s2], [c1, c2], temperature=1.0).item() == pytest.approx(expected, abs=1e-12)
    # The temperature divides the scores: T = 0.5 on scores / 2 is the same problem.
    assert swav_loss([s1 / 2, s2 / 2], [c1, c2], temperature=0.5).item() == pytest.approx(expected, abs=1e-12)


def test_swav_loss_gradient_reaches_scores_not_codes():
    s = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    c = [torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1).requires_grad_() for _ in range(2)]
    swav_loss(s, c, 0.1).backward()
    assert all(x.grad.abs().sum() > 0 for x in s) and all(x.grad is None for x in c)


@pytest.mark.parametrize(
    "fn, args",
    [
        (nt_xent_loss, (torch.zeros(2, 3), torch.zeros(2, 4), 0.1)),
        (byol_loss, (torch.zeros(2, 3), torch.zeros(3, 3))),
        (barlow_twins_loss, (torch.zeros(2, 3), torch.zeros(2, 4), 5e-3, 0.1)),
        (moco_loss, (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 5), 0.2)),
        (vicreg_loss, (torch.zeros(2, 3), torch.zeros(3, 3), 25.0, 25.0, 1.0)),
    ],
)
def test_losses_reject_mismatched_shapes(fn, args):
    with pytest.raises(ValueError, match="shape|must be"):
        fn(*args)
