"""Layer-wise CKA between models (timm_branch.evaluate.cka_compare): protocol, curves, JSON results."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import seeded_test_resnet as _resnet
from timm_branch.data import EvalTransform
from timm_branch.evaluate.cka_compare import CKAResult, compare_models, load_results, save_results, stability_plasticity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_model_against_itself_is_one_everywhere(images):
    model = _resnet()
    transform = EvalTransform(16)
    for other, batch_size in ((model, 12), (copy.deepcopy(model), 24)):
        result = compare_models(model, other, images, transform, batch_size=batch_size, repeats=2, seed=3)
        assert len(result.layers) == 46 and len(result.values) == 2
        np.testing.assert_allclose(result.mean, 1.0, atol=1e-9)
        np.testing.assert_allclose(result.std, 0.0, atol=1e-9)
    assert set(result.types) == {"conv", "bn", "act", "block"}
    order = result.layers  # the forward's order: downsample before the residual ReLU, block last
    assert order.index("layer2.0.downsample.2") < order.index("layer2.0.act2") < order.index("layer2.0")
    assert result.meta["images_per_repeat"] == 24 and result.meta["repeats"] == 2
    assert result.meta["batch_size"] == 24


def test_flags_restored_and_nothing_changes(images):
    model = _resnet()
    model.train()
    model.layer1.eval()  # mixed modes come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare_models(model, _resnet(1), images, EvalTransform(16), batch_size=24, repeats=1)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: no BatchNorm statistics updated
    assert all(p.grad is None for p in model.parameters())
    assert all(-1 - 1e-9 <= m <= 1 + 1e-9 for m in result.mean)

    def broken(x):
        raise RuntimeError("transform failed")

    with pytest.raises(RuntimeError, match="transform failed"):
        compare_models(model, _resnet(1), images, broken, batch_size=12, repeats=1)
    assert [m.training for m in model.modules()] == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_only_shared_layers_and_any_widths(images):
    def net(width: int, extra: bool) -> nn.Module:
        torch.manual_seed(width)
        layers = [nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                  nn.Sequential(nn.Conv2d(width, width + 2, 3), nn.ReLU())]
        return nn.Sequential(*layers, *([nn.Conv2d(width + 2, 3, 1)] if extra else []))

    a, b = net(4, extra=True), net(9, extra=False)
    result = compare_models(a, b, images, EvalTransform(16), batch_size=24, repeats=1)
    assert result.layers == ["0", "1", "2", "3.0", "3.1", "3"]
    assert result.types == ["conv", "bn", "act", "conv", "act", "block"]
    assert result.meta["skipped_layers"] == ["4"]
    assert all(0.0 < m <= 1.0 for m in result.mean)
    explicit = compare_models(a, b, images, EvalTransform(16), layers=["3", "0", "nope"], batch_size=24, repeats=1)
    assert explicit.layers == ["0", "3"] and explicit.meta["skipped_layers"] == ["nope"]
    with pytest.raises(ValueError, match="no layer to compare"):
        compare_models(a, b, images, EvalTransform(16), layers=["4"], repeats=1)
    with pytest.raises(ValueError, match="more than 3 images"):
        compare_models(a, b, images[:3], EvalTransform(16))
    with pytest.raises(ValueError, match="uint8"):
        compare_models(a, b, images.float(), EvalTransform(16))


def test_stability_plasticity(images):
    prev, cur, joint = _resnet(0), _resnet(1), _resnet(2)
    layers = ["act1", "layer1.0", "layer2.0.bn1", "layer4.0"]
    kw = dict(layers=layers, batch_size=12, repeats=2)
    curves = stability_plasticity(prev, cur, joint, images[:12], images[12:], EvalTransform(16), **kw)
    assert list(curves) == ["stability", "plasticity"]
    direct = compare_models(prev, cur, images[:12], EvalTransform(16), **kw)
    assert curves["stability"].mean == direct.mean and curves["stability"].layers == layers
    assert "old-task" in curves["stability"].meta["pair"] and "new-task" in curves["plasticity"].meta["pair"]
    only = stability_plasticity(None, cur, joint, None, images[12:], EvalTransform(16), **kw)
    assert list(only) == ["plasticity"]
    with pytest.raises(ValueError, match="old_images"):
        stability_plasticity(prev, cur, None, None, images, EvalTransform(16))


def test_json_round_trip(tmp_path):
    a = CKAResult(layers=["conv1", "bn1", "act1", "layer1.0"], types=["conv", "bn", "act", "block"],
                  mean=[0.9, float("nan"), 0.7, 0.6], std=[0.01, float("nan"), 0.02, 0.0],
                  values=[[0.89, float("nan"), 0.68, 0.6], [0.91, float("nan"), 0.72, 0.6]], meta={"repeats": 2})
    b = CKAResult(layers=["conv1", "bn1", "extra", "act1"], types=["conv", "bn", "other", "act"],
                  mean=[0.5, 0.6, 0.4, 0.3], std=[0.0] * 4, values=[[0.5, 0.6, 0.4, 0.3]])
    d = a.to_dict()
    json.dumps(d, allow_nan=False)  # NaN written as null
    assert d["mean"][1] is None and d["mean_by_type"] == {"conv": 0.9, "act": 0.7, "block": 0.6}
    back = CKAResult.from_dict(json.loads(json.dumps(d)))
    assert back.layers == a.layers and math.isnan(back.mean[1]) and back.values[1][0] == 0.91
    a.save_json(tmp_path / "one.json")
    assert load_results(tmp_path / "one.json")["cka"].mean[0] == 0.9
    save_results({"stability": a, "plasticity": b}, tmp_path / "cka.json", meta={"task": 1})
    loaded = load_results(tmp_path / "cka.json")
    assert list(loaded) == ["stability", "plasticity"] and loaded["plasticity"].layers == b.layers
