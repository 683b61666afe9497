"""Pairing by data flow: post- and pre-activation nets, timm conv classes, names and order ignored."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from timm_branch import ConvBNPair, PairingFallbackWarning, find_conv_bn_pairs
from timm_branch.pairs import ConvNormPair, find_conv_norm_pairs


def _pairs(model, **kwargs) -> dict[str, tuple[str, ...]]:
    return {p.conv: p.bns for p in find_conv_bn_pairs(model, **kwargs)}


def test_resnet18_every_conv_pairs_with_its_bn():
    model = timm.create_model("resnet18", pretrained=False)
    pairs = _pairs(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(pairs) == convs and len(convs) == 20
    assert pairs["layer1.0.conv2"] == ("layer1.0.bn2",)
    assert pairs["layer2.0.downsample.0"] == ("layer2.0.downsample.1",)


class _Misnamed(nn.Module):
    """Names and registration order lie: only the data flow tells the pairs."""

    def __init__(self):
        super().__init__()
        self.bn = nn.Conv2d(3, 4, 3)          # a conv called bn
        self.conv = nn.BatchNorm2d(4)         # a BN called conv, registered before its conv
        self.feeds_act = nn.Conv2d(4, 4, 1)
        self.norm_after_act = nn.BatchNorm2d(4)
        self.also_output = nn.Conv2d(4, 4, 1)
        self.norm_too = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv(self.bn(x))
        x = self.norm_after_act(torch.relu(self.feeds_act(x)))
        y = self.also_output(x)
        return self.norm_too(y), y  # y also leaves the model without a BN


def test_pairs_follow_data_flow_not_names_or_order():
    assert _pairs(_Misnamed()) == {"bn": ("conv",), "feeds_act": ("norm_after_act",)}
    shape_only = find_conv_norm_pairs(_Misnamed(), through=("shape",))
    assert shape_only == [ConvNormPair("bn", ("conv",), "shape", direct=True)]


class _Indirect(nn.Module):
    """Pairs whose norm layer is not the conv output's one and only consumer."""

    def __init__(self):
        super().__init__()
        self.direct, self.norm_direct = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.residual, self.norm_residual = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.shared_norm_conv, self.shared_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.twice, self.norm_twice = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.norm_direct(self.direct(x))
        x = self.norm_residual(self.residual(x) + x)  # through an addition
        x = self.shared_norm(self.shared_norm_conv(x)) + self.shared_norm(x)  # the norm also runs elsewhere
        return self.norm_twice(self.twice(self.twice(x)))  # the conv runs twice


def test_a_pair_is_direct_only_when_its_norm_alone_takes_the_convs_output_unchanged():
    pairs = {p.conv: p for p in find_conv_norm_pairs(_Indirect())}
    assert {name: p.direct for name, p in pairs.items()} == {"direct": True, "residual": False, "shared_norm_conv": False}
    resnet = find_conv_norm_pairs(timm.create_model("resnet18", pretrained=False))
    assert len(resnet) == 20 and all(p.direct for p in resnet)


class _PreAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.norm3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = x + self.conv1(torch.relu(self.norm1(x)))          # residual add, then the next BN
        y = self.conv2(torch.relu(self.norm2(x)))
        return self.norm3(torch.cat([self.pool(x), self.pool(y)], 1))  # pool + concat, then a BN


def test_pre_activation_convs_feed_the_next_blocks_bn():
    assert _pairs(_PreAct()) == {"conv1": ("norm2", "norm3"), "conv2": ("norm3",)}


def test_timm_pre_activation_families():
    pairs = _pairs(timm.create_model("resnetv2_18", pretrained=False))
    assert pairs["stages.0.blocks.0.conv2"] == ("stages.0.blocks.1.norm1", "stages.1.blocks.0.norm1")
    pairs = _pairs(timm.create_model("densenet121", pretrained=False))
    assert pairs["features.transition1.conv"][0] == "features.denseblock2.denselayer1.norm1"


def test_mixed_conv_children_and_cond_conv_pair():
    mixnet = timm.create_model("mixnet_s", pretrained=False)
    pairs = _pairs(mixnet)
    assert pairs["blocks.2.0.conv_dw.0"] == pairs["blocks.2.0.conv_dw.1"] == ("blocks.2.0.bn2",)
    cc = timm.create_model("efficientnet_cc_b0_4e", pretrained=False)
    assert type(cc.blocks[4][0].conv_pw).__name__ == "CondConv2d"
    assert _pairs(cc)["blocks.4.0.conv_pw"] == ("blocks.4.0.bn1",)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: FX cannot trace this
            x = x * 0
        x = self.bn(self.conv(x))
        return self.bn2(x + self.conv2(x))  # an indirect pair the fallback rule does not see


