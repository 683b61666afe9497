"""The command line as a newcomer meets it: no abbreviated flags, defaults in --help, the Hub token
checked before any training."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from timm_branch import cli
from timm_branch.train.config import TrainConfig


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


def test_resume_with_other_flags_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig(output=str(run)).to_yaml())
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--batch-size", "8"]) == 2
    assert capsys.readouterr().err == ("timm-branch: error: --resume continues with the saved configuration; "
                                       "drop --batch-size, --epochs\n")
    assert cli.main(["train", "--resume", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err == (f"timm-branch: error: {tmp_path / 'other' / 'config.yaml'} not found: --resume "
                                       "needs a run folder made by timm-branch train\n")


def test_each_log_record_prints_once_huggingface_hubs_too():
    code = ("import logging; from timm_branch.cli import configure_logging; configure_logging(); "
            "from huggingface_hub.utils import logging as hub; hub.get_logger('huggingface_hub.file_download').warning('hub'); "
            "logging.getLogger('timm.models').warning('timm'); logging.getLogger('timm_branch.train').info('ours')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(line.split(" ", 1)[1] for line in result.stderr.splitlines()) == ["hub", "ours", "timm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env, why", [
    ({"HF_HUB_OFFLINE": "1"}, "cannot load the weights of resnet18: HF_HUB_OFFLINE is set and they are not in the Hugging Face cache"),
    ({"HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}, "cannot reach the Hugging Face Hub at http://127.0.0.1:"),
])
def test_pretrained_weights_without_the_hub_fail_at_once_in_one_line(tmp_path, env, why):
    """No minute of retries: the first failed request (or offline mode) is the error, and no line twice."""
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run(
        [sys.executable, "-m", "timm_branch", "train", "--pretrained", "resnet18", "--epochs", "1", "--num-tasks", "2",
         "--image-size", "16", "--output", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("timm-branch: error: ") and why in lines[-1]
    assert "Retrying" not in result.stderr and len(set(lines)) == len(lines)
