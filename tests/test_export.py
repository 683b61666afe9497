"""save_pretrained: files that plain timm loads strictly, in a fresh process, and atomic writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch

import timm_branch as tb

from conftest import make_model, perturb_branches

_LOAD_WITH_PLAIN_TIMM = textwrap.dedent(
    """
    import sys
    import safetensors.torch, timm, torch
    directory, arch, how = sys.argv[1:4]
    if how == "local-dir":
        model = timm.create_model("local-dir:" + directory, pretrained=True)
    else:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=directory + "/model.safetensors"))
    probe = safetensors.torch.load_file(directory + "/../probe.safetensors")
    out = model.eval()(probe["x"])
    assert "timm_branch" not in sys.modules, "the loader must not need timm_branch"
    assert type(model).__module__.startswith("timm."), type(model)
    err = float((out - probe["y"]).abs().max() / probe["y"].abs().max())
    print("max_rel_err", err)
    sys.exit(0 if err <= 1e-6 else 3)
    """
)


def _merged(name: str, pairing: dict | None = None, **kwargs) -> torch.nn.Module:
    model = make_model(name, dtype=torch.float32, **kwargs)
    tb.add_branches(model, **(pairing or {}))
    perturb_branches(model, std=1e-2)
    tb.merge_branches(model)
    return model


@pytest.mark.parametrize(
    "name, kwargs, how, pairing",
    [
        ("resnet18", {}, "local-dir", None),
        ("resnet18", {}, "overlay", None),  # the overlay builds the architecture's default 1000-class head
        ("tf_efficientnet_b0", {"num_classes": 10}, "local-dir", None),
        ("convnext_atto", {}, "local-dir", {"norms": ("layer",)}),  # LayerNorm CNN, norms widened
        pytest.param("convmixer_768_32", {}, "local-dir", None, marks=pytest.mark.slow),  # conv -> act -> BN
        pytest.param("resnetv2_50x1_bit", {}, "local-dir", {"norms": ("group",)}, marks=pytest.mark.slow),
    ],
)
def test_plain_timm_loads_the_export_in_a_fresh_process(tmp_path, name, kwargs, how, pairing):
    model = _merged(name, pairing, **kwargs)
    out = tmp_path / "export"
    tb.save_pretrained(model, out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        safetensors.torch.save_file({"x": x, "y": model(x)}, tmp_path / "probe.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_PLAIN_TIMM, str(out), name, how],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_export_files_and_config(tmp_path):
    model = _merged("resnet18")
    out = tb.save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 1000
    assert config["timm_branch"]["history"] == tb.branch_history(model)
    assert "timm_branch" not in config["pretrained_cfg"]  # unknown pretrained_cfg keys break stock timm
    timm.models.PretrainedCfg(**config["pretrained_cfg"])  # stock timm accepts every key
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert sorted(weights) == sorted(model.state_dict()) and "bn1.num_batches_tracked" in weights
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "| 0 | cross | frozen | 20 |" in card


def test_channels_last_and_custom_card(tmp_path):
    model = _merged("resnet18").to(memory_format=torch.channels_last)
    out = tb.save_pretrained(model, tmp_path, model_card="# mine\n")
    assert (out / "README.md").read_text() == "# mine\n"
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_branched_or_non_timm_models_are_refused(tmp_path):
    model = make_model("resnet18")
    tb.add_branches(model)
    with pytest.raises(ValueError, match="still has branches; call merge_branches"):
        tb.save_pretrained(model, tmp_path / "a")
    with pytest.raises(TypeError, match="needs a timm model"):
        tb.save_pretrained(torch.nn.Conv2d(1, 1, 1), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failed_write_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    first = _merged("resnet18")
    out = tb.save_pretrained(first, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("timm.models._hub.save_config_for_hf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tb.save_pretrained(_merged("resnet18"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp folder, no partial file
