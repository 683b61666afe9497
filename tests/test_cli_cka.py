"""``timm-branch cka`` (timm_branch.cli.cka): two models, stability/plasticity curves, a run's tasks, usage errors."""
from __future__ import annotations

import argparse
import json

import pytest
import timm

from _helpers import seeded_test_resnet as _resnet
from timm_branch.cli.cka import configure_parser, run_command
from timm_branch.evaluate.cka_compare import load_results

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def _parse(argv: list[str]) -> argparse.Namespace:
    return configure_parser(argparse.ArgumentParser(prog="timm-branch cka")).parse_args(argv)


FAST = ["--image-size", "16", "--batch-size", "16", "--repeats", "1"]


def test_cli_two_models_on_digits(tmp_path, capsys):
    args = _parse(["test_resnet", "test_resnet", "--data", "digits", "--classes", "0", "1", "2",
                   "--num-images", "32", "--output", str(tmp_path), *FAST])
    assert run_command(args) == 0
    data = json.loads((tmp_path / "cka.json").read_text())
    curve = data["curves"]["cka"]
    assert curve["meta"]["num_images"] == 32 and curve["meta"]["model_a"] == "test_resnet"
    # equal seeded random models: 1 everywhere, except the zero-initialised last BNs of the
    # blocks (constant output: undefined, null)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    modules = dict(model.named_modules())
    for name, mean in zip(curve["layers"], curve["mean"]):
        if mean is None:
            assert not modules[name].weight.any(), name
        else:
            assert mean == pytest.approx(1.0, abs=1e-9), name
    assert (tmp_path / "cka.png").read_bytes().startswith(PNG)
    assert "| cka |" in capsys.readouterr().out


def test_cli_stability_and_plasticity_from_classes(tmp_path):
    from timm.models import save_for_hf

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"task-{seed}"
        save_for_hf(_resnet(seed), folder, safe_serialization=True)
        folders.append(folder)
    args = _parse(["--stability", "test_resnet", f"local-dir:{folders[0]}", "--plasticity", f"local-dir:{folders[0]}",
                   str(folders[1]), "--layers", "act1", "layer\\d\\.0", "--types", "act", "block",
                   "--old-classes", "0", "1", "--new-classes", "2", "--num-images", "16",
                   "--output", str(tmp_path / "out"), *FAST])
    assert run_command(args) == 0
    curves = load_results(tmp_path / "out" / "cka.json")
    assert list(curves) == ["stability", "plasticity"]
    for curve in curves.values():
        assert curve.layers == ["act1", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
        assert all(0.0 < m < 1.0 - 1e-6 for m in curve.mean)  # different models


def test_cli_images_from_a_run(tmp_path):
    from timm_branch.train.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig(data=["digits"], num_tasks=5, image_size=16).to_yaml())
    args = _parse(["--stability", "test_resnet", "test_resnet", "--plasticity", "test_resnet", "test_resnet",
                   "--run", str(run), "--task", "2", "--layers", "layer4.*", "--types", "bn",
                   "--output", str(tmp_path / "out"), "--batch-size", "128", "--repeats", "1"])
    assert run_command(args) == 0
    data = json.loads((tmp_path / "out" / "cka.json").read_text())
    old, new = data["curves"]["stability"]["meta"], data["curves"]["plasticity"]["meta"]
    assert data["meta"]["image_size"] == 16 and data["meta"]["task"] == 2 and data["meta"]["data"] == ["digits"]
    assert 120 < old["num_images"] < 170 and 60 < new["num_images"] < 85  # 4 and 2 of 10 digit classes (359 test images)


def test_cli_decodes_only_the_folder_images_it_compares(tmp_path):
    """A folder is listed, not decoded: a broken file of a class not compared is never read."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    (tmp_path / "imgs" / "2" / "5.png").write_bytes(b"\x89PNG garbage")
    argv = ["test_resnet", "test_resnet", "--data", str(tmp_path / "imgs"), "--num-images", "16",
            "--output", str(tmp_path / "out"), *FAST]
    assert run_command(_parse([*argv, "--classes", "0", "1"])) == 0
    assert json.loads((tmp_path / "out" / "cka.json").read_text())["curves"]["cka"]["meta"]["num_images"] == 16
    with pytest.raises(SystemExit, match=r"cannot read image .*5\.png"):
        run_command(_parse([*argv, "--classes", "2"]))


@pytest.mark.parametrize("argv, message", [
    ([], "either two MODELs"),
    (["test_resnet"], "exactly two"),
    (["a", "b", "--stability", "c", "d"], "either two MODELs"),
    (["--stability", "test_resnet", "test_resnet"], "--old-classes"),
    (["--plasticity", "test_resnet", "test_resnet", "--task", "1"], "--task needs --run"),
    (["not_a_model_name", "test_resnet"], "neither local-dir"),
])
def test_cli_usage_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        run_command(_parse([*argv, "--image-size", "16"]))
