"""The model zoo of the coverage sweep (tests/test_coverage.py, scripts/coverage.py). Plain data.

FAMILY_MODELS, NO_PAIR_FAMILIES, NO_BATCHNORM_FAMILIES, WIDENED_FAMILY_MODELS, UNBRANCHABLE_FAMILIES,
INPUT_SIZES, FALLBACK_MODELS and WIDE_FALLBACK_MODELS were generated for timm 1.0.31 by
``python scripts/coverage.py --select``, which builds every model of every ``timm.list_modules()``
family on the ``meta`` device (``pretrained=False``), counts its parameters and picks per family the
smallest model with at least one conv -> BatchNorm pair with ``add_branches``' defaults, else the
smallest with a conv -> norm pair with the widest ``norms``/``through``, else says why there is none.
Rerun it after a timm upgrade (``test_zoo_classifies_every_family`` fails when timm gains a family)
and paste its output here; the hand-written parts are marked.
"""
from __future__ import annotations

# Height and width of the test batch for models that accept any size (hand-written).
DEFAULT_INPUT_SIZE: tuple[int, int] = (64, 64)

# timm family (module) -> its smallest model with a conv -> BatchNorm pair (generated).
FAMILY_MODELS: dict[str, str] = {
    'byoanet': 'halonet_h1',  # 8.10 M params
    'byobnet': 'test_byobnet',  # 0.46 M params
    'convmixer': 'convmixer_768_32',  # 21.11 M params
    'cpubone': 'cpubone_nano',  # 6.52 M params
    'cspnet': 'cs3darknet_focus_s',  # 3.27 M params
    'cspnext': 'cspnext_tiny',  # 2.73 M params
    'densenet': 'densenet121',  # 7.98 M params
    'dla': 'dla46x_c',  # 1.07 M params
    'dpn': 'dpn48b',  # 9.13 M params
    'efficientformer': 'efficientformer_l1',  # 12.29 M params
    'efficientformer_v2': 'efficientformerv2_s0',  # 3.60 M params
    'efficientnet': 'test_efficientnet',  # 0.36 M params
    'efficientvim': 'efficientvim_m1',  # 6.68 M params
    'efficientvit_mit': 'efficientvit_b0',  # 3.41 M params
    'efficientvit_msra': 'efficientvit_m0',  # 2.35 M params
    'fasternet': 'fasternet_t0',  # 3.91 M params
    'fastvit': 'fastvit_t8',  # 4.03 M params
    'ghostnet': 'ghostnet_050',  # 2.59 M params
    'hardcorenas': 'hardcorenas_b',  # 5.18 M params
    'hgnet': 'hgnetv2_b0',  # 6.00 M params
    'hrnet': 'hrnet_w18_small',  # 13.19 M params
    'iformer': 'iformer_t',  # 2.89 M params
    'inception_next': 'inception_next_atto',  # 4.16 M params
    'inception_resnet_v2': 'inception_resnet_v2',  # 55.84 M params
    'inception_v3': 'inception_v3',  # 23.83 M params
    'inception_v4': 'inception_v4',  # 42.68 M params
    'lcnetv2': 'lcnetv2_small',  # 4.13 M params
    'levit': 'levit_128s',  # 7.78 M params
    'lowformer': 'lowformer_b0',  # 14.10 M params
    'maxxvit': 'test_coatnet',  # 0.58 M params
    'mobilenetv3': 'mobilenetv3_small_050',  # 1.59 M params
    'mobilevit': 'mobilevit_xxs',  # 1.27 M params
    'nasnet': 'nasnetalarge',  # 88.75 M params
    'nextvit': 'nextvit_small',  # 31.76 M params
    'pnasnet': 'pnasnet5large',  # 86.06 M params
    'regnet': 'regnetx_002',  # 2.68 M params
    'repghost': 'repghostnet_050',  # 2.31 M params
    'repvit': 'repvit_m1',  # 5.49 M params
    'res2net': 'res2next50',  # 24.67 M params
    'resnest': 'resnest14d',  # 10.61 M params
    'resnet': 'test_resnet',  # 0.47 M params
    'resnetv2': 'resnetv2_18',  # 11.69 M params
    'rexnet': 'rexnet_100',  # 4.80 M params
    'selecsls': 'selecsls42',  # 30.35 M params
    'senet': 'legacy_seresnet18',  # 11.78 M params
    'shvit': 'shvit_s1',  # 6.33 M params
    'sknet': 'skresnet18',  # 11.96 M params
    'starnet': 'starnet_s050',  # 0.54 M params
    'swiftformer': 'swiftformer_xs',  # 3.48 M params
    'tiny_vit': 'tiny_vit_5m_224',  # 12.08 M params
    'tresnet': 'tresnet_m',  # 31.39 M params
    'vgg': 'vgg11_bn',  # 132.87 M params
    'visformer': 'visformer_tiny',  # 10.32 M params
    'vision_transformer_hybrid': 'vit_small_resnet50d_s16_224',  # 57.53 M params
    'volo': 'volo_d1_224',  # 26.63 M params
    'vovnet': 'ese_vovnet19b_slim_dw',  # 1.90 M params
    'xception': 'legacy_xception',  # 22.86 M params
    'xception_aligned': 'xception41p',  # 26.91 M params
    'xcit': 'xcit_nano_12_p8_224',  # 3.05 M params
}

