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


def test_push_without_a_token_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # neither HF_TOKEN nor a login cache
    run = tmp_path / "run"
    code = cli.main(["train", "--model", "test_resnet", "--image-size", "16", "--num-tasks", "2", "--epochs", "1",
                     "--push-to-hub", "org/name", "--output", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no Hugging Face token: set HF_TOKEN or log in with `hf auth login`" in err
    assert not run.exists()  # nothing trained, nothing written


def test_train_says_what_it_runs_before_anything_loads(tmp_path, monkeypatch, caplog):
    """The first line, before the data and the model load (which takes a while)."""
    class Loaded(Exception):
        pass

    def loading(self, config, progress=True):
        raise Loaded

    monkeypatch.setattr("timm_branch.train.continual.ContinualRun.__init__", loading)
    caplog.set_level("INFO", logger="timm_branch.train")
    with pytest.raises(Loaded):
        cli.main(["train", "--model", "test_resnet", "--num-tasks", "3", "--epochs", "2", "--strategy", "cassle+branch",
                  "--device", "cpu", "--output", str(tmp_path / "run"), "--no-progress"])
    assert [r.getMessage() for r in caplog.records] == [
        f"training test_resnet from random init on digits: 3 class-incremental tasks x 2 epochs, strategy cassle+branch "
        f"(cross branches, bn=frozen), simclr, cpu, -> {tmp_path / 'run'}"]


def test_norms_and_through_take_several_kinds(capsys):
    args = cli.build_parser().parse_args(["train", "--norms", "batch", "layer", "--through", "shape", "act", "conv"])
    assert (args.norms, args.through) == (["batch", "layer"], ["shape", "act", "conv"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: batch)" in text and "(default: shape act)" in text
