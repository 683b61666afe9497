"""save_pretrained: a merged model as ``model.safetensors`` + timm ``config.json`` + model card.

Plain timm loads the folder with ``timm.create_model("local-dir:DIR", pretrained=True)``, or
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
from torch import nn

from ._io import fsync_path
from ._version import __version__
from .branch import iter_branches
from .card import render_model_card
from .history import branch_history

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


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
    into place, so a crash never leaves a partial file under a final name. ``config.json`` is
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
    directory.mkdir(parents=True, exist_ok=True)
    history = branch_history(model)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=directory))
    try:
        # Fresh contiguous CPU copies: safetensors refuses strided or storage-sharing tensors.
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        extra = {"timm_branch": {"version": __version__, "history": history}}
        save_config_for_hf(model, tmp / CONFIG_NAME, model_config=extra, model_args=model_args)
        (tmp / CARD_NAME).write_text(model_card if model_card is not None else render_model_card(model, history))
        for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            fsync_path(tmp / name)
            os.replace(tmp / name, directory / name)
        fsync_path(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
