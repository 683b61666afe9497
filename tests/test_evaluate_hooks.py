"""Layer selection and forward-hook capture: the captured tensors are the true layer outputs."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import randomise_batchnorm
from timm_branch.evaluate.hooks import LayerCapture, base_name, is_activation, layer_type, layer_types, select_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomise_batchnorm(model, torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def test_resnet() -> nn.Module:
    return _timm("test_resnet")


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_select_layers_by_type(test_resnet):
    types = layer_types(test_resnet, select_layers(test_resnet))
    blocks = [n for n, t in types.items() if t == "block"]
    assert blocks == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    # deep stem: an nn.Sequential of primitives, under the model -> its convs/BNs/ReLUs, no block
    assert types["conv1.0"] == "conv" and types["conv1.1"] == "bn" and types["conv1.2"] == "act"
    assert "conv1" not in types
    # downsample: a Sequential inside a block; its pool is none of the types
    assert "layer2.0.downsample" not in types and "layer2.0.downsample.0" not in types
    assert types["layer2.0.downsample.1"] == "conv" and types["layer2.0.downsample.2"] == "bn"
    assert types["layer3.0.act3"] == "act" and types["bn1"] == "bn"
    assert "fc" not in types and "global_pool" not in types and "layer1" not in types
    assert select_layers(test_resnet, types=["block"]) == blocks
    assert layer_type(test_resnet, "fc") == "other"
    assert layer_type(test_resnet, "layer1.0.act1@1") == "act"


def test_select_layers_patterns_fullmatch(test_resnet):
    assert select_layers(test_resnet, ["layer4\\..*"], types=["bn"]) == [
        "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.2"]
    assert select_layers(test_resnet, ["act1"]) == ["act1"]  # fullmatch: not layer1.0.act1
    assert select_layers(test_resnet, ["fc"], types=None) == ["fc"]
    assert select_layers(test_resnet, ["fc"]) == []
    with pytest.raises(ValueError, match="unknown layer type"):
        select_layers(test_resnet, types=["norm"])
    with pytest.raises(ValueError, match="invalid layer pattern"):
        select_layers(test_resnet, ["layer("])


def test_activation_and_block_rules():
    from timm.layers import get_act_layer

    for act in (nn.ReLU(), nn.SiLU(), nn.GELU(), nn.Hardswish(), nn.LeakyReLU(), get_act_layer("gelu_tanh")(),
                get_act_layer("swish")(), get_act_layer("hard_mish")()):
        assert is_activation(act), act
    for other in (nn.Identity(), nn.MultiheadAttention(4, 2), nn.Linear(2, 2), nn.MaxPool2d(2)):
        assert not is_activation(other), other
    vit = timm.create_model("test_vit", pretrained=False)
    blocks = select_layers(vit, types=["block"])
    assert blocks[: len(vit.blocks)] == [f"blocks.{i}" for i in range(len(vit.blocks))]
    assert "blocks.0.mlp.act" in select_layers(vit, types=["act"])


def test_hooks_match_forward_intermediates():
    """Block outputs captured by hooks equal timm's own forward_intermediates (resnet18: the stem
    activation and the last block of every stage; narrow, for speed)."""
    model = _timm("resnet18", channels=(8, 16, 24, 32))
    assert len(model.layer1) == 2
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = ["act1", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1, 2, 3, 4], intermediates_only=True)
        with LayerCapture(model, names) as capture:
            got = capture.run(x)
    assert list(got) == names
    for name, want in zip(names, expected):
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
    torch.testing.assert_close(capture.output, model(x), rtol=0, atol=0)


def test_captures_true_values_despite_in_place_ops(test_resnet):
    """timm's BasicBlock adds the shortcut in place onto bn2's output and ReLU(inplace=True)
    overwrites bn1's: the hook's copy must be the value the layer produced."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    block = test_resnet.layer1[0]
    names = ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.act1", "layer1.0.conv2", "layer1.0.bn2", "layer1.0.act2"]
    with torch.no_grad(), LayerCapture(test_resnet, names) as capture:
        got = capture.run(x)
        assert list(got) == names  # forward order
        assert (got["layer1.0.bn1"] < 0).any()  # not the ReLU-ed tensor
        torch.testing.assert_close(got["layer1.0.bn1"], block.bn1(got["layer1.0.conv1"]))
        torch.testing.assert_close(got["layer1.0.bn2"], block.bn2(got["layer1.0.conv2"]))
        assert not torch.allclose(got["layer1.0.bn2"].relu(), got["layer1.0.act2"])  # the shortcut was added after


def test_batchnormact_entry_is_the_normalised_output_before_the_activation():
    model = _timm("test_efficientnet")
    bn = model.bn1
    assert type(bn).__name__ == "BatchNormAct2d" and isinstance(bn.act, nn.SiLU)
    names = select_layers(model, ["conv_stem", "bn1", "bn1\\.act", "blocks\\.0", "blocks\\.0\\.0"])
    assert layer_types(model, names) == {"conv_stem": "conv", "bn1": "bn", "bn1.act": "act",
                                         "blocks.0": "block", "blocks.0.0": "block"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), LayerCapture(model, names) as capture:
        got = capture.run(x)
    assert list(got) == ["conv_stem", "bn1", "bn1.act", "blocks.0.0", "blocks.0"]
    normalised = F.batch_norm(got["conv_stem"], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(got["bn1"], normalised)
    torch.testing.assert_close(got["bn1.act"], F.silu(normalised))
    torch.testing.assert_close(got["blocks.0"], got["blocks.0.0"])  # a stage's output is its last block's


class _SharedReLU(nn.Module):
    """torchvision BasicBlock style: one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pair = nn.Identity()

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) - 1.0)
        return y, self.pair((y, y))  # pair's output is a tuple: not recorded


def test_repeated_calls_get_one_entry_each():
    model = _SharedReLU()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), LayerCapture(model, ["conv1", "conv2", "relu", "pair"]) as capture:
        got = capture.run(x)
        again = capture.run(x)  # counters restart per run
    assert list(got) == ["conv1", "relu", "conv2", "relu@1"] == list(again)
    torch.testing.assert_close(got["relu"], got["conv1"].relu())
    torch.testing.assert_close(got["relu@1"], (got["conv2"] - 1.0).relu())
    assert base_name("relu@1") == "relu" and base_name("a@b") == "a@b"


def test_hooks_removed_after_and_on_error(test_resnet):
    other = test_resnet.act1.register_forward_hook(lambda *a: None)  # someone else's hook stays
    before = _hook_count(test_resnet)
    with LayerCapture(test_resnet, select_layers(test_resnet)) as capture:
        assert _hook_count(test_resnet) > before
        with torch.no_grad():
            capture.run(torch.zeros(1, 3, 16, 16))
    assert _hook_count(test_resnet) == before

    def boom(t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), LayerCapture(test_resnet, ["act1"], fn=boom) as capture:
        capture.run(torch.zeros(1, 3, 16, 16))
    assert _hook_count(test_resnet) == before
    with pytest.raises(KeyError, match="nope"), LayerCapture(test_resnet, ["act1", "nope"]):
        pass
    assert _hook_count(test_resnet) == before
    with pytest.raises(RuntimeError, match="with"):
        LayerCapture(test_resnet, ["act1"]).run(torch.zeros(1, 3, 16, 16))
    assert _hook_count(test_resnet) == before
    other.remove()
