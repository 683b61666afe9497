"""Layer-wise linear CKA between two timm models: the stability/plasticity analysis of Branch-tuning.

Branch-tuning (arXiv 2403.18266) argues from a layer-wise CKA analysis that BatchNorm layers carry
stability and convs carry plasticity. This module reproduces that analysis for any pair of timm
models with the same module names.

**Estimator.** Linear CKA with the unbiased HSIC estimator of Song et al. (2012), in the minibatch
form of Nguyen, Raghu and Kornblith (arXiv 2010.15327)::

    CKA(X, Y) = sum_b HSIC1(K_b, L_b) / sqrt(sum_b HSIC1(K_b, K_b) * sum_b HSIC1(L_b, L_b))

with ``K_b = X_b X_b^T`` and ``L_b = Y_b Y_b^T`` the linear-kernel Gram matrices of minibatch
``b`` (each sample's activation flattened to one vector), and, for ``n > 3`` samples and Gram
matrices with their diagonals set to zero::

    HSIC1(K, L) = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n (n-3))

(:func:`hsic_unbiased`). :class:`MinibatchCKA` computes the same value through "U-centred" Gram
matrices (Szekely and Rizzo 2014: ``HSIC1(K, L) = <U(K), U(L)> / (n (n-3))``), which is cheaper
and makes ``HSIC1(K, K) >= 0``, so the result lies in [-1, 1]. Gram matrices, HSIC terms and
sums are float64 whatever the models' dtype. Unlike the biased estimator, the unbiased one is
near 0 for independent representations even when the feature dimension exceeds the number of
samples (see the tests). A layer whose output is constant over the images (a dead ReLU) has
``HSIC1(K, K) = 0`` and an undefined CKA: NaN here, ``null`` in JSON, a gap in the plot.

**Layers.** :func:`select_layers` (from :mod:`timm_branch.evaluate.hooks`) picks every conv,
BatchNorm, activation and block output, or names matching regular expressions; outputs are
captured with forward hooks on the models' real forward (:class:`~timm_branch.evaluate.hooks.
LayerCapture`), which compute each Gram matrix inside the hook, so only ``n x n`` matrices are
kept. The hooks module documents three details: timm's ``BatchNormAct2d`` contributes its
normalised output *before* its activation (the activation is its own ``bn.act`` entry); a
module called several times per forward gives one entry per call (``relu``, ``relu@1``);
entries are ordered as the forward produces them.

**Protocol** (:func:`compare_models`). Both models in eval mode under ``torch.no_grad()``; each
of ``repeats`` repeats shuffles the images with a seeded generator, cuts them into minibatches
of at most ``batch_size`` and accumulates the minibatch CKA per layer; the result is the mean
and standard deviation (ddof=1) over repeats. With ``N <= batch_size`` images there is one
minibatch, every repeat gives the same value and the std is 0; the authors' setting (128 test
images, repeated 10 times) is ``batch_size=128, repeats=10`` with 128 images.
:func:`stability_plasticity` computes the paper's two curves:

- stability = CKA(model after task t-1, model after task t) on old-task images;
- plasticity = CKA(model after task t, a model trained jointly on tasks 0..t) on new-task images.

**Command line** (wired in as ``timm-branch cka``; :func:`configure_parser`, :func:`run_command`)::

    timm-branch cka MODEL_A MODEL_B --data digits [--classes 0 1 2] --output out/
    timm-branch cka --stability PREV CUR --plasticity CUR JOINT --data digits \\
        --old-classes 0 1 2 3 --new-classes 4 5 --output out/
    timm-branch cka --stability RUN/task-0 RUN/task-1 --plasticity RUN/task-1 JOINT/task-1 \\
        --run RUN --task 1 --output out/

A MODEL is ``local-dir:PATH``, ``hf-hub:org/name``, an existing folder (a run's ``task-K``,
read as ``local-dir:``) or a plain timm architecture name, created with ``pretrained=False``
and random weights seeded by ``--seed`` (for tests; two equal names give equal models). Models
are created with ``num_classes=0``. Images come from ``--data`` (a
:func:`~timm_branch.data.load_source` spec, default ``digits``), its test split (``--split``;
the train split when the source has none), restricted to ``--classes`` (one curve) or
``--old-classes`` / ``--new-classes`` (stability / plasticity). ``--run RUN_DIR --task K``
instead takes the data, image size and task split of a ``timm-branch train`` run (its
``config.yaml``; ``--data`` and ``--image-size`` override them): old = the images of tasks
``0..K-1``, new = those of task ``K``. ``--num-images N`` keeps a random subset (seeded) of each set.
An image folder is listed, not decoded up front: only the images compared are decoded, so a folder
larger than memory (a run trained with ``--stream``) works with ``--num-images``.
``--layers`` takes regular expressions on module names, ``--types`` the layer types. The
evaluation transform is :class:`~timm_branch.data.EvalTransform` at ``--image-size`` (default:
the run's, else 32). ``--output DIR`` writes ``cka.json`` (every curve: layers, types, mean,
std, per-repeat values, mean per type) and ``cka.png``; the mean CKA per layer type is printed.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write, atomic_write_json
from .hooks import LAYER_TYPES, LayerCapture, base_name, layer_types, select_layers

if TYPE_CHECKING:  # the data package is imported where it is used: evaluation needs none of it
    from ..data import ImageFiles

__all__ = [
    "CKAResult",
    "LAYER_TYPES",
    "MinibatchCKA",
    "compare_models",
    "configure_parser",
    "gram_linear",
    "hsic_unbiased",
    "linear_cka",
    "load_results",
    "plot_cka",
    "results_to_dict",
    "run_command",
    "save_results",
    "select_layers",
    "stability_plasticity",
]

_GRAM_CHUNK = 1 << 24  # elements of one float64 feature chunk in gram_linear (128 MiB)


# ----------------------------------------------------------------------------------------------
# estimators


def gram_linear(x: Tensor) -> Tensor:
    """The linear-kernel Gram matrix ``X X^T`` (float64, ``(n, n)``) of ``x`` with shape
    ``(n, ...)``, each sample flattened to one vector. The features are cast to float64 a chunk
    at a time, so the float64 copy never exceeds 128 MiB."""
    x = x.detach().reshape(x.shape[0], -1)
    n, p = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _GRAM_CHUNK // max(n, 1))
    for start in range(0, p, step):
        chunk = x[:, start : start + step].to(torch.float64)
        gram.addmm_(chunk, chunk.T)
    return gram


def _check_gram(k: Tensor, what: str) -> Tensor:
    if not isinstance(k, Tensor) or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{what} must be a square (n, n) tensor, got {getattr(k, 'shape', type(k))}")
    if k.shape[0] <= 3:
        raise ValueError(f"the unbiased HSIC estimator needs n > 3 samples, got n = {k.shape[0]}")
    return k


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator of Song et al. (2012), from Gram matrices ``K``, ``L`` ``(n, n)``.

    The diagonals are set to zero here (on float64 copies; the inputs are not changed), then::

        HSIC1 = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n (n-3))

    Returns a float64 scalar tensor. Raises ``ValueError`` unless ``n > 3`` and the shapes agree.
    """
    _check_gram(K, "K")
    _check_gram(L, "L")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
    n = K.shape[0]
    K = K.to(torch.float64).clone().fill_diagonal_(0)
    L = L.to(torch.float64).clone().fill_diagonal_(0)
    trace = (K * L.T).sum()
    sums = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = K.sum(0) @ L.sum(1) * 2 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _u_center(K: Tensor) -> Tensor:
    """U-centring (Szekely and Rizzo 2014) of a symmetric Gram matrix, float64, zero diagonal:
    ``<U(K), U(L)> / (n (n-3))`` equals :func:`hsic_unbiased` ``(K, L)``."""
    n = K.shape[0]
    K = K.to(torch.float64).clone().fill_diagonal_(0)
    means = K.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    K = K - means[:, None] - means[None, :]
    return K.fill_diagonal_(0)


