"""save_pretrained: a merged model as ``model.safetensors`` + timm ``config.json`` + model card;
load_exported / create_pretrained: such a folder read back, every file checked.

Plain timm loads the folder with ``timm.create_model("local-dir:DIR", pretrained=True)``, or
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

import timm
import torch
from torch import nn

from ._io import (CorruptFileError, atomic_write_text, fsync_path, read_json, read_safetensors, sha256_file,
                  staging_folder, write_safetensors)
from ._offline import explain_missing_weights
from ._version import __version__
from .branch import iter_branches
from .card import render_model_card
from .history import branch_history

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
TASK_INFO = "task.json"
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
        directory: created if missing; other files in it are kept.
        model_card: the ``README.md`` text; by default a card with the branch history.
        model_args: extra ``timm.create_model`` keyword arguments to record in ``config.json``,
            for arguments timm does not record itself.

    The new folder is assembled in a temporary folder beside ``directory``, flushed to disk, then
    swapped in by one rename, so a crash never leaves a partial file, nor one model's weights
    beside another's ``config.json``; a failed write raises
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
    directory.parent.mkdir(parents=True, exist_ok=True)
    history = branch_history(model)
    # The new folder is staged beside the old one (its other files linked in), then swapped in by
    # one rename: the folder holds either the old model or the new one, never a mix.
    with staging_folder(directory) as tmp:
        if directory.is_dir():
            shutil.copytree(directory, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                            ignore=lambda folder, names: (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME) if Path(folder) == directory else ())
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        extra = {"timm_branch": {"version": __version__, "history": history}}
        save_config_for_hf(model, tmp / CONFIG_NAME, model_config=extra, model_args=model_args)
        fsync_path(tmp / CONFIG_NAME)
        atomic_write_text(tmp / CARD_NAME, model_card if model_card is not None else render_model_card(model, history))
        fsync_path(tmp)
        _swap(tmp, directory)
    fsync_path(directory.parent)
    return directory


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no bytes copied), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap(staged: Path, directory: Path) -> None:
    """Put the folder ``staged`` in ``directory``'s place in one rename; an old, non-empty
    ``directory`` ends up at ``staged`` (Linux's ``renameat2(RENAME_EXCHANGE)``). Where the
    system cannot exchange, the old folder is renamed aside first, and renamed back if the
    second rename fails."""
    try:
        os.rename(staged, directory)  # no folder there yet, or an empty one: one plain rename
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(staged), at_fdcwd, os.fsencode(directory), rename_exchange) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: the file system cannot exchange
            raise OSError(code, os.strerror(code), str(directory))
    aside = staged.with_name(staged.name + ".old")
    os.rename(directory, aside)
    try:
        os.rename(staged, directory)
    except OSError:
        os.rename(aside, directory)
        raise
    os.rename(aside, staged)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an Inf."""
    return [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of an exported folder, checked to be timm's (it names an architecture)."""
    path = Path(directory) / CONFIG_NAME
    config = read_json(path)
    if not isinstance(config.get("architecture"), str):
        raise CorruptFileError(f"{path} names no 'architecture': it is not a timm config.json")
    if not timm.is_model(config["architecture"]):
        raise CorruptFileError(f"{path} names the architecture {config['architecture']!r}, which timm does not know: "
                               "the file was changed, or comes from a newer timm")
    for key in ("model_args", "pretrained_cfg"):
        if not isinstance(config.get(key, {}), dict):
            raise CorruptFileError(f"{path}: {key!r} is a JSON {type(config[key]).__name__}, not an object")
    return config


def create_architecture(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``; for a ``local-dir:`` folder, the
    architecture its ``config.json`` describes (``architecture`` and ``model_args``), built from
    a checked config so that a damaged one is named (:class:`~timm_branch._io.CorruptFileError`).
    Build it under ``torch.device("meta")`` to get the shapes without memory."""
    if not name.startswith(LOCAL_DIR):
        with explain_missing_weights(name):  # an hf-hub: name fetches its config.json
            return timm.create_model(name, pretrained=False, **kwargs)
    folder = Path(name[len(LOCAL_DIR):])
    config = read_config(folder)
    args = {**config.get("model_args", {}), **kwargs}
    if "num_classes" in config:
        args.setdefault("num_classes", config["num_classes"])
    try:
        return timm.create_model(config["architecture"], pretrained=False, **args)
    except (TypeError, ValueError) as err:  # unknown or mistyped keyword arguments
        raise CorruptFileError(f"{folder / CONFIG_NAME}: its model_args do not build {config['architecture']!r} "
                               f"({type(err).__name__}: {err}): the file was changed or damaged") from err


def verify_export(directory: str | os.PathLike) -> None:
    """Check an exported folder before it is published: its files match the SHA-256 digests that a
    ``task.json`` beside them recorded, ``model.safetensors`` parses, its tensors have the names
    and shapes of the architecture ``config.json`` describes, and every value is finite.

    Raises:
        FileNotFoundError: a file is missing.
        CorruptFileError: a file is damaged, truncated or changed.
        ValueError: the weights do not fit the architecture, or hold NaN or Inf.
    """
    directory = Path(directory)
    record = directory / TASK_INFO
    if record.is_file():
        files = read_json(record).get("files", {})
        check_digests(directory, files, record, "it was damaged or changed after training; export it again")
    with torch.device("meta"):
        state = create_architecture(f"{LOCAL_DIR}{directory}").state_dict()
    tensors = read_safetensors(directory / WEIGHTS_NAME)
    _check_fits(tensors, state, directory / WEIGHTS_NAME)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"{directory / WEIGHTS_NAME}: {len(bad)} tensors hold NaN or Inf ({', '.join(bad[:5])}); "
                         "this model diverged and is not published")


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
    first, so that a missing, damaged or mismatched file is named in the error; weights that are
    neither in the Hugging Face cache nor fetchable are one line (:mod:`timm_branch._offline`)."""
    if not name.startswith(LOCAL_DIR):
        with explain_missing_weights(name):
            return timm.create_model(name, pretrained=True, **kwargs)
    folder = Path(name[len(LOCAL_DIR):])
    architecture = read_config(folder)["architecture"]
    with torch.device("meta"):
        create_architecture(name, **kwargs)  # a config.json that does not build is named here, not in timm
    tensors = read_safetensors(folder / WEIGHTS_NAME)  # parses the whole file: truncation and damage show here
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"{folder / WEIGHTS_NAME}: {len(bad)} tensors hold NaN or Inf ({', '.join(bad[:5])}); "
                         "start from a model whose training did not diverge")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as err:  # timm's load_state_dict: names or shapes that do not fit
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not fit the architecture {architecture!r} that {folder / CONFIG_NAME} "
            f"names ({str(err).splitlines()[0]}): the two files come from different models"
        ) from err

def check_digests(folder: Path, files: dict[str, str], record: Path, advice: str) -> None:
    """Check that every file ``files`` lists (name -> SHA-256, as recorded in ``record``) is in
    ``folder`` with that digest; the errors name the file and end with ``advice``.

    Raises:
        FileNotFoundError: a listed file is missing.
        CorruptFileError: a file's digest differs.
    """
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing, but {record} lists it; {advice}")
        if sha256_file(path) != digest:
            raise CorruptFileError(
                f"{path} is not the file that was written (its SHA-256 differs from the one in {record}): "
                f"it is damaged or was changed; {advice}"
            )
