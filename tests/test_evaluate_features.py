"""extract_features (timm_branch.evaluate.features) on a tiny timm model."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from timm_branch.bn import apply_policy, is_pinned
from timm_branch.evaluate import extract_features


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _resnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, **kwargs)
    with torch.no_grad():  # non-trivial running statistics, so train-mode BN would differ
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_matches_manual_eval_forward_and_restores_mixed_flags(images):
    model = _resnet()
    model.train()
    model.layer1[0].bn1.eval()                     # one submodule in eval by hand
    apply_policy(model.layer2[0].bn2, "frozen")     # one pinned in eval by a BN policy
    before = {name: m.training for name, m in model.named_modules()}
    assert True in before.values() and False in before.values()
    stats = model.layer3[0].bn1.running_mean.clone()

    feats = extract_features(model, images, to_float, batch_size=1)

    assert {name: m.training for name, m in model.named_modules()} == before
    assert is_pinned(model.layer2[0].bn2)
    assert torch.equal(model.layer3[0].bn1.running_mean, stats)  # eval mode: no BN update
    model.eval()
    with torch.no_grad():
        manual = model.forward_head(model.forward_features(images.float() / 255), pre_logits=True)
    assert feats.shape == (2, model.num_features) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, manual, rtol=1e-5, atol=1e-5)


def test_headless_model_and_flags_restored_on_error(images):
    model = _resnet(num_classes=0).train()
    feats = extract_features(model, images, to_float)
    assert feats.shape == (2, 512)

    def broken(x):
        raise RuntimeError("transform failed")

    with pytest.raises(RuntimeError, match="transform failed"):
        extract_features(model, images, broken)
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError):
        extract_features(model, images.float(), to_float)  # not uint8


class _Recorder(nn.Module):
    """Records every call of its train() override (like timm's LeViT attention-bias cache)."""

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []
        self.conv = nn.Conv2d(3, 4, 1)

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Recorder()

    def forward_features(self, x):
        return self.body.conv(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


def test_train_overrides_run_on_the_way_in_and_out(images):
    model = _Tiny().train()
    model.body.calls.clear()
    feats = extract_features(model, images, to_float)
    assert feats.shape == (2, 4)
    assert model.body.calls == [False, True]
    assert all(m.training for m in model.modules())