def _flat(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{what} must be a tensor of shape (n, ...)")
    return x.reshape(x.shape[0], -1)


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of one batch, directly: ``HSIC1(K, L) / sqrt(HSIC1(K, K) HSIC1(L, L))``.

    ``X`` ``(n, p, ...)`` and ``Y`` ``(n, q, ...)`` hold the same ``n > 3`` samples in the same
    order (each sample flattened); ``p`` and ``q`` may differ. Computed in float64 with
    :func:`hsic_unbiased`. NaN when either side is constant over the samples.
    """
    X, Y = _flat(X, "X"), _flat(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same samples, got n = {X.shape[0]} and {Y.shape[0]}")
    K, L = gram_linear(X), gram_linear(Y)
    xy, xx, yy = (float(hsic_unbiased(a, b)) for a, b in ((K, L), (K, K), (L, L)))
    return _ratio(xy, xx, yy)


def _ratio(xy: float, xx: float, yy: float) -> float:
    den = xx * yy
    return xy / math.sqrt(den) if den > 0 and math.isfinite(den) else float("nan")


class MinibatchCKA:
    """Accumulates the minibatch linear CKA of Nguyen et al. over batches of two representations.

    ``update(X, Y)`` (features, ``(n, ...)`` each) or ``update_grams(K, L)`` (their Gram
    matrices) adds ``HSIC1(K, L)``, ``HSIC1(K, K)`` and ``HSIC1(L, L)`` of one batch (``n > 3``;
    batches may differ in size) to running float64 sums; :meth:`result` is
    ``sum HSIC1(K, L) / sqrt(sum HSIC1(K, K) * sum HSIC1(L, L))``. With a single batch this
    equals :func:`linear_cka`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.hsic_xy = 0.0
        self.hsic_xx = 0.0
        self.hsic_yy = 0.0
        self.batches = 0

    def update(self, X: Tensor, Y: Tensor) -> None:
        """Add one minibatch of features ``X`` ``(n, ...)`` and ``Y`` ``(n, ...)`` of the same ``n > 3`` samples."""
        X, Y = _flat(X, "X"), _flat(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X and Y must hold the same samples, got n = {X.shape[0]} and {Y.shape[0]}")
        self.update_grams(gram_linear(X), gram_linear(Y))

    def update_grams(self, K: Tensor, L: Tensor) -> None:
        """Add one minibatch given as Gram matrices ``K``, ``L`` ``(n, n)`` of the same ``n > 3`` samples."""
        _check_gram(K, "K")
        _check_gram(L, "L")
        if K.shape != L.shape:
            raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
        n = K.shape[0]
        Ku, Lu = _u_center(K), _u_center(L.to(K.device))
        scale = 1.0 / (n * (n - 3))
        self.hsic_xy += float((Ku * Lu).sum()) * scale
        self.hsic_xx += float((Ku * Ku).sum()) * scale
        self.hsic_yy += float((Lu * Lu).sum()) * scale
        self.batches += 1

    def result(self) -> float:
        """The CKA so far (NaN before any batch or when a side is constant)."""
        return _ratio(self.hsic_xy, self.hsic_xx, self.hsic_yy)


# ----------------------------------------------------------------------------------------------
# results


def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if values is None or not math.isfinite(values) else float(values)


def _none_to_nan(values):
    if isinstance(values, list):
        return [_none_to_nan(v) for v in values]
    return float("nan") if values is None else float(values)


@dataclass
class CKAResult:
    """Layer-wise CKA between two models.

    Attributes:
        layers: capture entries (module names, ``name@k`` for the k-th repeated call), in the
            order the first model's forward produced them.
        types: the layer type of each entry (``"conv"``, ``"bn"``, ``"act"``, ``"block"`` or
            ``"other"``).
        mean: per layer, the mean CKA over repeats.
        std: per layer, the standard deviation over repeats (ddof=1; 0 for one repeat).
        values: ``repeats x layers``, each repeat's CKA.
        meta: how it was computed (images, batch size, repeats, seed, estimator, skipped layers,
            and whatever a caller adds, e.g. model names).
    """

    layers: list[str]
    types: list[str]
    mean: list[float]
    std: list[float]
    values: list[list[float]]
    meta: dict = field(default_factory=dict)

    def by_type(self) -> dict[str, float]:
        """Mean CKA over the layers of each type (NaN layers left out), in :data:`LAYER_TYPES`
        order, then ``"other"``."""
        out = {}
        for kind in (*LAYER_TYPES, "other"):
            vals = [m for m, t in zip(self.mean, self.types) if t == kind and math.isfinite(m)]
            if vals:
                out[kind] = float(np.mean(vals))
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN written as ``None``); :meth:`from_dict` reads it back."""
        return {
            "layers": list(self.layers),
            "types": list(self.types),
            "mean": _nan_to_none(list(self.mean)),
            "std": _nan_to_none(list(self.std)),
            "values": _nan_to_none([list(v) for v in self.values]),
            "mean_by_type": self.by_type(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "CKAResult":
        """The result :meth:`to_dict` wrote."""
        return cls(
            layers=list(data["layers"]),
            types=list(data["types"]),
            mean=_none_to_nan(list(data["mean"])),
            std=_none_to_nan(list(data["std"])),
            values=_none_to_nan([list(v) for v in data["values"]]),
            meta=dict(data.get("meta", {})),
        )

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())


def results_to_dict(results: Mapping[str, CKAResult], meta: Mapping | None = None) -> dict:
    """``{"curves": {name: result.to_dict()}, "meta": meta}``: the layout of ``cka.json``."""
    return {"curves": {name: r.to_dict() for name, r in results.items()}, "meta": dict(meta or {})}


def save_results(results: Mapping[str, CKAResult], path: str | Path, meta: Mapping | None = None) -> Path:
    """Write several named curves (e.g. stability and plasticity) to one JSON file, atomically."""
    return atomic_write_json(path, results_to_dict(results, meta))


def load_results(path: str | Path) -> dict[str, CKAResult]:
    """Read the curves of a file written by :func:`save_results` (or one :meth:`CKAResult.save_json`,
    returned under the key ``"cka"``)."""
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if "curves" in data:
        return {name: CKAResult.from_dict(d) for name, d in data["curves"].items()}
    return {"cka": CKAResult.from_dict(data)}


# ----------------------------------------------------------------------------------------------
# comparing models


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    device, dtype = None, None
    for tensor in (*model.parameters(), *model.buffers()):
        device = tensor.device if device is None else device
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
    return device or torch.device("cpu"), dtype or torch.float32


def _check_images(images: Tensor, what: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a uint8 tensor (N, C, H, W), got {got}")
    if images.shape[0] <= 3:
        raise ValueError(f"{what}: the unbiased CKA estimator needs more than 3 images, got {images.shape[0]}")


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    layers: Sequence[str] | None = None,
    batch_size: int = 128,
    repeats: int = 10,
    seed: int = 0,
) -> CKAResult:
    """Layer-wise minibatch linear CKA between ``model_a`` and ``model_b`` on ``images``.

    Args:
        model_a, model_b: models with the same module names for the layers to compare (widths
            may differ: CKA compares representations of any sizes). Passing the same object
            twice runs one forward per batch.
        images: uint8 ``(N, C, H, W)``, ``N > 3``, on any device.
        transform: maps a uint8 batch, moved to ``model_a``'s device, to the float input of the
            models (e.g. :class:`~timm_branch.data.EvalTransform` on that device); its output
            is cast to each model's device and floating dtype.
        layers: module names to compare; default :func:`select_layers` of each model (every
            conv, BN, activation and block), intersected. Only names that are modules of both
            models are compared; the others are listed in ``meta["skipped_layers"]``. Use
            :func:`select_layers` with patterns to choose by regular expression.
        batch_size: images per minibatch (at most: the last one may be smaller; a last
            minibatch of 3 images or fewer is left out, as the estimator needs ``n > 3``).
        repeats: passes over the images, each in a new order from a ``torch.Generator`` seeded
            with ``seed``; the result holds their mean and std.
        seed: the shuffling seed (the global RNG is not used).

    Both models run in eval mode under ``torch.no_grad()``; afterwards every submodule's
    ``training`` flag is what it was (also on errors), and the hooks are removed.

    Raises:
        ValueError: bad images or arguments, no layer in common, or no layer produced an output.
    """
    _check_images(images)
    if int(batch_size) < 4:
        raise ValueError(f"batch_size must be >= 4 (the unbiased estimator needs n > 3), got {batch_size}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batch_size, repeats = int(batch_size), int(repeats)
    same = model_a is model_b
    names_b = dict(model_b.named_modules())
    if layers is None:
        chosen_b = set(select_layers(model_b))
        candidates = select_layers(model_a)
        common = [n for n in candidates if n in chosen_b]
        skipped = [n for n in candidates if n not in chosen_b]
    else:
        names_a = dict(model_a.named_modules())
        candidates = list(dict.fromkeys(layers))
        common = [n for n in candidates if n and n in names_a and n in names_b]
        skipped = [n for n in candidates if n not in common]
    if not common:
        raise ValueError(f"no layer to compare: none of {len(candidates)} selected layer(s) is a module of both models")

    dev_a, dtype_a = _placement(model_a)
    dev_b, dtype_b = _placement(model_b)
    modes = [(m, m.training) for m in model_a.modules()]
    if not same:
        modes += [(m, m.training) for m in model_b.modules()]
    roots = [(model_a, model_a.training)] + ([] if same else [(model_b, model_b.training)])
    entries: list[str] | None = None
    dropped: list[str] = []
    values: list[list[float]] = []
    generator = torch.Generator().manual_seed(int(seed))
    n_images = images.shape[0]
    used_per_repeat = 0
    try:
        model_a.eval()
        model_b.eval()
        with torch.no_grad(), LayerCapture(model_a, common, gram_linear) as cap_a, \
                (LayerCapture(model_b, common, gram_linear) if not same else _Null()) as cap_b:
            for _ in range(repeats):
                order = torch.randperm(n_images, generator=generator)
                accs: dict[str, MinibatchCKA] = {}
                used = 0
                for chunk in order.split(batch_size):
                    n = chunk.numel()
                    if n <= 3:
                        continue
                    batch = images[chunk.to(images.device)].to(dev_a)
                    x = transform(batch)
                    if not isinstance(x, Tensor) or not x.is_floating_point():
                        raise TypeError("transform must return a floating-point tensor")
                    grams_a = cap_a.run(x.to(dev_a, dtype_a))
                    grams_b = grams_a if same else cap_b.run(x.to(dev_b, dtype_b))
                    if entries is None:
                        entries = []
                        for e in grams_a:
                            ok = e in grams_b and grams_a[e].shape == (n, n) and grams_b[e].shape == (n, n)
                            (entries if ok else dropped).append(e)
                        dropped += [e for e in grams_b if e not in grams_a]
                        if not entries:
                            raise ValueError(
                                "none of the selected layers produced a (batch, ...) tensor in both models"
                            )
                    for e in entries:
                        if e not in grams_a or e not in grams_b:
                            raise RuntimeError(f"layer {e!r} produced no output for one minibatch: the forward "
                                               "takes different paths for different inputs")
                        accs.setdefault(e, MinibatchCKA()).update_grams(grams_a[e], grams_b[e].to(grams_a[e].device))
                    used += n
                used_per_repeat = used
                values.append([accs[e].result() for e in entries])
    finally:
        for root, mode in roots:
            root.train(mode)
        for module, mode in modes:
            module.training = mode
    assert entries is not None
    if dropped:
        warnings.warn(f"CKA: left out {len(dropped)} capture(s) without a matching (batch, ...) output in both "
                      f"models: {dropped[:8]}{' ...' if len(dropped) > 8 else ''}", stacklevel=2)
    arr = np.asarray(values, dtype=np.float64)
    std = arr.std(axis=0, ddof=1) if repeats > 1 else np.zeros(arr.shape[1])
    types = layer_types(model_a, entries)
    return CKAResult(
        layers=list(entries),
        types=[types[e] for e in entries],
        mean=arr.mean(axis=0).tolist(),
        std=std.tolist(),
        values=arr.tolist(),
        meta={
            "estimator": "linear CKA, unbiased HSIC (Song et al. 2012), minibatch (Nguyen et al. 2020)",
            "num_images": int(n_images),
            "images_per_repeat": int(used_per_repeat),
            "batch_size": batch_size,
            "repeats": repeats,
            "seed": int(seed),
            "skipped_layers": skipped + [e for e in dropped if base_name(e) not in skipped],
        },
    )


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def stability_plasticity(
    prev: nn.Module | None,
    current: nn.Module,
    joint: nn.Module | None,
    old_images: Tensor | None,
    new_images: Tensor | None,
    transform: Callable[[Tensor], Tensor],
    layers: Sequence[str] | None = None,
    batch_size: int = 128,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, CKAResult]:
    """The two curves of the Branch-tuning analysis, for the model after task ``t``:

    - ``"stability"``: ``compare_models(prev, current, old_images)``, prev = the model after
      task ``t-1``, old images = test images of tasks ``0..t-1``;
    - ``"plasticity"``: ``compare_models(current, joint, new_images)``, joint = a model trained
      jointly on tasks ``0..t``, new images = test images of task ``t``.

    Pass ``prev=None`` (or ``joint=None``) to leave a curve out. The other arguments are those
    of :func:`compare_models`.
    """
    out: dict[str, CKAResult] = {}
    kwargs = dict(layers=layers, batch_size=batch_size, repeats=repeats, seed=seed)
    if prev is not None:
        if old_images is None:
            raise ValueError("the stability curve needs old_images")
        out["stability"] = compare_models(prev, current, old_images, transform, **kwargs)
        out["stability"].meta["pair"] = "model after task t-1 vs after task t, on old-task images"
    if joint is not None:
        if new_images is None:
            raise ValueError("the plasticity curve needs new_images")
        out["plasticity"] = compare_models(current, joint, new_images, transform, **kwargs)
        out["plasticity"].meta["pair"] = "model after task t vs jointly trained on tasks 0..t, on new-task images"
    if not out:
        raise ValueError("give prev (stability), joint (plasticity) or both")
    return out


# ----------------------------------------------------------------------------------------------
# plot

_TYPE_STYLE = {
    "conv": ("tab:blue", "o"),
    "bn": ("tab:orange", "s"),
    "act": ("tab:green", "^"),
    "block": ("tab:red", "D"),
    "other": ("tab:gray", "x"),
}
_CURVE_STYLE = [("black", "-"), ("tab:purple", "--"), ("tab:brown", ":"), ("tab:olive", "-."), ("tab:cyan", "-")]


def _merged_order(results: Mapping[str, CKAResult]) -> list[str]:
    """All layers of all curves, each curve's order kept (a layer new to the list goes right
    after the curve's previous layer)."""
    order: list[str] = []
    for result in results.values():
        last = -1
        for name in result.layers:
            if name in order:
                last = order.index(name)
            else:
                order.insert(last + 1, name)
                last += 1
    return order


def plot_cka(results: Mapping[str, CKAResult], path: str | Path, title: str | None = None) -> Path:
    """Plot named CKA curves to a PNG at ``path`` (written atomically); returns the path.

    x: layer index (execution order, all curves on one axis); y: mean CKA with a band of +- one
    std; one line style per curve; a marker per layer whose shape and colour give its type
    (legend at the bottom); block outputs are named on the top axis. Layers with an undefined
    CKA (NaN: constant output) leave a gap in the line and a grey cross at the bottom.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not results:
        raise ValueError("plot_cka needs at least one curve")
    order = _merged_order(results)
    index = {name: i for i, name in enumerate(order)}
    kinds: dict[str, str] = {}
    for result in results.values():
        kinds.update(zip(result.layers, result.types))

    fig = Figure(figsize=(max(6.0, min(30.0, 2.0 + 0.14 * len(order))), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curve_handles = []
    any_undefined = False
    for k, (name, result) in enumerate(results.items()):
        colour, style = _CURVE_STYLE[k % len(_CURVE_STYLE)]
        x = np.array([index[n] for n in result.layers], dtype=float)
        mean = np.asarray(result.mean, dtype=float)
        std = np.asarray(result.std, dtype=float)
        ax.plot(x, mean, color=colour, linestyle=style, linewidth=1.2, zorder=2)
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0, zorder=1)
        for kind, (tcolour, marker) in _TYPE_STYLE.items():
            sel = np.array([t == kind for t in result.types], dtype=bool)
            if sel.any():
                ax.scatter(x[sel], mean[sel], color=tcolour, marker=marker, s=22, zorder=3,
                           edgecolors="none" if marker != "x" else None)
        undefined = ~np.isfinite(mean)
        if undefined.any():
            ax.plot(x[undefined], np.full(int(undefined.sum()), 0.03), transform=ax.get_xaxis_transform(),
                    marker="x", color="tab:gray", linestyle="none", markersize=5, zorder=3)
            any_undefined = True
        label = name
        finite = mean[np.isfinite(mean)]
        if finite.size:
            label += f" (mean {finite.mean():.3f})"
        curve_handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
    used_types = [t for t in _TYPE_STYLE if t in kinds.values()]
    type_handles = [Line2D([], [], color=_TYPE_STYLE[t][0], marker=_TYPE_STYLE[t][1], linestyle="none", label=t)
                    for t in used_types]
    if any_undefined:
        type_handles.append(Line2D([], [], color="tab:gray", marker="x", linestyle="none",
                                   label="undefined (constant output)"))
    ax.set_xlabel("layer index (forward order)")
    ax.set_ylabel("linear CKA")
    ax.set_xlim(-0.5, len(order) - 0.5)
    low = min([0.0] + [float(np.nanmin(np.asarray(r.mean, float) - np.asarray(r.std, float)))
                       for r in results.values() if np.isfinite(np.asarray(r.mean, float)).any()])
    ax.set_ylim(min(low - 0.05, 0.0), 1.05)
    ax.grid(True, alpha=0.3)
    blocks = [(index[n], n) for n in order if kinds.get(n) == "block"]
    if blocks and len(blocks) <= 60:
        top = ax.secondary_xaxis("top")
        top.set_xticks([i for i, _ in blocks], labels=[n for _, n in blocks], rotation=90, fontsize=6)
        for i, _ in blocks:
            ax.axvline(i, color=_TYPE_STYLE["block"][0], alpha=0.12, linewidth=0.8, zorder=0)
    if title:
        fig.suptitle(title)
    fig.legend(handles=curve_handles + type_handles, loc="outside lower center",
               ncol=min(len(curve_handles) + len(type_handles), 7), fontsize=8, frameon=False)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# ----------------------------------------------------------------------------------------------
# command line


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``timm-branch cka`` arguments to ``parser`` (see the module docstring)."""
    parser.description = parser.description or "Layer-wise linear CKA between timm models (Branch-tuning analysis)."
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="two models to compare: local-dir:PATH, hf-hub:org/name, a folder (task-K) or a timm name")
    parser.add_argument("--stability", nargs=2, metavar=("PREV", "CUR"),
                        help="stability curve: model after task t-1 vs after task t, on old-task images")
    parser.add_argument("--plasticity", nargs=2, metavar=("CUR", "JOINT"),
                        help="plasticity curve: model after task t vs jointly trained, on new-task images")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="data source spec (digits, cifar100:ROOT, .npz, folder); default digits or the run's")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="split to take images from (train when the source has no test split)")
    parser.add_argument("--classes", nargs="+", type=int, metavar="C", help="one-curve mode: only these classes")
    parser.add_argument("--old-classes", nargs="+", type=int, metavar="C", help="stability images: these classes")
    parser.add_argument("--new-classes", nargs="+", type=int, metavar="C", help="plasticity images: these classes")
    parser.add_argument("--run", type=Path, metavar="RUN_DIR",
                        help="take data, image size and task split from a timm-branch train run")
    parser.add_argument("--task", type=int, metavar="K", help="with --run: old = tasks 0..K-1, new = task K")
    parser.add_argument("--num-images", type=int, metavar="N", help="random subset of N images per set (seeded)")
    parser.add_argument("--layers", nargs="+", metavar="REGEX", help="module-name patterns (re.fullmatch)")
    parser.add_argument("--types", nargs="+", choices=LAYER_TYPES, default=list(LAYER_TYPES),
                        help="layer types to compare (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="shuffled passes over the images (default 10)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per minibatch (default 128)")
    parser.add_argument("--image-size", type=int, default=None, help="evaluation resolution (default: the run's, else 32)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling, subset and random-init seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output", type=Path, metavar="DIR", help="write DIR/cka.json and DIR/cka.png")
    parser.add_argument("--title", default=None, help="plot title")
    return parser


def _fail(message: str):
    raise SystemExit(f"timm-branch cka: {message}")


def _load_model(spec: str, seed: int, device: torch.device) -> nn.Module:
    import timm

    if spec.startswith(("local-dir:", "hf-hub:")):
        model = timm.create_model(spec, pretrained=True, num_classes=0)
    elif Path(spec).is_dir():
        model = timm.create_model(f"local-dir:{Path(spec)}", pretrained=True, num_classes=0)
    else:
        if not timm.is_model(spec):
            _fail(f"{spec!r} is neither local-dir:PATH, hf-hub:NAME, an existing folder nor a timm architecture")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(spec, pretrained=False, num_classes=0)
    return model.to(device).eval()


def _split_of(source, which: str):
    split = source.test if which == "test" and source.test is not None else source.train
    return split


def _source(spec: str, size: int):
    """:func:`~timm_branch.data.load_source`, a folder listed, not decoded (see :func:`_decoded`)."""
    from ..data import is_folder_spec, load_source

    return load_source(spec, size, stream=is_folder_spec(spec))


def _decoded(images: Tensor | ImageFiles) -> Tensor:
    """The uint8 pixels of the images chosen: a tensor as it is, a folder's files decoded."""
    return images if isinstance(images, Tensor) else images.decode()


def _subset(images: Tensor | ImageFiles, num: int | None, seed: int) -> Tensor | ImageFiles:
    if num is None or num >= images.shape[0]:
        return images
    if num < 4:
        _fail(f"--num-images must be at least 4, got {num}")
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:num]
    return images[keep.sort().values]


