"""save_pretrained: a merged model as ``model.safetensors`` + timm ``config.json`` + model card;
load_exported / create_pretrained: such a folder read back, every file checked.

Plain timm loads the folder with ``timm.create_model("local-dir:DIR", pretrained=True)``, or
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))``.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from ._io import CorruptFileError, atomic_write_text, fsync_path, read_json, read_safetensors, staging_folder, write_safetensors
from ._version import __version__
from .branch import iter_branches
from .card import render_model_card
from .history import branch_history

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
LOCAL_DIR = "local-dir:"


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    model_card: str | None = None,
    model_args: dict | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into ``directory``.

    Args:
        model: a merged timm model (created by ``timm.create_model``), on any device and dtype.
        directory: created if missing; other files in it are left alone.
        model_card: the ``README.md`` text; by default a card with the branch history.
        model_args: extra ``timm.create_model`` keyword arguments to record in ``config.json``,
            for arguments timm does not record itself.

    Each file is written to a temporary folder inside ``directory``, flushed to disk, then renamed
    into place, so a crash never leaves a partial file under a final name; a failed write raises
    :class:`~timm_branch._io.WriteError` (an ``OSError``) and leaves the folder as it was. Weights
    holding NaN or Inf are refused (``ValueError``). ``config.json`` is
    timm's own (``timm.models.save_for_hf`` layout) with one extra top-level key,
    ``timm_branch``: the package version and the branch history.

    Returns:
        ``directory`` as a ``Path``.
    """
    if next(iter_branches(model), None) is not None:
        raise ValueError("the model still has branches; call merge_branches(model) before save_pretrained")
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        raise TypeError(
            f"save_pretrained needs a timm model (from timm.create_model), got {type(model).__name__} "
            "without a pretrained_cfg"
        )
    # timm keeps this helper in a private module; it writes exactly the config its loaders read.
    from timm.models._hub import save_config_for_hf

    directory = Path(directory)
    # Fresh contiguous CPU copies: safetensors refuses strided or storage-sharing tensors.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(
            f"refusing to export a model whose weights hold NaN or Inf ({len(bad)} tensors: {', '.join(bad[:5])}); "
            "training diverged: export the last good checkpoint instead"
        )
    directory.mkdir(parents=True, exist_ok=True)
    history = branch_history(model)
    # Stage all three files first, then move them in: a failure before the moves changes nothing.
    with staging_folder(directory, parent=directory) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        extra = {"timm_branch": {"version": __version__, "history": history}}
        save_config_for_hf(model, tmp / CONFIG_NAME, model_config=extra, model_args=model_args)
        fsync_path(tmp / CONFIG_NAME)
        atomic_write_text(tmp / CARD_NAME, model_card if model_card is not None else render_model_card(model, history))
        for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            os.replace(tmp / name, directory / name)
        fsync_path(directory)
    return directory


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an Inf."""
    return [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of an exported folder, checked to be timm's (it names an architecture)."""
    path = Path(directory) / CONFIG_NAME
    config = read_json(path)
    if not isinstance(config.get("architecture"), str):
        raise CorruptFileError(f"{path} names no 'architecture': it is not a timm config.json")
    return config


def load_exported(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the weights of the folder ``directory`` (written by :func:`save_pretrained`) into
    ``model``, a timm model of the same architecture; returns ``model``.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        CorruptFileError: a file is truncated or damaged.
        ValueError: the folder holds another architecture, or weights whose names or shapes do not
            fit ``model``; ``model`` is unchanged then.
    """
    directory = Path(directory)
    found = read_config(directory)["architecture"]
    expected = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if found != expected:
        raise ValueError(
            f"{directory / CONFIG_NAME} is for the architecture {found!r}, but the model is {expected!r}: "
            "the folder holds another model"
        )
    tensors = read_safetensors(directory / WEIGHTS_NAME)
    _check_fits(tensors, model.state_dict(), directory / WEIGHTS_NAME)
    model.load_state_dict(tensors, strict=True)
    return model


def _check_fits(tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if ``tensors`` differ from ``state`` in names or shapes."""
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(state[k].shape)}"
             for k in state if k in tensors and tensors[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the model: missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} "
            f"{unexpected[:3]}, {len(wrong)} shapes differ {wrong[:3]}; it was written for another model"
        )


def create_pretrained(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, with a ``local-dir:`` folder checked
    first, so that a missing, damaged or mismatched file is named in the error."""
    if not name.startswith(LOCAL_DIR):
        return timm.create_model(name, pretrained=True, **kwargs)
    folder = Path(name[len(LOCAL_DIR):])
    architecture = read_config(folder)["architecture"]
    read_safetensors(folder / WEIGHTS_NAME)  # parses the whole file: truncation and damage show here
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as err:  # timm's load_state_dict: names or shapes that do not fit
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not fit the architecture {architecture!r} that {folder / CONFIG_NAME} "
            f"names ({str(err).splitlines()[0]}): the two files come from different models"
        ) from err
