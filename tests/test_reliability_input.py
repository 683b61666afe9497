"""Hostile input: damaged folders are not pushed, link loops in an image folder are walked once,
bad files and settings give one-line errors that name them, an export over an existing one is
replaced whole, and a half-precision merge that would overflow is refused."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from _faults import tiny_config, tiny_images
from hub_server import hub_server  # noqa: F401 - fixture
from timm_branch import add_branches, cli, merge_branches, save_pretrained
from timm_branch import export as export_module
from timm_branch._io import CorruptFileError
from timm_branch.branch import iter_branches
from timm_branch.data import load_source
from timm_branch.hub import push_task_folder
from timm_branch.train import checkpoint as ckpt
from timm_branch.train.continual import ContinualRun

TOKEN = "hf_inputReliabilityToken012345"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A finished task folder (``task.json`` with digests) of ``test_resnet``."""
    run = tmp_path_factory.mktemp("run")
    model = timm.create_model("test_resnet", num_classes=0)
    return ckpt.write_task(run, 0, lambda folder: save_pretrained(model, folder), {}, {"task": 0})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"conv1.weight": [0.0] * 8}))


def _nan(path: Path) -> None:
    tensors = safetensors.torch.load_file(path)
    tensors["conv1.0.weight"].view(-1)[0] = float("nan")
    safetensors.torch.save_file(tensors, path)


def _other_shapes(path: Path) -> None:
    safetensors.torch.save_file(timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict(), path)


DAMAGE = [
    ("truncated", _truncate, CorruptFileError, "not a readable safetensors file"),
    ("pickle", _pickle, CorruptFileError, "not a readable safetensors file"),
    ("nan", _nan, ValueError, "hold NaN or Inf"),
    ("other-shapes", _other_shapes, ValueError, "does not fit the model"),
]