def _by_classes(split, classes: Sequence[int] | None, what: str) -> Tensor | ImageFiles:
    if classes is None:
        return split.images
    if split.labels is None:
        _fail(f"{what}: the data is unlabeled, classes cannot be chosen")
    mask = torch.isin(split.labels, torch.as_tensor(list(classes), dtype=torch.int64))
    if int(mask.sum()) == 0:
        _fail(f"{what}: no image of classes {list(classes)}")
    return split.images[mask]


def _images_from_run(args) -> tuple[Tensor | ImageFiles | None, Tensor | ImageFiles, int, list[str]]:
    """(old images, new images, image size, data specs) of task ``args.task`` of the run ``args.run``."""
    from ..data import build_scenario
    from ..train.config import TrainConfig

    config_path = args.run / "config.yaml"
    if not config_path.is_file():
        _fail(f"{config_path} not found: --run needs a folder made by timm-branch train")
    if args.task is None:
        _fail("--run needs --task K")
    config = TrainConfig.from_yaml(config_path)
    size = args.image_size or config.image_size
    specs = [args.data] if args.data else list(config.data)
    sources = [_source(spec, size) for spec in specs]
    scenario = build_scenario(config.scenario, sources if config.scenario == "domain" else sources[0],
                              None if config.scenario == "domain" else config.num_tasks, config.split_seed)
    if not 0 <= args.task < len(scenario):
        _fail(f"--task {args.task} is not a task of this run (0..{len(scenario) - 1})")
    use_test = args.split == "test" and scenario.source.test is not None
    split = scenario.source.test if use_test else scenario.source.train

    def indices(task) -> Tensor:
        return task.test if use_test else task.train

    new = split.images[indices(scenario.tasks[args.task])]
    old = None
    if args.task > 0:
        old = split.images[torch.cat([indices(t) for t in scenario.tasks[: args.task]]).sort().values]
    return old, new, size, specs


