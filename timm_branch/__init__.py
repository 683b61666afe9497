"""timm-branch: Branch-tuning (arXiv 2403.18266) for continual self-supervised learning of timm CNNs.

The data flow: :func:`find_conv_bn_pairs` -> :func:`add_branches` -> train
:func:`branch_parameters` -> :func:`merge_branches` -> :func:`save_pretrained` / :func:`push_to_hub`.
The continual trainer is :mod:`timm_branch.train` (``timm-branch train``).
"""
from ._version import __version__
from .branch import BRANCH_SHAPES, ConvBranch
from .bn import BN_POLICIES
from .export import save_pretrained
from .history import branch_history
from .hub import HubPushError, push_task_folder, push_to_hub
from .pairs import ConvBNPair, ConvNormPair, PairingFallbackWarning, find_conv_bn_pairs, find_conv_norm_pairs
from .surgery import (
    NoBatchNormError,
    add_branches,
    branch_parameters,
    branch_state_dict,
    load_branch_state_dict,
    merge_branches,
)

__all__ = [
    "__version__",
    "BN_POLICIES",
    "BRANCH_SHAPES",
    "ConvBNPair",
    "ConvBranch",
    "ConvNormPair",
    "HubPushError",
    "NoBatchNormError",
    "PairingFallbackWarning",
    "add_branches",
    "branch_history",
    "branch_parameters",
    "branch_state_dict",
    "find_conv_bn_pairs",
    "find_conv_norm_pairs",
    "load_branch_state_dict",
    "merge_branches",
    "push_task_folder",
    "push_to_hub",
    "save_pretrained",
]