# Families with BatchNorm somewhere but no conv feeding one (generated; reason hand-written).
NO_PAIR_FAMILIES: dict[str, str] = {
}

# Families where no model has any BatchNorm layer (generated).
NO_BATCHNORM_FAMILIES: list[str] = [
    'beit',
    'cait',
    'coat',
    'convit',
    'convnext',
    'crossvit',
    'csatv2',
    'davit',
    'deepseek_vit',
    'deit',
    'edgenext',
    'eva',
    'focalnet',
    'gcvit',
    'gemma4_vit',
    'hiera',
    'hieradet_sam2',
    'mambaout',
    'metaformer',
    'mlp_mixer',
    'mobilenetv5',
    'mvitv2',
    'naflexvit',
    'nest',
    'nfnet',
    'pit',
    'pvt_v2',
    'qwen3_vit',
    'rdnet',
    'sequencer',
    'swin_transformer',
    'swin_transformer_v2',
    'swin_transformer_v2_cr',
    'tnt',
    'twins',
    'vision_transformer',
    'vision_transformer_relpos',
    'vision_transformer_sam',
    'vitamin',
]

# timm family without a default pair -> its smallest model with a conv -> norm pair under the widest
# norms/through: every norm kind, through shape ops, activations and convs (generated).
WIDENED_FAMILY_MODELS: dict[str, str] = {
    'convnext': 'test_convnext',  # 0.27 M params
    'csatv2': 'csatv2',  # 11.10 M params
    'davit': 'davit_tiny',  # 28.36 M params
    'edgenext': 'edgenext_xx_small',  # 1.33 M params
    'focalnet': 'focalnet_tiny_srf',  # 28.43 M params
    'gcvit': 'gcvit_xxtiny',  # 12.00 M params
    'hieradet_sam2': 'sam2_hiera_tiny',  # 26.85 M params
    'mambaout': 'test_mambaout',  # 0.45 M params
    'metaformer': 'poolformerv2_s12',  # 11.89 M params
    'nest': 'nest_tiny',  # 17.06 M params
    'pvt_v2': 'pvt_v2_b0',  # 3.67 M params
    'rdnet': 'rdnet_tiny',  # 23.86 M params
    'sequencer': 'sequencer2d_s',  # 27.65 M params
    'swin_transformer': 'swin_tiny_patch4_window7_224',  # 28.29 M params
    'swin_transformer_v2': 'swinv2_tiny_window16_256',  # 28.35 M params
    'swin_transformer_v2_cr': 'swinv2_cr_tiny_224',  # 28.33 M params
    'vision_transformer_sam': 'samvit_base_patch16',  # 89.67 M params
    'vitamin': 'vitamin_small_224',  # 22.17 M params
}