def _print_summary(results: Mapping[str, CKAResult]) -> None:
    kinds = [t for t in (*LAYER_TYPES, "other") if any(t in r.types for r in results.values())]
    print("| curve | layers | " + " | ".join(kinds) + " | all |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for name, r in results.items():
        by_type = r.by_type()
        finite = [m for m in r.mean if math.isfinite(m)]
        cells = [f"{by_type[k]:.3f}" if k in by_type else "-" for k in kinds]
        overall = f"{np.mean(finite):.3f}" if finite else "-"
        print(f"| {name} | {len(r.layers)} | " + " | ".join(cells) + f" | {overall} |")


def run_command(args: argparse.Namespace) -> int:
    """Run ``timm-branch cka`` with parsed ``args``; returns the exit status (0)."""
    from ..data import EvalTransform

    pair_mode = bool(args.models)
    curve_mode = args.stability is not None or args.plasticity is not None
    if pair_mode == curve_mode:
        _fail("give either two MODELs, or --stability PREV CUR and/or --plasticity CUR JOINT")
    if pair_mode and len(args.models) != 2:
        _fail(f"compare exactly two models, got {len(args.models)}")
    if args.run is not None and pair_mode:
        _fail("--run/--task choose old and new task images: use them with --stability/--plasticity")
    if args.task is not None and args.run is None:
        _fail("--task needs --run RUN_DIR")
    if args.repeats < 1 or args.batch_size < 4:
        _fail("--repeats must be >= 1 and --batch-size >= 4")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    # images
    if args.run is not None:
        old, new, size, data = _images_from_run(args)
        if args.stability is not None and old is None:
            _fail("--task 0 has no old tasks: the stability curve needs --task >= 1")
    else:
        size = args.image_size or 32
        data = [args.data or "digits"]
        source = _source(data[0], size)
        split = _split_of(source, args.split)
        if pair_mode:
            images = _by_classes(split, args.classes, "--classes")
        else:
            old = new = None
            if args.stability is not None:
                if args.old_classes is None:
                    _fail("--stability needs the old-task images: --old-classes C ... or --run RUN_DIR --task K")
                old = _by_classes(split, args.old_classes, "--old-classes")
            if args.plasticity is not None:
                if args.new_classes is None:
                    _fail("--plasticity needs the new-task images: --new-classes C ... or --run RUN_DIR --task K")
                new = _by_classes(split, args.new_classes, "--new-classes")
    transform = EvalTransform(size).to(device)

    # models, each spec loaded once
    cache: dict[str, nn.Module] = {}

    def model(spec: str) -> nn.Module:
        if spec not in cache:
            cache[spec] = _load_model(spec, args.seed, device)
        return cache[spec]

    kwargs = dict(batch_size=args.batch_size, repeats=args.repeats, seed=args.seed)

    def layers_for(a: nn.Module, b: nn.Module) -> list[str] | None:
        if args.layers is None and list(args.types) == list(LAYER_TYPES):
            return None
        in_b = set(select_layers(b, args.layers, args.types))
        return [n for n in select_layers(a, args.layers, args.types) if n in in_b]

    results: dict[str, CKAResult] = {}
    try:
        if pair_mode:
            a, b = (model(s) for s in args.models)
            images = _decoded(_subset(images, args.num_images, args.seed))
            results["cka"] = compare_models(a, b, images, transform, layers=layers_for(a, b), **kwargs)
            results["cka"].meta.update(model_a=args.models[0], model_b=args.models[1])
        else:
            curves = (("stability", args.stability, old, "old-task"), ("plasticity", args.plasticity, new, "new-task"))
            for key, specs, pool, images_name in curves:
                if specs is None:
                    continue
                a, b = (model(spec) for spec in specs)
                imgs = _decoded(_subset(pool, args.num_images, args.seed))
                results[key] = compare_models(a, b, imgs, transform, layers=layers_for(a, b), **kwargs)
                results[key].meta.update(model_a=specs[0], model_b=specs[1], images=images_name)
    except ValueError as err:
        _fail(str(err))

    _print_summary(results)
    if args.output is not None:
        meta = {"data": data, "run": None if args.run is None else str(args.run), "task": args.task,
                "split": args.split, "image_size": size}
        json_path = save_results(results, Path(args.output) / "cka.json", meta)
        png_path = plot_cka(results, Path(args.output) / "cka.png", title=args.title)
        print(f"wrote {json_path} and {png_path}")
    return 0
