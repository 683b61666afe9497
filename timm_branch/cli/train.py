"""``timm-branch train``: run continual SSL over a task sequence.

Every :class:`~timm_branch.train.config.TrainConfig` field is a flag (``--batch-size 128``,
:mod:`timm_branch.cli._config_flags`); ``--config FILE.yaml`` reads a YAML file first, and flags
given on the command line win. ``--resume RUN_DIR`` continues an interrupted run with the
configuration saved in it. Under ``torchrun`` every rank runs this command; rank 0 prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..train.config import TrainConfig
from ._config_flags import add_config_flags, given_fields

__all__ = ["configure_parser", "run_command"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``timm-branch train`` arguments to ``parser``."""
    parser.add_argument("--config", type=Path, help="YAML file of configuration keys (flags override it)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_flags(parser)


def run_command(args: argparse.Namespace) -> int:
    """Run ``timm-branch train`` with parsed ``args``; returns the exit status (0)."""
    from ..train import distributed
    from ..train.continual import ContinualRun

    overrides = given_fields(args)
    if args.resume is not None:
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: --resume needs a run folder made by timm-branch train")
        if overrides:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(overrides))
            raise ValueError(f"--resume continues with the saved configuration; drop {flags}")
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
