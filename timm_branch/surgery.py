"""add_branches / merge_branches: walk the conv -> BN pairs and apply branches and BN policies.

The walker only walks: the branch arithmetic is in :mod:`timm_branch.branch`, the BatchNorm
policies in :mod:`timm_branch.bn`, the pairing in :mod:`timm_branch.pairs`.
"""
from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch
from torch import nn

from . import bn as bn_policy
from . import bn_fold
from .branch import attach_branch, check_shape, iter_branches, merge_branch
from .history import BranchRecord, close_active, find_active, set_active
from .pairs import DEFAULT_NORMS, DEFAULT_THROUGH, check_norms_through, find_conv_norm_pairs, norm_kind

Selector = str | Sequence[str] | None


class NoBatchNormError(ValueError):
    """The model has no BatchNorm layer (or none of the ``norms`` kinds asked for), so there is nothing to branch."""


def add_branches(
    model: nn.Module,
    shape: str = "cross",
    bn: str = "frozen",
    include: Selector = None,
    exclude: Selector = None,
    train_unpaired: bool = False,
    example_input: torch.Tensor | None = None,
    norms: Sequence[str] = DEFAULT_NORMS,
    through: Sequence[str] = DEFAULT_THROUGH,
) -> nn.Module:
    """Give every conv that feeds a BatchNorm (or a norm layer in ``norms``) a zero-initialised,
    trainable weight-space branch.

    Args:
        model: a timm CNN (or any module) with BatchNorm layers; changed in place.
        shape: ``"1x1"``, ``"cross"`` or ``"full"``: which kernel taps the branches train
            (see :mod:`timm_branch.branch`).
        bn: policy for every norm layer of the ``norms`` kinds, ``"frozen"``, ``"affine"`` or
            ``"train"`` (see :mod:`timm_branch.bn`). Under ``"frozen"``, a BatchNorm that a branched
            conv feeds directly is folded into the conv during training steps
            (:mod:`timm_branch.bn_fold`): a forward hook on such a conv then sees the normalised
            output while gradients are on; merging and exports are unaffected.
        include: convs to branch, among the paired ones: a regex matched against the whole module
            name, or a list of module names or name suffixes (``"conv1"`` matches ``layer1.0.conv1``).
            ``None``: all paired convs.
        exclude: convs to leave without a branch, same forms as ``include``.
        train_unpaired: leave ``requires_grad`` as it is on parameters outside the branched convs
            and BatchNorms (classifier head, SE convs, convs without BN). By default they are frozen.
        example_input: a batch for the pairing fallback, used only if tracing fails.
        norms: which norm layers a conv may feed: ``"batch"`` (the paper's), ``"layer"``, ``"group"``
            (this project's extension; see :mod:`timm_branch.pairs`).
        through: what may stand between conv and norm: ``"shape"`` (shape-only linear ops),
            ``"act"`` (elementwise activations), ``"conv"`` (a following conv: separable chains).

    Returns:
        ``model``, whose branched convs keep their weights frozen and whose outputs are unchanged
        up to the rounding of ``W + 0`` (which is exact).

    Raises:
        ValueError: unknown ``shape``/``bn``/``norms``/``through``, the model already has branches,
            or no conv is selected.
        NoBatchNormError: the model has no norm layer of the ``norms`` kinds.
    """
    check_shape(shape)
    bn_policy.check_policy(bn)
    check_norms_through(norms, through)
    for name, selector in (("include", include), ("exclude", exclude)):
        _check_selector(name, selector)
    if next(iter_branches(model), None) is not None:
        raise ValueError("the model already has branches; call merge_branches(model) before adding new ones")
    require_norms(model, norms)
    pairs = find_conv_norm_pairs(model, example_input, norms, through)
    candidates = [pair.conv for pair in pairs]
    convs = [name for name in candidates if _selected(name, include, exclude)]
    if not convs:
        raise ValueError(
            f"no conv selected: {len(candidates)} convs feed a norm layer, but include={include!r} / "
            f"exclude={exclude!r} leave none of them (e.g. {candidates[:3]})"
            if candidates
            else f"the model has norm layers of the kinds {list(norms)} but no convolution feeds one through "
            f"{list(through)} ops, so there is nothing to branch; widen through= (shape, act, conv)"
        )

    record = BranchRecord(
        shape=shape,
        bn=bn,
        convs=convs,
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        train_unpaired=train_unpaired,
        include=_json_ready(include),
        exclude=_json_ready(exclude),
    )
    branched = {id(p) for name in convs for p in model.get_submodule(name).parameters()}
    layers = [m for m in model.modules() if norm_kind(m) in norms]
    norm_params = {id(p) for m in layers for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if id(param) in branched or (id(param) not in norm_params and not train_unpaired):
            param.requires_grad_(False)
    for layer in layers:
        bn_policy.apply_policy(layer, bn)
    for name in convs:
        attach_branch(model.get_submodule(name), shape)
    if bn == "frozen":
        # A frozen BatchNorm right behind its branched conv is a fixed affine map: training steps
        # fold it into the conv (timm_branch.bn_fold); merging and exports are unaffected.
        chosen = set(convs)
        for pair in pairs:
            if pair.direct and pair.conv in chosen:
                conv, norm = model.get_submodule(pair.conv), model.get_submodule(pair.norms[0])
                if bn_fold.can_fold(conv, norm):
                    bn_fold.fold(conv, norm)
    set_active(model, record)
    return model


def merge_branches(model: nn.Module) -> nn.Module:
    """Fold every branch into its conv weight and restore the stock architecture.

    Afterwards the model has exactly the module classes, state-dict keys, shapes, dtypes, devices
    and ``requires_grad`` flags it had before :func:`add_branches`, and its BatchNorm layers follow
    the model's train/eval mode again. The merged weights are bit-for-bit the effective weights
    the branched forward used.

    Raises:
        ValueError: the model has no branches, or a branch holds NaN/Inf (nothing is changed then).
    """
    branches = list(iter_branches(model))
    active = find_active(model)
    if not branches or not active:
        raise ValueError("the model has no branches to merge; call add_branches(model) first")
    bad = [name for name, _, branch in branches if not all(torch.isfinite(p).all() for p in branch.parameters())]
    if bad:
        raise ValueError(
            f"{len(bad)} branch(es) hold NaN or Inf values ({', '.join(bad[:5])}); refusing to merge. "
            "Reload the last good branch checkpoint with load_branch_state_dict(model, ...) and merge that."
        )
    with torch.no_grad():  # finite branches can still overflow W + branch in half precision
        overflow = [name for name, conv, _ in branches if not torch.isfinite(conv.weight).all()]
    if overflow:
        raise ValueError(
            f"{len(overflow)} merged weight(s) would overflow to Inf in {branches[0][1].weight.dtype} "
            f"({', '.join(overflow[:5])}); refusing to merge. Merge in float32 (model.float()) or train with a lower lr."
        )
    # add_branches may have been called on submodules (a backbone inside a wrapper): undo each.
    for owner, record in active:
        for module in owner.modules():
            if bn_fold.is_folded(module):
                bn_fold.unfold(module)
        for _, conv, _ in list(iter_branches(owner)):
            merge_branch(conv)
        for module in owner.modules():
            # BatchNorms always (as before); LayerNorm/GroupNorm only if a policy pinned them.
            if bn_policy.is_batchnorm(module) or (norm_kind(module) is not None and bn_policy.is_pinned(module)):
                bn_policy.release(module, owner.training)
        for name, param in owner.named_parameters():
            param.requires_grad_(record.requires_grad.get(name, param.requires_grad))
        close_active(owner)
    return model


def branch_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable branch tensors of ``model``, in module order (hand these to an optimiser):
    one per branched conv, or one per kernel axis for ``"cross-pair"`` branches."""
    for _, _, branch in iter_branches(model):
        yield from branch.parameters()


def branch_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The branches only, keyed by conv module name; ready for ``safetensors.torch.save_file``.

    Each value has the branch shape ``(*lead, taps)`` (see :class:`timm_branch.branch.ConvBranch`);
    a ``"cross-pair"`` branch gives one entry per line, keyed ``NAME.line_0``, ``NAME.line_1``, ...
    """
    state = {key: p.detach() for key, p in _branch_tensors(model).items()}
    if not state:
        raise ValueError("the model has no branches; call add_branches(model) first")
    return state


def load_branch_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy branches saved by :func:`branch_state_dict` into ``model``'s branches (strict).

    Raises:
        ValueError: the model has no branches, or the keys or shapes differ (a checkpoint of another
            model, ``include``/``exclude`` selection or branch shape); nothing is changed then.
    """
    branches = _branch_tensors(model)
    if not branches:
        raise ValueError("the model has no branches; call add_branches(model) with the checkpoint's settings first")
    missing = sorted(set(branches) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(branches))
    if missing or unexpected:
        raise ValueError(
            "branch checkpoint does not match the model's branches: "
            f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}; "
            "it was saved from another model or with other include/exclude settings"
        )
    wrong = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in branches.items()
        if tuple(state_dict[name].shape) != tuple(tensor.shape)
    ]
    if wrong:
        shape = next(iter_branches(model))[2].shape
        raise ValueError(
            f"branch checkpoint shapes differ from the model's ({'; '.join(wrong[:3])}); it was saved with "
            f"another branch shape (this model's branch shape is {shape!r})"
        )
    with torch.no_grad():
        for name, tensor in branches.items():
            tensor.copy_(state_dict[name])


def _branch_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every branch tensor by key: the conv's name, or ``NAME.line_i`` for a ``"cross-pair"`` line."""
    return {name if key == "branch" else f"{name}.{key}": p
            for name, _, branch in iter_branches(model) for key, p in branch.named_parameters()}


def require_batchnorm(model: nn.Module) -> None:
    """Raise :class:`NoBatchNormError`, saying what the model normalises with instead, if it has no BatchNorm."""
    if any(bn_policy.is_batchnorm(m) for m in model.modules()):
        return
    norms = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    uses = f"it normalises with {', '.join(norms)}" if norms else "it uses no normalisation layer (normaliser-free)"
    kinds = sorted({kind for m in model.modules() if (kind := norm_kind(m)) is not None})
    widen = f", or branch against its {' and '.join(kinds)} norms with norms={['batch', *kinds]}" if kinds else ""
    raise NoBatchNormError(
        f"{name} has no BatchNorm layer ({uses}). Branch-tuning keeps frozen BatchNorm layers to hold what "
        "the model knows while conv branches learn, so it does not apply here; fine-tune this model, "
        f"choose a BatchNorm CNN (resnet*, efficientnet*, regnet*, mobilenetv3*, densenet*, ...){widen}."
    )


def require_norms(model: nn.Module, norms: Sequence[str]) -> None:
    """Raise :class:`NoBatchNormError` if ``model`` has no norm layer of the ``norms`` kinds."""
    if any(norm_kind(m) in norms for m in model.modules()):
        return
    if tuple(norms) == ("batch",):
        require_batchnorm(model)
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    found = sorted({kind for m in model.modules() if (kind := norm_kind(m)) is not None})
    has = f"its norm layers are of the kinds {found}: add them to norms" if found else "it has none of them"
    raise NoBatchNormError(
        f"{name} has no norm layer of the kinds norms={list(norms)} ({has}), so there is nothing to branch"
    )


def _check_selector(name: str, selector: Selector) -> None:
    """Raise ``ValueError`` for an ``include``/``exclude`` that is neither a valid regex nor a list of names."""
    if selector is None:
        return
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as err:
            raise ValueError(f"{name}={selector!r} is not a valid regular expression ({err})") from None
    elif isinstance(selector, bytes) or not isinstance(selector, Sequence) or not all(isinstance(k, str) for k in selector):
        raise ValueError(f"{name}={selector!r} must be a regular expression (str) or a list of module names (str)")


def _selected(name: str, include: Selector, exclude: Selector) -> bool:
    return (include is None or _matches(name, include)) and (exclude is None or not _matches(name, exclude))


def _matches(name: str, selector: str | Sequence[str]) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)


def _json_ready(selector: Selector) -> str | list[str] | None:
    return selector if selector is None or isinstance(selector, str) else list(selector)
