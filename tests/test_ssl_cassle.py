"""CaSSLe distillers: predictor shape, each method's distillation loss by hand, gradients, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from timm_branch.ssl import METHODS, barlow_twins_loss, build_distiller, build_method, byol_loss
from timm_branch.ssl.cassle import DISTILL_HIDDEN_DIM, Distiller

FEAT, B = 10, 4


def pair(name: str, **kw):
    torch.manual_seed(0)
    kw = {"proj_hidden_dim": 16, "proj_output_dim": 8, "pred_hidden_dim": 16, "queue_size": 8, "num_prototypes": 6, **kw}
    method = build_method(name, FEAT, **kw)
    frozen = copy.deepcopy(method).requires_grad_(False).eval()
    return method, frozen


def identity_distiller(method) -> Distiller:
    distiller = build_distiller(method, hidden_dim=32).double()
    distiller.predictor = nn.Identity()  # isolate the loss from the learned predictor
    return distiller


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_predictor_is_cassles_mlp():
    method, _ = pair("byol", proj_output_dim=8)
    distiller = build_distiller(method)
    layers = list(distiller.predictor)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (8, DISTILL_HIDDEN_DIM) == (8, 2048)
    assert (layers[3].in_features, layers[3].out_features) == (2048, 8)


def test_contrastive_distillation_by_hand():
    # B = 1, two views, T = 1. Predictions p1 = p2 = e1; frozen projections f1 = e1, f2 = e2.
    # L = P @ F.T = [[1, 0], [1, 0]]; positives on the diagonal.
    # CE(L, [0, 1]):   row 0: -log(e / (e + 1)) = log(1 + 1/e) = 0.313262
    #                  row 1: -log(1 / (e + 1)) = log(1 + e)   = 1.313262   -> mean 0.813262
    # CE(L.T, [0, 1]): L.T = [[1, 1], [0, 0]]: both rows log 2 = 0.693147   -> mean 0.693147
    # loss = (0.813262 + 0.693147) / 2 = 0.753204
    method, frozen = pair("simclr", proj_output_dim=2, distill_temperature=1.0)
    distiller = identity_distiller(method)
    e1, e2 = t([[1, 0]]), t([[0, 1]])
    loss = distiller([e1, e1], [e1, e2], method, frozen)
    expected = ((math.log(1 + 1 / math.e) + math.log(1 + math.e)) / 2 + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # matching predictions: every row and column log(1 + 1/e) = 0.313262
    assert distiller([e1, e2], [e1, e2], method, frozen).item() == pytest.approx(math.log(1 + 1 / math.e), abs=1e-12)


def test_moco_uses_the_contrastive_distiller_at_its_temperature():
    method, frozen = pair("moco", proj_output_dim=2)
    distiller = identity_distiller(method)
    e1, e2 = t([[1, 0]]), t([[0, 1]])
    # as above with T = 0.2: each row and column -log(e^5 / (e^5 + 1)) = log(1 + e^-5)
    loss = distiller([e1, e2], [e1, e2], method, frozen)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-5)), abs=1e-12)


def test_byol_barlow_vicreg_distillation_forms():
    gen = torch.Generator().manual_seed(4)
    z = [torch.randn(B, 8, dtype=torch.float64, generator=gen) for _ in range(2)]
    zf = [torch.randn(B, 8, dtype=torch.float64, generator=gen) for _ in range(2)]
    method, frozen = pair("byol", proj_output_dim=8)
    expected = (byol_loss(z[0], zf[0]) + byol_loss(z[1], zf[1])) / 2
    assert torch.allclose(identity_distiller(method)(z, zf, method, frozen), expected)
    method, frozen = pair("barlow", proj_output_dim=8)
    expected = (barlow_twins_loss(z[0], zf[0], 5e-3, 0.1) + barlow_twins_loss(z[1], zf[1], 5e-3, 0.1)) / 2
    assert torch.allclose(identity_distiller(method)(z, zf, method, frozen), expected)
    # VICReg: 25 * mean of the per-view MSE, written out
    method, frozen = pair("vicreg", proj_output_dim=8)
    mse = sum(((a - b) ** 2).mean() for a, b in zip(z, zf)) / 2
    assert torch.allclose(identity_distiller(method)(z, zf, method, frozen), 25 * mse)
    assert method.recipe.distill_weight == 25.0


def test_swav_knowledge_distillation_by_hand():
    # T = 1, K = 2 prototypes in 2-D. Frozen prototypes = [e1, e2]; z_frozen = e1 -> scores (1, 0)
    # -> targets softmax = (e/(e+1), 1/(e+1)) = (0.731059, 0.268941).
    # Distiller prototypes = [e1, e2], prediction e1: same distribution, CE = its entropy
    #   -(0.731059 ln 0.731059 + 0.268941 ln 0.268941) = 0.582203
    # Distiller prototypes swapped [e2, e1]: prediction (0.268941, 0.731059):
    #   CE = -(0.731059 ln 0.268941 + 0.268941 ln 0.731059) = 1.044320
    method, frozen = pair("swav", proj_output_dim=2, num_prototypes=2, distill_temperature=1.0)
    frozen.prototypes.weight.data = t([[2, 0], [0, 0.5]]).float()  # unnormalised: renormalised inside
    distiller = identity_distiller(method).eval()
    distiller.prototypes.weight.data = t([[1, 0], [0, 1]])
    e1 = t([[1, 0]])
    p, q = math.e / (math.e + 1), 1 / (math.e + 1)
    entropy = -(p * math.log(p) + q * math.log(q))
    assert distiller([e1, e1], [e1, e1], method, frozen).item() == pytest.approx(entropy, abs=1e-6)
    distiller.prototypes.weight.data = t([[0, 1], [1, 0]])
    cross = -(p * math.log(q) + q * math.log(p))
    assert distiller([e1, e1], [e1, e1], method, frozen).item() == pytest.approx(cross, abs=1e-6)
    # the targets come from the frozen method's prototypes, not the current method's
    method.prototypes.weight.data.normal_()
    assert distiller([e1, e1], [e1, e1], method, frozen).item() == pytest.approx(cross, abs=1e-6)
    frozen.prototypes.weight.data = t([[0, 1], [1, 0]]).float()
    assert distiller([e1, e1], [e1, e1], method, frozen).item() == pytest.approx(entropy, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_distillers_give_finite_loss_with_gradients_to_z_only(name):
    method, frozen = pair(name)
    distiller = build_distiller(method, hidden_dim=32)
    gen = torch.Generator().manual_seed(1)
    f = [torch.randn(B, FEAT, generator=gen) for _ in range(2)]
    mf = [torch.randn(B, FEAT, generator=gen) for _ in range(2)] if method.uses_momentum else None
    out = method(f, mf)
    z = [v.detach().requires_grad_() for v in out.z]
    with torch.no_grad():
        z_frozen = frozen.project(f)
    z_frozen = [v.requires_grad_() for v in z_frozen]
    loss = distiller(z, z_frozen, method, frozen)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z)
    assert all(v.grad is None for v in z_frozen)
    assert distiller.predictor[0].weight.grad.abs().sum() > 0


def test_distiller_errors():
    method, frozen = pair("swav")
    distiller = build_distiller(method, hidden_dim=32)
    z = [torch.randn(B, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="needs frozen_method"):
        distiller(z, z, method, None)
    other, _ = pair("simclr")
    with pytest.raises(ValueError, match="built for swav, not simclr"):
        distiller(z, z, other, frozen)
    with pytest.raises(ValueError, match="same views"):
        distiller(z, z[:1], method, frozen)
    with pytest.raises(ValueError, match="no CaSSLe distiller for 'dino'"):
        Distiller("dino", method.recipe)