# Families without a conv -> norm pair even with the widest settings -> why (generated).
UNBRANCHABLE_FAMILIES: dict[str, str] = {
    'beit': '7 models with convs and norm layers, none with a conv feeding one even through activations and convs (beit_base_patch16_224: 1 convs feeds flatten before any selected norm layer)',
    'cait': '10 models with convs and norm layers, none with a conv feeding one even through activations and convs (cait_xxs24_224: 1 convs feeds flatten before any selected norm layer)',
    'coat': '8 models with convs and norm layers, none with a conv feeding one even through activations and convs (coat_tiny: 12 convs feeds reshape before any selected norm layer; 8 convs feeds flatten before any selected norm layer)',
    'convit': '3 models with convs and norm layers, none with a conv feeding one even through activations and convs (convit_tiny: 1 convs feeds flatten before any selected norm layer)',
    'crossvit': '11 models with convs and norm layers, none with a conv feeding one even through activations and convs (crossvit_tiny_240: 2 convs feeds flatten before any selected norm layer)',
    'deepseek_vit': '3 models with convs, none with a BatchNorm, LayerNorm or GroupNorm: they normalise with RmsNormFp32 only',
    'deit': '16 models with convs and norm layers, none with a conv feeding one even through activations and convs (deit_tiny_patch16_224: 1 convs feeds flatten before any selected norm layer)',
    'eva': '60 models with convs and norm layers, none with a conv feeding one even through activations and convs (vit_tiny_patch16_dinov3_qkvb: 1 convs feeds view before any selected norm layer)',
    'gemma4_vit': '4 models, none with a convolution',
    'hiera': '8 models with convs and norm layers, none with a conv feeding one even through activations and convs (hiera_tiny_224: 1 convs feeds reshape before any selected norm layer)',
    'mlp_mixer': '11 models with convs and norm layers, none with a conv feeding one even through activations and convs (gmlp_ti16_224: 1 convs feeds flatten before any selected norm layer)',
    'mobilenetv5': '3 models with convs, none with a BatchNorm, LayerNorm or GroupNorm: they normalise with RmsNorm2d, RmsNormAct2d only',
    'mvitv2': '8 models with convs and norm layers, none with a conv feeding one even through activations and convs (mvitv2_tiny: 30 convs feeds reshape_post_pool before any selected norm layer; 1 convs feeds flatten before any selected norm layer)',
    'naflexvit': '14 models, none with a convolution',
    'nfnet': '36 models with convs, none with a BatchNorm, LayerNorm or GroupNorm: no norm layer at all (normaliser-free)',
    'pit': '8 models with convs and norm layers, none with a conv feeding one even through activations and convs (pit_ti_224: 3 convs feeds flatten before any selected norm layer)',
    'qwen3_vit': '9 models with convs and norm layers, none with a conv feeding one even through activations and convs (qwen3_vit_88m: 1 convs feeds reshape before any selected norm layer)',
    'tnt': '3 models with convs and norm layers, none with a conv feeding one even through activations and convs (tnt_s_legacy_patch16_224: 1 convs feeds Unfold before any selected norm layer)',
    'twins': '6 models with convs and norm layers, none with a conv feeding one even through activations and convs (twins_svt_small: 8 convs feeds flatten before any selected norm layer; 7 convs feeds reshape before any selected norm layer)',
    'vision_transformer': '147 models with convs and norm layers, none with a conv feeding one even through activations and convs (test_vit: 1 convs feeds view before any selected norm layer)',
    'vision_transformer_relpos': '14 models with convs and norm layers, none with a conv feeding one even through activations and convs (test_vit_relpos: 1 convs feeds flatten before any selected norm layer)',
}

# Special variants swept besides FAMILY_MODELS (hand-written): TF "same" padding (Conv2dSame),
# MixedConv2d, CondConv2d, re-parameterisable multi-branch blocks, pre-activation nets
# (BN after a residual addition or concatenation), and a BN VGG.
SPECIAL_MODELS: list[str] = [
    'tf_efficientnet_b0',
    'mixnet_s',
    'tf_mixnet_s',
    'efficientnet_cc_b0_4e',
    'repvgg_a0',
    'mobileone_s0',
    'resnetv2_18',
    'densenet121',
    'dpn48b',
    'xception41p',
    'vgg11_bn',
]

