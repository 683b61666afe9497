"""Bad files: a damaged, truncated, missing or foreign file in a run folder or a ``local-dir:``
start gives an error that names the file and what is wrong, before any training; weights are read
by safetensors or ``torch.load(weights_only=True)`` only."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import timm
import torch

from _faults import tiny_config, tiny_images
from timm_branch import save_pretrained
from timm_branch._io import CorruptFileError
from timm_branch.export import create_pretrained, load_exported
from timm_branch.train import checkpoint as ckpt
from timm_branch.train.continual import ContinualRun

PACKAGE = Path(__file__).parents[1] / "timm_branch"


class _Stop(Exception):
    """Ends the base run after task 1's first checkpoint."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """``(run folder, images)``: task 0 finished, task 1 stopped after its first epoch's checkpoint."""
    folder = tmp_path_factory.mktemp("base")
    images = tiny_images(folder / "images.npz")
    original = ckpt.write_checkpoint

    def stop_after_task_1_epoch_1(run, task, epoch, *args):
        path = original(run, task, epoch, *args)
        if task == 1:
            raise _Stop
        return path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, pytest.raises(_Stop):
            patch.setattr(ckpt, "write_checkpoint", stop_after_task_1_epoch_1)
            ContinualRun(tiny_config(folder / "run", images), progress=False).run()
    finally:
        torch.set_num_threads(threads)
    return folder / "run", images


def _copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base[0], tmp_path / "run"))


def _resume(run: Path, images: Path, **overrides) -> None:
    ContinualRun(tiny_config(run, images, **overrides), progress=False).run(resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    """Damage the tensor data (the end of the file), which no parser can notice."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    path.write_text("{ not json")


DAMAGE = [
    pytest.param("task-0/model.safetensors", _truncate, CorruptFileError,
                 r"task-0/model.safetensors is not the file that was written", id="truncated-weights"),
    pytest.param("task-0/model.safetensors", _flip_last_byte, CorruptFileError,
                 r"task-0/model.safetensors is not the file .* damaged or was changed", id="damaged-weights"),
    pytest.param("task-0/config.json", _garble, CorruptFileError,
                 r"task-0/config.json is not the file that was written", id="damaged-config"),
    pytest.param("task-0/trainer_state.safetensors", Path.unlink, FileNotFoundError,
                 r"task-0/trainer_state.safetensors is missing, but .*task.json lists it", id="missing-trainer-state"),
    pytest.param("task-0/task.json", Path.unlink, FileNotFoundError, r"task-0/task.json is missing", id="missing-task-json"),
    pytest.param("task-0/task.json", _garble, CorruptFileError, r"task-0/task.json is not valid JSON", id="damaged-task-json"),
    pytest.param("checkpoint-1-0/optim.pt", _truncate, CorruptFileError,
                 r"checkpoint-1-0/optim.pt is not the file .* delete .*checkpoint.json to train task 1 again",
                 id="truncated-optimizer-state"),
    pytest.param("checkpoint-1-0/modules.safetensors", Path.unlink, FileNotFoundError,
                 r"checkpoint-1-0/modules.safetensors is missing", id="missing-checkpoint-weights"),
    pytest.param("checkpoint.json", _garble, CorruptFileError, r"checkpoint.json is not valid JSON", id="damaged-pointer"),
]


@pytest.mark.parametrize("name, damage, error, message", DAMAGE)
def test_damaged_run_file_is_named_and_nothing_trains(base, tmp_path, name, damage, error, message):
    run = _copy(base, tmp_path)
    damage(run / name)
    with pytest.raises(error, match=message):
        _resume(run, base[1])
    assert ckpt.finished_tasks(run) == 1 and (run / "checkpoint-1-0").is_dir()  # nothing was replaced


def test_task_folder_of_another_architecture_is_named(base, tmp_path):
    run = _copy(base, tmp_path)
    shutil.rmtree(run / "task-0")
    other = timm.create_model("test_efficientnet", num_classes=0)
    ckpt.write_task(run, 0, lambda folder: save_pretrained(other, folder), {}, {"task": 0})
    foreign = r"task-0/config.json is for the architecture 'test_efficientnet', but the model is 'test_resnet'"
    with pytest.raises(ValueError, match=foreign):
        _resume(run, base[1])


def test_checkpoint_of_another_branch_shape_is_named(base, tmp_path):
    run = _copy(base, tmp_path)
    (run / ckpt.RUN_RECORD).unlink()  # a run folder without the record a resume compares against: the loader names it
    with pytest.raises(ValueError, match=r"checkpoint-1-0/modules.safetensors: the saved 'backbone' state does not fit"):
        _resume(run, base[1], shape="full")  # the checkpoint's branches have the cross shape


def test_weights_of_another_model_under_the_same_architecture_name_are_named(tmp_path):
    save_pretrained(timm.create_model("test_resnet", num_classes=0, in_chans=1), tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the model: .*1 shapes differ \['conv1.0.weight"):
        load_exported(timm.create_model("test_resnet", num_classes=0), tmp_path)


@pytest.fixture
def export(tmp_path) -> Path:
    return save_pretrained(timm.create_model("test_resnet", num_classes=0), tmp_path / "export")


def test_truncated_pretrained_weights_are_named(export):
    _truncate(export / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"export/model.safetensors is not a readable safetensors file .* truncated"):
        create_pretrained(f"local-dir:{export}", num_classes=0)


def test_pretrained_config_of_another_architecture_is_named(export, tmp_path):
    other = save_pretrained(timm.create_model("test_efficientnet", num_classes=0), tmp_path / "other")
    shutil.copy(other / "config.json", export / "config.json")
    mismatch = r"export/model.safetensors does not fit the architecture 'test_efficientnet' that .*config.json names"
    with pytest.raises(ValueError, match=mismatch):
        create_pretrained(f"local-dir:{export}", num_classes=0)


def test_pretrained_folder_without_weights_is_refused_before_the_run(export, tmp_path):
    (export / "model.safetensors").unlink()
    config = tiny_config(tmp_path / "run", tiny_images(tmp_path / "images.npz"), pretrained=f"local-dir:{export}")
    with pytest.raises(ValueError, match=r"export has no model.safetensors; give a folder written by save_pretrained"):
        ContinualRun(config)
    assert not (tmp_path / "run").exists()


def _calls(tree: ast.AST, module: str, function: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == function and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def test_weights_are_read_without_pickle():
    """Every ``torch.load`` in the package passes ``weights_only=True``, every ``np.load``
    ``allow_pickle=False``, and nothing imports pickle."""
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module, function, keyword, value in (("torch", "load", "weights_only", True), ("np", "load", "allow_pickle", False)):
            for call in _calls(tree, module, function):
                given = {k.arg: k.value for k in call.keywords}
                assert isinstance(given.get(keyword), ast.Constant) and given[keyword].value is value, (
                    f"{path}:{call.lineno}: {module}.{function} without {keyword}={value}")
                checked += 1
        imports = [alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names] + [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(imports), f"{path} imports a pickle module"
    assert checked >= 2  # the optimiser state and the .npz reader were found
