"""The layer-wise CKA protocol: compare two timm models layer by layer, and the paper's two curves.

Branch-tuning (arXiv 2403.18266) argues from a layer-wise CKA analysis that BatchNorm layers carry
stability and convs carry plasticity. This module reproduces that analysis for any pair of timm
models with the same module names, with the estimator of :mod:`timm_branch.evaluate.cka`
(minibatch linear CKA, unbiased HSIC). A layer whose output is constant over the images (a dead
ReLU) has an undefined CKA: NaN here, ``null`` in JSON, a gap in the plot
(:mod:`timm_branch.evaluate.cka_plot`).

**Layers.** :func:`~timm_branch.evaluate.hooks.select_layers` picks every conv, BatchNorm,
activation and block output, or names matching regular expressions; outputs are captured with
forward hooks on the models' real forward (:class:`~timm_branch.evaluate.hooks.LayerCapture`),
which compute each Gram matrix inside the hook, so only ``n x n`` matrices are kept. The hooks
module documents three details: timm's ``BatchNormAct2d`` contributes its normalised output
*before* its activation (the activation is its own ``bn.act`` entry); a module called several
times per forward gives one entry per call (``relu``, ``relu@1``); entries are ordered as the
forward produces them.

**Protocol** (:func:`compare_models`). Both models in eval mode under ``torch.no_grad()``; each
of ``repeats`` repeats shuffles the images with a seeded generator, cuts them into minibatches
of at most ``batch_size`` and accumulates the minibatch CKA per layer; the result is the mean
and standard deviation (ddof=1) over repeats. With ``N <= batch_size`` images there is one
minibatch, every repeat gives the same value and the std is 0; the authors' setting (128 test
images, repeated 10 times) is ``batch_size=128, repeats=10`` with 128 images.
:func:`stability_plasticity` computes the paper's two curves:

- stability = CKA(model after task t-1, model after task t) on old-task images;
- plasticity = CKA(model after task t, a model trained jointly on tasks 0..t) on new-task images.

**Results.** A :class:`CKAResult` per curve; :func:`save_results` writes named curves to one
JSON file (``cka.json`` of ``timm-branch cka``), :func:`load_results` reads them back.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write_json
from .cka import MinibatchCKA, gram_linear
from .hooks import LAYER_TYPES, LayerCapture, base_name, layer_types, select_layers

__all__ = ["CKAResult", "compare_models", "load_results", "results_to_dict", "save_results", "stability_plasticity"]


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

