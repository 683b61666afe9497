"""The ``timm-branch`` command line: flags in, library calls, messages and exit codes out.

- ``timm-branch train`` runs a continual SSL job;
- ``timm-branch report RUN_DIR [RUN_DIR ...]`` compares runs (plots + a Markdown table);
- ``timm-branch cka A B --data digits`` compares two models layer by layer (CKA);
- ``timm-branch push RUN_DIR/task-K --repo-id org/name`` pushes a finished task to the Hub.

Every :class:`~timm_branch.train.config.TrainConfig` field is a flag (``--batch-size 128``);
``--config FILE.yaml`` reads a YAML file first, and flags given on the command line win.
``--resume RUN_DIR`` continues an interrupted run with the configuration saved in it.

One module per command (:mod:`~timm_branch.cli.train`, :mod:`~timm_branch.cli.report`,
:mod:`~timm_branch.cli.cka`, :mod:`~timm_branch.cli.push`), each with ``configure_parser`` and
``run_command``. The library raises; :func:`main` turns a ``ValueError``, ``OSError`` or
``RuntimeError`` into ``timm-branch: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..train.config import TrainConfig
from . import cka, push, report, train
from ._config_flags import ConfigDefaultsFormatter

__all__ = ["build_parser", "configure_logging", "main"]

_COMMANDS = {"train": train, "report": report, "cka": cka, "push": push}


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-branch`` parser, one subcommand per module of this package."""
    # allow_abbrev=False: --epoch must not silently mean --epochs.
    parser = argparse.ArgumentParser(prog="timm-branch", description="Continual self-supervised learning of timm CNNs with Branch-tuning.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    train.configure_parser(commands.add_parser(
        "train", help="run continual SSL over a task sequence", description=TrainConfig.__doc__,
        allow_abbrev=False, formatter_class=ConfigDefaultsFormatter))
    report.configure_parser(commands.add_parser(
        "report", allow_abbrev=False, help="compare run folders: accuracy plots and a Markdown table of the final figures",
        description=report.__doc__.splitlines()[0]))
    cka.configure_parser(commands.add_parser(
        "cka", allow_abbrev=False, help="layer-wise CKA between models: stability and plasticity curves",
        description=cka.__doc__.splitlines()[0]))
    push.configure_parser(commands.add_parser(
        "push", allow_abbrev=False, help="push a finished task folder (RUN/task-K) to the Hugging Face Hub"))
    return parser


def configure_logging() -> None:
    """INFO and above on stderr, each record once, timed: one handler, on the root logger.

    huggingface_hub gives its own logger a handler too, so each of its records (a retry, a
    warning) would print twice, once through it and once through the root's: that handler goes.
    """
    import huggingface_hub.utils.logging  # noqa: F401 - adds the handler that is removed here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run ``timm-branch`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return _COMMANDS[args.command].run_command(args)
    except (ValueError, OSError, RuntimeError) as err:  # OSError: a missing file, a full disk
        print(f"timm-branch: error: {err}", file=sys.stderr)
        return 2
