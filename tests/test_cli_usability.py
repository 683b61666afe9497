"""The command line as a newcomer meets it: no abbreviated flags, defaults in --help, the Hub token
checked before any training."""
from __future__ import annotations

import pytest

from timm_branch import cli


@pytest.mark.parametrize("argv", [["train", "--epoch", "2"], ["push", "task-0", "--repo-id", "org/name", "--priv"],
                                  ["report", "runs/a", "--out", "x"]])
def test_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as err:
        cli.build_parser().parse_args(argv)
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: resnet18)", "(default: digits)", "(default: 5)", "(default: simclr)", "(default: fp32)"):
        assert shown in text
    # Shown only: an absent flag stays absent, so --config and --resume can tell what was given.
    assert not hasattr(cli.build_parser().parse_args(["train"]), "epochs")