@pytest.mark.parametrize("recorded", [True, False], ids=["task-folder", "plain-export"])
@pytest.mark.parametrize("name, damage, error, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_push_refuses_a_damaged_folder_before_any_request(exported, tmp_path, hub_server, name, damage, error,  # noqa: F811
                                                          message, recorded):
    folder = Path(shutil.copytree(exported, tmp_path / "task-0"))
    if not recorded:
        (folder / ckpt.TASK_INFO).unlink()
    damage(folder / "model.safetensors")
    expected = "is not the file that was written" if recorded else message
    with pytest.raises(CorruptFileError if recorded else error, match=expected):
        push_task_folder(folder, "org/damaged", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.requests == []


def test_push_command_refuses_a_damaged_folder_in_one_line(exported, tmp_path, capsys):
    folder = Path(shutil.copytree(exported, tmp_path / "task-0"))
    _truncate(folder / "model.safetensors")
    assert cli.main(["push", str(folder), "--repo-id", "org/damaged"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors is not the file that was written" in err


def _png_folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("loops", [["a"], ["a", "b"]], ids=["one-loop", "two-loops"])
def test_link_loops_in_an_image_folder_are_skipped_and_no_image_counts_twice(tmp_path, caplog, loops):
    data = _png_folder(tmp_path / "data", {"a": 4, "b": 3})
    for name in loops:
        os.symlink("..", data / name / "loop")
    os.symlink(data / "a", data / "b" / "also-a")  # the same images under a second name
    with caplog.at_level(logging.WARNING):
        source = load_source(str(data), 8, workers=0)
    assert source.train.labels.tolist() == [0] * 4 + [1] * 3
    assert all(f"data/{name}/loop links back to" in caplog.text for name in loops)


def _bomb_png(path: Path) -> Path:
    """A PNG whose header claims 50000 x 50000 pixels (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_named(tmp_path):
    data = _png_folder(tmp_path / "data", {"a": 2})
    _bomb_png(data / "a" / "bomb.png")
    with pytest.raises(ValueError, match=r"cannot read image .*bomb\.png: .*decompression bomb"):
        load_source(str(data), 8, workers=0)


YAML = [
    ('epochs: "1"\n', "epochs='1' is a str, not int"),
    ("epochs: 1.5\n", "epochs=1.5 is a float, not int"),
    ("data: [3]\n", "data=[3] is a list, not list of str"),
    ("epochs: !!python/object/apply:os.system [echo]\n", "is not a plain YAML mapping: could not determine a constructor"),
    ("epochs: [1\n", "is not a plain YAML mapping: while parsing a flow sequence"),
]


@pytest.mark.parametrize("text, message", YAML, ids=["quoted-int", "float-int", "list-of-int", "python-tag", "syntax"])
def test_bad_yaml_is_one_line_and_makes_no_run_folder(tmp_path, capsys, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert cli.main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "run").exists(), err


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))) if callable(edit) else edit)


CONFIGS = [
    ("no-architecture", lambda c: {k: v for k, v in c.items() if k != "architecture"}, "names no 'architecture'"),
    ("unknown-architecture", lambda c: {**c, "architecture": "nope_net"}, "which timm does not know"),
    ("json-list", lambda c: [c], "holds a JSON list, not an object"),
    ("bogus-model-args", lambda c: {**c, "model_args": {"bogus": 1}}, "its model_args do not build 'test_resnet'"),
    ("model-args-list", lambda c: {**c, "model_args": [1]}, "'model_args' is a JSON list"),
    ("invalid-json", "{not json", "config.json is not valid JSON"),
]


@pytest.mark.parametrize("strategy", ["branch", "finetune"])
@pytest.mark.parametrize("name, edit, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_bad_pretrained_config_json_is_named_before_the_run_folder(exported, tmp_path, capsys, name, edit, message,
                                                                      strategy):
    start = Path(shutil.copytree(exported, tmp_path / "start"))
    _edit_json(start / "config.json", edit)
    config = tiny_config(tmp_path / "run", tiny_images(tmp_path / "images.npz"), pretrained=f"local-dir:{start}",
                         strategy=strategy)
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    assert cli.main(["train", "--config", str(tmp_path / "config.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{start / 'config.json'}" in err and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_nan_in_pretrained_weights_is_named_at_load_and_no_run_folder_is_made(exported, tmp_path):
    start = Path(shutil.copytree(exported, tmp_path / "start"))
    (start / ckpt.TASK_INFO).unlink()
    _nan(start / "model.safetensors")
    run = ContinualRun(tiny_config(tmp_path / "run", tiny_images(tmp_path / "images.npz"), pretrained=f"local-dir:{start}"),
                       progress=False)
    with pytest.raises(ValueError, match=r"start/model.safetensors: 1 tensors hold NaN or Inf \(conv1.0.weight\)"):
        run.run()
    assert not (tmp_path / "run").exists()  # config.yaml is not written before the model loads


@pytest.mark.parametrize("selector, message", [
    ("layer1.[", "is not a valid regular expression"),
    (3, "must be a regular expression"),
    (["conv1", 2], "must be a regular expression"),
])
def test_bad_include_is_named(selector, message):
    model = timm.create_model("test_resnet")
    with pytest.raises(ValueError, match=message):
        add_branches(model, include=selector)
    with pytest.raises(ValueError, match=message):
        add_branches(model, exclude=selector)
    assert next(iter_branches(model), None) is None


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_save_pretrained_over_an_export_replaces_it_whole(tmp_path, monkeypatch):
    first = timm.create_model("test_resnet", num_classes=0)
    out = save_pretrained(first, tmp_path / "export")
    (out / "notes.txt").write_text("kept")
    before = _files(out)
    second = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    replace, calls = os.replace, []

    def second_fails(src, dst):  # what the old file-by-file moves did on a full or failing disk
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="nothing was replaced"):
        save_pretrained(second, out)
    assert _files(out) == before
    monkeypatch.setattr(os, "replace", replace)

    monkeypatch.setattr(export_module, "_swap", lambda staged, directory: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(OSError, match="nothing was replaced"):
        save_pretrained(second, out)
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    monkeypatch.undo()

    save_pretrained(second, out)
    assert (out / "notes.txt").read_text() == "kept" and json.loads((out / "config.json").read_text())["model_args"]["in_chans"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_half_precision_merge_that_overflows_is_refused_and_changes_nothing():
    model = timm.create_model("test_resnet", num_classes=0).half()
    add_branches(model, shape="cross")
    name, conv, branch = next(iter_branches(model))
    with torch.no_grad():
        conv.parametrizations["weight"].original.fill_(60000.0)
        branch.branch.fill_(60000.0)  # finite, but 60000 + 60000 is Inf in float16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"would overflow to Inf in torch.float16 \({name}\)"):
        merge_branches(model)
    assert next(iter_branches(model), None) is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

