"""``timm-branch push RUN_DIR/task-K --repo-id org/name``: push a finished task folder to the Hub."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_parser", "run_command"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``timm-branch push`` arguments to ``parser``."""
    parser.add_argument("task_dir", type=Path, help="a task folder written by timm-branch train (RUN/task-K)")
    parser.add_argument("--repo-id", required=True, help="org/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--commit-message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--license", help="licence for the card when the base model names none")


def run_command(args: argparse.Namespace) -> int:
    """Push ``args.task_dir`` to ``args.repo_id``, print where it went; returns the exit status (0)."""
    from ..hub import push_task_folder

    url = push_task_folder(
        args.task_dir, args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr, license=args.license,
    )
    print(f"pushed {args.task_dir} to {url}")
    print(f'timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')
    return 0
