"""BatchNorm policies: frozen stays in eval through model.train(), affine and train follow the mode."""
from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from timm_branch import bn as bn_policy


def _net(norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), BatchNormAct2d(4), nn.SyncBatchNorm(4)])
def test_frozen_survives_model_train_and_keeps_buffers(norm):
    net = _net(norm)
    bn_policy.apply_policy(norm, "frozen")
    net.train()
    assert not norm.training and bn_policy.is_pinned(norm)
    assert not any(p.requires_grad for p in norm.parameters())
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    if not isinstance(norm, nn.SyncBatchNorm):  # SyncBatchNorm needs a process group in train mode only
        net(torch.randn(4, 3, 8, 8)).sum().backward()
    after = norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_affine_updates_statistics_in_train_mode():
    norm = nn.BatchNorm2d(4)
    net = _net(norm)
    bn_policy.apply_policy(norm, "affine")
    net.train()
    assert norm.training and not norm.weight.requires_grad
    net(torch.randn(4, 3, 8, 8))
    assert int(norm.num_batches_tracked) == 1 and not torch.equal(norm.running_mean, torch.zeros(4))


def test_train_policy_makes_affine_trainable():
    norm = nn.BatchNorm2d(4)
    norm.weight.requires_grad_(False)
    bn_policy.apply_policy(norm, "train")
    assert norm.weight.requires_grad and norm.bias.requires_grad and not bn_policy.is_pinned(norm)


def test_release_restores_the_mode():
    norm = nn.BatchNorm2d(4)
    net = _net(norm)
    bn_policy.apply_policy(norm, "frozen")
    bn_policy.release(norm, training=True)
    assert norm.training and not bn_policy.is_pinned(norm)
    net.eval()
    assert not norm.training
    net.train()
    assert norm.training


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="unknown BatchNorm policy 'fixed'; choose one of frozen, affine, train"):
        bn_policy.apply_policy(nn.BatchNorm2d(2), "fixed")
