"""The CLI's Hub paths: `timm-branch train --push-to-hub` and `timm-branch push`, against the loopback Hub."""
from __future__ import annotations

import subprocess
import sys

from hub_server import client_env, hub_server  # noqa: F401 - fixture

TOKEN = "hf_cliLoopbackToken0123456789"


def _env(url: str, home) -> dict[str, str]:
    return client_env(url, home, HF_TOKEN=TOKEN)


def test_train_pushes_each_task_and_push_command_pushes_a_task_folder(tmp_path, hub_server):  # noqa: F811
    out = tmp_path / "run"
    train = [sys.executable, "-m", "timm_branch", "train", "--model", "test_resnet", "--image-size", "16",
             "--batch-size", "32", "--epochs", "1", "--num-tasks", "2", "--no-linear-probe", "--no-progress",
             "--output", str(out), "--push-to-hub", "org/lineage"]
    result = subprocess.run(train, capture_output=True, text=True, env=_env(hub_server.url, tmp_path / "hf"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr
    files = hub_server.files("org/lineage")
    assert {"model.safetensors", "config.json", "README.md"} <= set(files) and "trainer_state.safetensors" not in files
    assert files["model.safetensors"] == (out / "task-1" / "model.safetensors").read_bytes()
    assert b"| 1 |" in files["README.md"]  # the card's history reached task 1

    # another machine continues the lineage from the Hub
    more = [*train[:train.index("--output")], "--output", str(tmp_path / "more"), "--num-tasks", "1",
            "--pretrained", "hf-hub:org/lineage", "--strategy", "branch"]
    result = subprocess.run(more, capture_output=True, text=True, env=_env(hub_server.url, tmp_path / "hf2"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "more" / "task-0" / "model.safetensors").is_file()

    push = [sys.executable, "-m", "timm_branch", "push", str(out / "task-0"), "--repo-id", "org/first-task"]
    result = subprocess.run(push, capture_output=True, text=True, env=_env(hub_server.url, tmp_path / "hf"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'timm.create_model("hf-hub:org/first-task", pretrained=True)'
    assert hub_server.files("org/first-task")["model.safetensors"] == (out / "task-0" / "model.safetensors").read_bytes()


def test_push_command_reports_an_unauthorised_token(tmp_path, hub_server):  # noqa: F811
    folder = tmp_path / "task-0"
    make = "import timm, timm_branch; timm_branch.save_pretrained(timm.create_model('test_resnet', num_classes=0), %r)" % str(folder)
    subprocess.run([sys.executable, "-c", make], check=True, timeout=300)
    hub_server.fail(401, count=5)
    push = [sys.executable, "-m", "timm_branch", "push", str(folder), "--repo-id", "org/denied"]
    result = subprocess.run(push, capture_output=True, text=True, env=_env(hub_server.url, tmp_path / "hf"), timeout=300)
    assert result.returncode == 2 and "401" in result.stderr and TOKEN not in result.stderr
