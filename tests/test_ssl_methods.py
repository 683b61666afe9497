"""The SSL methods: forward contract, heads, momentum pairs, MoCo/SwAV state, recipes, build_method."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from timm_branch.ssl import (
    METHODS,
    RECIPES,
    Prototypes,
    Recipe,
    SSLMethod,
    SSLOutput,
    build_method,
    ema_update,
    moco_loss,
    projection_mlp,
)

FEAT, B = 12, 6
TINY = dict(proj_hidden_dim=16, proj_output_dim=8, pred_hidden_dim=16, queue_size=10, num_prototypes=5)


def tiny(name: str, **kw) -> SSLMethod:
    torch.manual_seed(0)
    return build_method(name, FEAT, **{**TINY, **kw})


def feats(seed: int = 0, grad: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, FEAT, generator=gen).requires_grad_(grad) for _ in range(2)]


def run(method: SSLMethod, seed: int = 0) -> tuple[SSLOutput, list[torch.Tensor]]:
    f = feats(seed)
    mf = feats(seed + 100, grad=False) if method.uses_momentum else None
    return method(f, mf), f


@pytest.mark.parametrize("name", METHODS)
def test_forward_gives_finite_scalar_with_gradient_and_z_shapes(name):
    method = tiny(name)
    out, f = run(method)
    assert isinstance(out, SSLOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert len(out.z) == 2 and all(z.shape == (B, 8) for z in out.z)
    out.loss.backward()
    for view in f:
        assert view.grad is not None and view.grad.abs().sum() > 0
    assert method.projector[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_project_matches_forward_z(name):
    method = tiny(name).eval()
    out, f = run(method)
    for a, b in zip(method.project(f), out.z):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_momentum_methods_need_momentum_feats(name):
    method = tiny(name)
    assert method.uses_momentum
    with pytest.raises(ValueError, match=f"{name} uses a momentum encoder: pass momentum_feats"):
        method(feats())


@pytest.mark.parametrize("name", ["simclr", "barlow", "vicreg", "swav"])
def test_other_methods_refuse_momentum_feats_and_have_no_pairs(name):
    method = tiny(name)
    assert not method.uses_momentum and method.momentum_pairs() == []
    with pytest.raises(ValueError, match="no momentum encoder"):
        method(feats(), feats(1, grad=False))


def test_views_are_checked():
    method = tiny("simclr")
    with pytest.raises(ValueError, match="2 views, got 4"):
        method(feats() + feats(1))
    with pytest.raises(ValueError, match=r"\(B, 12\), got \(6, 7\)"):
        method([torch.randn(B, 7), torch.randn(B, 7)])
    with pytest.raises(ValueError, match="one shape"):
        method([torch.randn(B, FEAT), torch.randn(B + 1, FEAT)])
    with pytest.raises(ValueError, match="list of 2 tensors"):
        method(torch.randn(2, B, FEAT))
    byol = tiny("byol")
    with pytest.raises(ValueError, match="momentum_feats"):
        byol(feats(), [torch.randn(B + 1, FEAT)] * 2)


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_momentum_pairs_are_frozen_copies_that_follow_ema(name):
    method = tiny(name)
    [(online, target)] = method.momentum_pairs()
    assert online is method.projector and target is method.momentum_projector
    assert all(not p.requires_grad for p in target.parameters())
    for a, b in zip(online.parameters(), target.parameters()):
        assert torch.equal(a, b)
    out, _ = run(method)
    out.loss.backward()
    assert all(p.grad is None for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(online, target, 0.9)
    for old, new, p in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * p)


def test_byol_loss_uses_the_momentum_projection_of_the_other_view():
    method = tiny("byol")
    out, f = run(method)
    mf = feats(100, grad=False)
    z1, z2 = (method.projector(v) for v in f)
    p1, p2 = method.predictor(z1), method.predictor(z2)
    m1, m2 = (method.momentum_projector(v) for v in mf)
    cos = torch.nn.functional.cosine_similarity
    expected = 2 - 2 * cos(p1, m2).mean() + 2 - 2 * cos(p2, m1).mean()
    assert torch.allclose(out.loss, expected)


def test_moco_queue_loss_enqueue_and_state():
    method = tiny("moco")
    assert method.queue.shape == (2, 10, 8)
    assert torch.allclose(method.queue.norm(dim=2), torch.ones(2, 10))
    assert {"queue", "queue_ptr"} <= set(method.state_dict())
    queue = method.queue.clone()
    f, mf = feats(), feats(100, grad=False)
    out = method(f, mf)
    # the loss uses the queue as it was before this step's keys
    q1, q2 = out.z
    k1, k2 = (torch.nn.functional.normalize(method.momentum_projector(v), dim=1) for v in mf)
    expected = (moco_loss(q1, k2, queue[1], 0.2) + moco_loss(q2, k1, queue[0], 0.2)) / 2
    assert torch.allclose(out.loss, expected)
    out.loss.backward()  # the in-place enqueue must not break the backward
    assert torch.allclose(method.queue[0, :B], k1) and torch.allclose(method.queue[1, :B], k2)
    assert torch.equal(method.queue[:, B:], queue[:, B:])
    assert int(method.queue_ptr) == B
    method(f, mf)  # 6 more keys into 10 rows: rows 6..9, then wrap to 0..1
    assert int(method.queue_ptr) == 2
    assert torch.allclose(method.queue[0, 6:], k1[:4]) and torch.allclose(method.queue[0, :2], k1[4:])
    method.eval()
    snapshot = method.queue.clone()
    method(f, mf)
    assert torch.equal(method.queue, snapshot) and int(method.queue_ptr) == 2
    restored = tiny("moco")
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.queue, method.queue) and int(restored.queue_ptr) == 2


def test_swav_prototypes_normalised_frozen_and_queue():
    method = tiny("swav")
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    out, _ = run(method)
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(5))
    out.loss.backward()
    assert method.prototypes.weight.grad.abs().sum() > 0
    # epochs 0 and 1 (freeze_prototypes_epochs = 2): no gradient for the prototypes
    method.on_epoch_start(0)
    method.zero_grad(set_to_none=True)
    run(method)[0].loss.backward()
    assert method.prototypes.weight.grad is None
    assert method.prototypes.weight.requires_grad  # the optimiser's parameters never change
    method.on_epoch_start(2)
    run(method)[0].loss.backward()
    assert method.prototypes.weight.grad is not None
    # the queue (10 rows) fills newest-first in training mode
    assert int(method.queue_len) == 10  # 4 steps of 6
    out, f = run(method, seed=5)
    newest = torch.nn.functional.normalize(method.projector(f[0]), dim=1)
    assert torch.allclose(method.queue[0, :B], newest, atol=1e-6)
    # from epoch_queue_starts (50) on, the queue enters the codes and changes the loss
    method.eval()
    before = run(method, seed=7)[0].loss
    method.on_epoch_start(50)
    assert method.use_queue
    after = run(method, seed=7)[0].loss
    assert not torch.allclose(before, after)


def test_heads_shapes():
    simclr, barlow, byol = RECIPES["simclr"], RECIPES["barlow"], RECIPES["byol"]
    assert [type(m) for m in projection_mlp(4, 8, 2, batch_norm=simclr.proj_bn)] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in projection_mlp(4, 8, 2, num_layers=byol.proj_layers)] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    mlp = projection_mlp(4, 8, 2, num_layers=barlow.proj_layers, last_bn=True)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert mlp(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ValueError, match="num_layers"):
        projection_mlp(4, 8, 2, num_layers=0)
    protos = Prototypes(3, 7)
    with torch.no_grad():
        protos.weight.mul_(5)
    protos.normalize_()
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(7))
    assert protos(torch.randn(2, 3)).shape == (2, 7)


def test_recipes_carry_the_cassle_cifar_numbers():
    assert tuple(RECIPES) == METHODS
    r = RECIPES
    assert (r["simclr"].lr, r["simclr"].weight_decay, r["simclr"].temperature, r["simclr"].proj_output_dim) == (
        0.4, 1e-5, 0.2, 256)
    assert (r["byol"].lr, r["byol"].base_momentum, r["byol"].pred_hidden_dim) == (1.0, 0.99, 4096)
    assert (r["barlow"].lamb, r["barlow"].scale_loss, r["barlow"].proj_layers) == (5e-3, 0.1, 3)
    assert (r["moco"].queue_size, r["moco"].temperature, r["moco"].base_momentum, r["moco"].final_momentum) == (
        65536, 0.2, 0.99, 0.999)
    assert (r["vicreg"].sim_weight, r["vicreg"].var_weight, r["vicreg"].cov_weight) == (25.0, 25.0, 1.0)
    assert r["vicreg"].crop_min_scale == 0.2 and r["simclr"].crop_min_scale == 0.08
    assert (r["swav"].num_prototypes, r["swav"].sk_epsilon, r["swav"].sk_iters, r["swav"].lr) == (3000, 0.05, 3, 0.6)
    assert r["simclr"].jitter == r["swav"].jitter == (0.8, 0.8, 0.8, 0.2)
    assert r["byol"].jitter == (0.4, 0.4, 0.2, 0.1)
    assert r["byol"].solarize_p == r["barlow"].solarize_p == (0.0, 0.2) and r["simclr"].solarize_p == (0.0, 0.0)
    assert all(rec.blur_p == (0.0, 0.0) and rec.flip_p == 0.5 and rec.gray_p == 0.2 for rec in r.values())
    assert {n: rec.distill_temperature for n, rec in r.items() if rec.distill_temperature} == {
        "simclr": 0.2, "moco": 0.2, "swav": 0.1}
    assert {n for n, rec in r.items() if rec.base_momentum is not None} == {"byol", "moco"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r["simclr"].lr = 1.0


def test_build_method_defaults_overrides_and_errors():
    method = build_method("simclr", 32)
    assert method.recipe is RECIPES["simclr"] or method.recipe == RECIPES["simclr"]
    assert method.name == "simclr" and method.feature_dim == 32
    assert method.projector[0].in_features == 32 and method.projector[-1].out_features == 256
    hot = build_method("simclr", 32, temperature=0.5, proj_output_dim=64)
    assert hot.recipe.temperature == 0.5 and hot.projector[-1].out_features == 64
    assert RECIPES["simclr"].temperature == 0.2  # the shared default is untouched
    with pytest.raises(ValueError, match="unknown SSL method 'dino'; choose one of simclr, byol, barlow, moco, vicreg, swav"):
        build_method("dino", 32)
    with pytest.raises(ValueError, match="unknown recipe field.*temprature.*Recipe fields are lr, "):
        build_method("simclr", 32, temprature=0.5)
    with pytest.raises(ValueError, match="simclr needs recipe fields temperature"):
        build_method("simclr", 32, temperature=None)
    with pytest.raises(TypeError, match="Recipe"):
        type(method)(32, recipe={"lr": 0.1})


@pytest.mark.parametrize("name", METHODS)
def test_methods_deepcopy_for_cassle_frozen_copy(name):
    method = tiny(name)
    frozen = copy.deepcopy(method).requires_grad_(False).eval()
    z = frozen.project(feats(3, grad=False))
    assert all(v.shape == (B, 8) and not v.requires_grad for v in z)
    assert isinstance(method.recipe, Recipe)