def test_untraceable_model_falls_back_conservatively_with_a_warning():
    with pytest.warns(PairingFallbackWarning, match="FX tracing of the model failed.*fallback rule"):
        pairs = find_conv_bn_pairs(_Untraceable(), example_input=torch.randn(2, 3, 8, 8))
    assert pairs == [ConvBNPair("conv", ("bn",))]


def test_fallback_without_an_input_size_asks_for_example_input():
    with pytest.raises(ValueError, match="pass example_input"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PairingFallbackWarning)
            find_conv_bn_pairs(_Untraceable())


def test_untraceable_timm_leaf_is_traced_on_its_own_or_falls_back():
    model = timm.create_model("mobilevit_xxs", pretrained=False)
    with pytest.warns(PairingFallbackWarning, match="MobileVitBlock"):
        pairs = _pairs(model)  # the fallback forward uses pretrained_cfg['input_size']
    assert pairs["stages.2.1.conv_kxk.conv"] == ("stages.2.1.conv_kxk.bn",)
    assert "stages.2.1.conv_1x1" not in pairs


def test_model_without_batchnorm_has_no_pairs():
    assert find_conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 3, 3), nn.GroupNorm(1, 3))) == []


class _Chains(nn.Module):
    """conv -> GELU -> BN, a separable depthwise -> pointwise -> BN, and LayerNorm/GroupNorm after convs."""

    def __init__(self):
        super().__init__()
        self.act_conv, self.act_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.pw, self.sep_bn = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.ln_conv, self.ln = nn.Conv2d(8, 8, 1), nn.LayerNorm(8)
        self.gn_conv, self.gn = nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.act_bn(nn.functional.gelu(self.act_conv(x)))
        x = self.sep_bn(self.pw(self.dw(x)))
        x = self.ln(self.ln_conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # ConvNeXt's channels-last LN
        x = self.gn(self.gn_conv(x))
        return x * torch.sigmoid(self.gate(x))  # a gate: never paired


def _paths(**kwargs) -> dict[str, tuple[tuple[str, ...], str]]:
    return {p.conv: (p.norms, p.path) for p in find_conv_norm_pairs(_Chains(), **kwargs)}


def test_default_pairs_through_activations_into_batchnorm_only():
    assert _paths() == {"act_conv": (("act_bn",), "act"), "pw": (("sep_bn",), "shape")}


def test_widened_norms_and_through_pair_chains_layernorm_and_groupnorm():
    widest = _paths(norms=("batch", "layer", "group"), through=("shape", "act", "conv"))
    assert widest == {
        "act_conv": (("act_bn",), "act"), "dw": (("sep_bn",), "conv"), "pw": (("sep_bn",), "shape"),
        "ln_conv": (("ln",), "shape"), "gn_conv": (("gn",), "shape"),
    }
    assert _paths(norms=("group",)) == {"gn_conv": (("gn",), "shape")}


@pytest.mark.parametrize("kwargs", [{"norms": ("instance",)}, {"through": ("reshape",)}, {"norms": "batch"},
                                    {"through": ()}])
def test_unknown_norm_or_through_kinds_are_named(kwargs):
    with pytest.raises(ValueError, match="norms|through"):
        find_conv_norm_pairs(_Chains(), **kwargs)


def test_convmixer_pairs_through_its_activation_by_default():
    with torch.device("meta"):
        model = timm.create_model("convmixer_768_32", pretrained=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    pairs = find_conv_norm_pairs(model)
    assert [p.conv for p in pairs] == convs and {p.path for p in pairs} == {"act"}
    assert find_conv_norm_pairs(model, through=("shape",)) == []


@pytest.mark.slow
@pytest.mark.parametrize("name, depthwise", [("nasnetalarge", 220), ("pnasnet5large", 168)])
def test_nasnet_separable_chains_pair_with_through_conv(name, depthwise):
    """Every depthwise conv of NASNet/PNASNet (depthwise -> pointwise -> BN) pairs only with through conv."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(convs) == depthwise and not convs & {p.conv for p in find_conv_norm_pairs(model)}
    wide = {p.conv: p.path for p in find_conv_norm_pairs(model, through=("shape", "act", "conv"))}
    assert {wide.get(conv) for conv in convs} == {"conv"}
