"""The ``timm-branch`` command line.

- ``timm-branch train`` runs a continual SSL job;
- ``timm-branch report RUN_DIR [RUN_DIR ...]`` compares runs (plots + a Markdown table);
- ``timm-branch cka A B --data digits`` compares two models layer by layer (CKA);
- ``timm-branch push RUN_DIR/task-K --repo-id org/name`` pushes a finished task to the Hub.

Every :class:`~timm_branch.train.config.TrainConfig` field is a flag (``--batch-size 128``);
``--config FILE.yaml`` reads a YAML file first, and flags given on the command line win.
``--resume RUN_DIR`` continues an interrupted run with the configuration saved in it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

from .train.config import TrainConfig

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


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": _HELP.get(field.name)}
        if hint in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif hint == list[str]:
            parser.add_argument(flag, nargs="+", metavar="SOURCE", **kwargs)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            parser.add_argument(flag, type=base, metavar=field.name.upper(), **kwargs)


class _ConfigDefaultsFormatter(argparse.HelpFormatter):
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


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --epoch must not silently mean --epochs.
    parser = argparse.ArgumentParser(prog="timm-branch", description="Continual self-supervised learning of timm CNNs with Branch-tuning.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run continual SSL over a task sequence", description=TrainConfig.__doc__,
                                allow_abbrev=False, formatter_class=_ConfigDefaultsFormatter)
    train.add_argument("--config", type=Path, help="YAML file of configuration keys (flags override it)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_config_flags(train)
    from .evaluate import cka, report

    report.configure_parser(commands.add_parser(
        "report", allow_abbrev=False, help="compare run folders: accuracy plots and a Markdown table of the final figures",
        description=report.__doc__.splitlines()[0]))
    cka.configure_parser(commands.add_parser(
        "cka", allow_abbrev=False, help="layer-wise CKA between models: stability and plasticity curves",
        description=cka.__doc__.splitlines()[0]))
    push = commands.add_parser("push", allow_abbrev=False, help="push a finished task folder (RUN/task-K) to the Hugging Face Hub")
    push.add_argument("task_dir", type=Path, help="a task folder written by timm-branch train (RUN/task-K)")
    push.add_argument("--repo-id", required=True, help="org/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--commit-message")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--license", help="licence for the card when the base model names none")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .train import distributed
    from .train.continual import ContinualRun

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume is not None:
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise SystemExit(f"timm-branch: {saved} not found: --resume needs a run folder made by timm-branch train")
        if overrides:
            raise SystemExit(f"timm-branch: --resume continues with the saved configuration; drop {', '.join(sorted(overrides))}")
        # The run lives where the user names it now: a moved or copied folder trains in place,
        # whatever output path (perhaps relative to another directory) its config.yaml recorded.
        config = dataclasses.replace(TrainConfig.from_yaml(saved), output=str(args.resume))
    else:
        values = TrainConfig.from_yaml(args.config).to_dict() if args.config else {}
        config = TrainConfig.from_dict({**values, **overrides})
    # Checked before the first log line, which reads the fields: a bad value stops with its one message.
    config = config.validate()
    # Under torchrun: one process per rank, joined here; otherwise a no-op.
    with distributed.process_group(distributed.resolve_device(config.device)):
        main_rank = distributed.is_main_process()
        if not main_rank:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs for all
        # Loading the data and the model takes a while: say first what is about to run.
        logging.getLogger("timm_branch.train").info("%s", _run_line(config.with_preset(), distributed.resolve_device(config.device)))
        run = ContinualRun(config, progress=not args.no_progress)
        final = run.run(resume=args.resume is not None)
    if main_rank:
        print(f"final model: {final}")
        print(f'timm.create_model("local-dir:{final}", pretrained=True)')
    return 0


def _run_line(config: TrainConfig, device) -> str:
    """One line saying what ``timm-branch train`` is about to run, printed before anything loads."""
    tasks = len(config.data) if config.scenario == "domain" else config.num_tasks
    start = f"from {config.pretrained}" if config.pretrained else f"{config.model} from random init"
    branch = f" ({config.shape} branches, bn={config.bn})" if config.strategy in ("branch", "cassle+branch") else ""
    return (f"training {start} on {', '.join(config.data)}: {tasks} {config.scenario}-incremental tasks x {config.epochs} "
            f"epochs, strategy {config.strategy}{branch}, {config.method}, {device}, -> {config.output}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "report":
            from .evaluate import report

            return report.run_command(args)
        if args.command == "cka":
            from .evaluate import cka

            return cka.run_command(args)
        if args.command == "push":
            from .hub import push_task_folder

            url = push_task_folder(
                args.task_dir, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, create_pr=args.create_pr, license=args.license,
            )
            print(f"pushed {args.task_dir} to {url}")
            print(f'timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')
            return 0
    except (ValueError, OSError, RuntimeError) as err:  # OSError: a missing file, a full disk
        print(f"timm-branch: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