# (H, W) for models with pretrained_cfg['fixed_input_size'] or that do not run at DEFAULT_INPUT_SIZE
# (generated): the smallest of 96, 128, 160, 192 below pretrained_cfg['input_size'] that runs, else
# pretrained_cfg['input_size'].
INPUT_SIZES: dict[str, tuple[int, int]] = {
    'efficientformer_l1': (224, 224),
    'efficientformerv2_s0': (224, 224),
    'efficientvit_m0': (96, 96),
    'gcvit_xxtiny': (224, 224),
    'halonet_h1': (256, 256),
    'inception_resnet_v2': (96, 96),
    'inception_v3': (96, 96),
    'inception_v4': (96, 96),
    'levit_128s': (224, 224),
    'nest_tiny': (224, 224),
    'samvit_base_patch16': (96, 96),
    'sequencer2d_s': (96, 96),
    'swiftformer_xs': (96, 96),
    'swin_tiny_patch4_window7_224': (224, 224),
    'swinv2_cr_tiny_224': (224, 224),
    'swinv2_tiny_window16_256': (256, 256),
    'test_coatnet': (160, 160),
    'visformer_tiny': (224, 224),
    'vit_small_resnet50d_s16_224': (224, 224),
    'vitamin_small_224': (224, 224),
    'volo_d1_224': (224, 224),
    'xcit_nano_12_p8_224': (96, 96),
}

# Models whose pairing falls back (part of the model cannot be FX-traced): they must emit a
# timm_branch.PairingFallbackWarning, every other model must not (generated).
FALLBACK_MODELS: list[str] = [
    'cpubone_nano',
    'efficientvit_b0',
    'efficientvit_m0',
    'mobilevit_xxs',
    'tiny_vit_5m_224',
]

# The same with the widest norms/through, the pairing of the slow sweep (generated).
WIDE_FALLBACK_MODELS: list[str] = [
    'cpubone_nano',
    'efficientvit_b0',
    'efficientvit_m0',
    'mobilevit_xxs',
    'tiny_vit_5m_224',
]

# create_model kwargs of sweep models (hand-written): a zero-initialised classifier outputs 0 whatever
# the branches do, so these compare pooled features instead.
SWEEP_KWARGS: dict[str, dict] = {
    'sequencer2d_s': {'num_classes': 0},
}

# Fast tier (hand-written): test id -> (model, create_model kwargs); each runs in every branch shape.
FAST_MODELS: dict[str, tuple[str, dict]] = {
    'tf_mixnet_s': ('tf_mixnet_s', {}),  # Conv2dSame inside MixedConv2d, depthwise, SE
    'efficientnet_cc_b0_4e': ('efficientnet_cc_b0_4e', {}),  # CondConv2d (per-sample expert kernels)
    'resnetv2_18': ('resnetv2_18', {}),  # pre-activation: conv -> residual add -> next block's BN
    'densenet121': ('densenet121', {}),  # pre-activation through concatenation and avg-pool
    'regnetx_002': ('regnetx_002', {}),  # grouped convs
    'resnet10t_os8': ('resnet10t', {'output_stride': 8}),  # dilated convs (dilation 2 and 4)
    'mobileone_s0': ('mobileone_s0', {}),  # re-parameterisable multi-branch blocks
    'mobilevit_xxs': ('mobilevit_xxs', {}),  # untraceable MobileVitBlock: the pairing fallback
    'starnet_s050': ('starnet_s050', {}),  # convs with a bias feeding a BatchNorm
}

# Models without BatchNorm that add_branches must refuse (hand-written, fast tier).
NO_BATCHNORM_EXAMPLES: list[str] = ['convnext_atto', 'vit_tiny_patch16_224']

# Models branched only with wider add_branches(norms=..., through=...) (hand-written): test id ->
# (model, add_branches kwargs, slow tier?).
WIDENED_MODELS: dict[str, tuple[str, dict, bool]] = {
    'convnext_atto-layer': ('convnext_atto', {'norms': ('layer',)}, False),  # depthwise 7x7 -> channels-last LN
    'fasternet_t0-conv': ('fasternet_t0', {'through': ('shape', 'act', 'conv')}, False),  # conv -> pointwise -> BN
    'resnetv2_50x1_bit-group': ('resnetv2_50x1_bit', {'norms': ('group',)}, True),  # StdConv2d -> GroupNormAct (BiT)
}
