"""The flags of ``timm-branch train``: one per :class:`~timm_branch.train.config.TrainConfig` field.

A field ``batch_size`` is the flag ``--batch-size``: booleans take ``--x`` / ``--no-x``, lists
one or more values, the others one value of the field's type. Every flag's argparse default is
SUPPRESS, so an absent flag stays absent and ``--config`` / ``--resume`` can tell which were given.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ..train.config import TrainConfig

__all__ = ["ConfigDefaultsFormatter", "add_config_flags", "given_fields"]

_HELP = {
    "model": "timm architecture (pretrained=False)",
    "pretrained": "start from weights: a timm name, hf-hub:org/name or local-dir:PATH",
    "data": "data sources: digits, cifar100:ROOT, a .npz file or an image folder (several for --scenario domain)",
    "stream": "image folders: decode each batch in DataLoader workers instead of all images up front (folders larger than memory)",
    "workers": "processes decoding image folders (default: 1 when training on the CPU, else the cores shared among this machine's ranks, at most 8 each; 0: in the training process)",
    "scenario": "class | data | domain",
    "num_tasks": "number of tasks (class/data scenarios)",
    "method": "simclr | byol | barlow | moco | vicreg | swav",
    "strategy": "finetune | branch | cassle | cassle+branch | joint",
    "shape": "branch shape: 1x1 | cross | full | cross-pair (default: cross; the paper preset: cross-pair)",
    "bn": "BatchNorm policy under branches: frozen | affine | train (default: frozen; the paper preset: affine)",
    "epochs": "epochs per task",
    "batch_size": "the global batch: under torchrun --nproc_per_node N each process trains on batch_size / N of it",
    "sync_bn": "under torchrun on GPUs, the backbone's BatchNorms normalise with the global batch's statistics",
    "lr": "learning rate (default: the method's recipe, scaled by batch_size / 256)",
    "weight_decay": "weight decay (default: the method's recipe)",
    "precision": "fp32 | bf16 (autocast)",
    "compile": "torch.compile backend for the backbone in training, e.g. inductor (compiled afresh for every task; default: eager)",
    "optimizer": "lars | sgd | adamw (default: the method's recipe)",
    "output": "run folder (task-K/ models, metrics.json, config.yaml)",
    "push_to_hub": "org/name: push the merged model to the Hugging Face Hub (token from HF_TOKEN or the login cache)",
    "online_probe": "train CaSSLe's online linear probe alongside SSL: each step an all-class labelled batch, eval-mode detached features",
    "linear_probe": "fit the offline linear probe after every task",
    "push_when": "task (after every task) | end (the final model only)",
    "nonfinite": "on a NaN/Inf loss: stop (the task, keeping the last checkpoint) | skip (that step's update, logged)",
    "nonfinite_limit": "with --nonfinite skip: this many non-finite steps in a row stop the task",
    "preset": "library | paper: the defaults of --shape, --bn, --branch-weight-decay, --normalization, --zero-init-last "
              "and --optimizer left unset (paper: the authors' settings, docs/REPRODUCTION.md)",
    "branch_weight_decay": "weight decay of the branch tensors (default: --weight-decay; the paper preset: 0)",
    "branch_lr_scale": "the branch tensors' learning rate as a multiple of --lr (default 1)",
    "normalization": "imagenet | cifar10 | cifar100 | data (CIFAR statistics for cifar10:/cifar100: data); default imagenet",
    "zero_init_last": "timm's zero init of each residual block's last BatchNorm (default: timm's; the paper preset: off)",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~timm_branch.train.config.TrainConfig` field (``--batch-size``), default SUPPRESS."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": _HELP.get(field.name, field.metadata.get("help"))}
        if hint in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif hint == list[str]:
            parser.add_argument(flag, nargs="+", metavar=field.metadata.get("metavar", "SOURCE"), **kwargs)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            parser.add_argument(flag, type=base, metavar=field.name.upper(), **kwargs)


class ConfigDefaultsFormatter(argparse.HelpFormatter):
    """``train --help`` with every configuration flag's ``TrainConfig`` default. The flags' own
    defaults are SUPPRESS, and must stay so: an absent flag stays absent, so that ``--config``
    and ``--resume`` can tell which flags were given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        field = next((f for f in dataclasses.fields(TrainConfig) if f.name == action.dest), None)
        if field is None or "default:" in text:
            return text
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if default is None:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})".lstrip()


def given_fields(args: argparse.Namespace) -> dict:
    """The configuration fields given as flags on the command line, ``{name: value}``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
