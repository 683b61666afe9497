"""Bad arguments, models and data: a clear error before any training starts (no run folder is made).

Already covered elsewhere: unknown model names, strategies, shapes, a batch size below 2 and empty
data (test_train_continual::test_config_reports_every_problem_at_once), a batch larger than a task
(test_train_continual::test_batch_larger_than_a_task_is_refused_before_training), bad image arrays
and labels in a data source (test_data_sources).
"""
from __future__ import annotations

import numpy as np
import pytest

from _faults import tiny_config
from timm_branch import cli
from timm_branch.surgery import NoBatchNormError
from timm_branch.train.config import TrainConfig
from timm_branch.train.continual import ContinualRun

PROBLEMS = [
    (dict(bn="melted"), "bn='melted' is not one of frozen, affine, train"),
    (dict(method="dino"), "method='dino' is not one of"),
    (dict(scenario="task"), "scenario='task' is not one of class, data, domain"),
    (dict(optimizer="adam"), "optimizer='adam' is not one of"),
    (dict(precision="fp16"), "precision='fp16' is not one of fp32, bf16"),
    (dict(nonfinite="ignore"), "nonfinite='ignore' is not one of stop, skip"),
    (dict(nonfinite_limit=0), "nonfinite_limit=0 must be at least 1"),
    (dict(epochs=0), "epochs=0 must be at least 1"),
    (dict(num_tasks=0), "num_tasks=0 must be at least 1"),
    (dict(warmup_epochs=5, epochs=2), "warmup_epochs=5 must lie between 0 and epochs=2"),
    (dict(lr=-0.1), "lr=-0.1 must be positive"),
    (dict(knn_temperature=0.0), "knn_temperature=0.0 must be positive"),
    (dict(distill_weight=-1.0), "distill_weight=-1.0 must not be negative"),
    (dict(device="gpu"), "device='gpu' is not a torch device"),
    (dict(device="cuda:7"), "device='cuda:7', but this machine has"),
    (dict(pretrained="resnet1800"), "pretrained='resnet1800' is neither a timm model name"),
    (dict(pretrained="local-dir:/nowhere"), "/nowhere has no config.json or model.safetensors"),
    (dict(push_to_hub="no-namespace"), "push_to_hub='no-namespace' is not a Hub repository id"),
    (dict(compile="turbo"), "compile='turbo' is not a torch.compile backend; choose one of"),
    (dict(workers=-1), "workers=-1 must not be negative"),
    (dict(scenario="domain"), "scenario='domain' needs two or more data sources"),
    (dict(norms=["batch", "instance"]), "norms=['batch', 'instance'] ('instance' unknown): give a non-empty list of batch, layer, group"),
    (dict(through=[]), "through=[]: give a non-empty list of shape, act, conv"),
]


@pytest.mark.parametrize("values, message", PROBLEMS, ids=[next(iter(v)) + "=" + str(next(iter(v.values()))) for v, _ in PROBLEMS])
def test_each_bad_setting_is_named(values, message):
    with pytest.raises(ValueError, match="invalid configuration") as err:
        TrainConfig(**values).validate()
    assert message in str(err.value)


def _images(path, n=48, channels=3, dtype=np.uint8, labels=None):
    arrays = {"x_train": np.zeros((n, 16, 16, channels), dtype=dtype)}
    if labels is not None:
        arrays["y_train"] = np.asarray(labels)
    np.savez(path, **arrays)
    return path


BAD_RUNS = [
    ("model without BatchNorm", dict(model="test_convnext"), {}, NoBatchNormError,
     r"test_convnext has no BatchNorm layer \(it normalises with .*LayerNorm"),
    ("class split with more tasks than classes", dict(scenario="class", num_tasks=4), dict(labels=np.arange(48) % 3),
     ValueError, "cannot make 4 tasks from 3 classes"),
    ("a task without images", dict(scenario="class", num_tasks=3), dict(labels=np.arange(48) % 2 * 2),
     ValueError, r"task \d of source 'images' has no training images \(classes \[1\]\)"),
    ("data split with more tasks than images", dict(num_tasks=49), {}, ValueError, "cannot make 49 tasks from 48 training images"),
    ("float images", {}, dict(dtype=np.float32), ValueError, r"images.npz: 'x_train' must be uint8, got float32"),
    ("five-channel images", {}, dict(channels=5), ValueError, r"images.npz: 'x_train'"),
    ("online probe on unlabeled images", dict(online_probe=True), {}, ValueError, "online_probe needs labelled training data"),
]


@pytest.mark.parametrize("what, settings, data, error, message", BAD_RUNS, ids=[b[0] for b in BAD_RUNS])
def test_bad_model_or_data_is_refused_before_training(tmp_path, what, settings, data, error, message):
    config = tiny_config(tmp_path / "run", _images(tmp_path / "images.npz", **data), batch_size=8, **settings)
    with pytest.raises(error, match=message):
        ContinualRun(config)
    assert not (tmp_path / "run").exists()


def test_model_without_batchnorm_trains_without_branches(tmp_path):
    """The BatchNorm check applies to the branch strategies only."""
    # 32 px: test_convnext's 2x2 downsampling convs leave nothing of a 16 px image (refused since the image-size check).
    ContinualRun(tiny_config(tmp_path / "run", _images(tmp_path / "images.npz"), model="test_convnext", strategy="cassle",
                             image_size=32))


def test_cli_names_a_bad_flag_value_and_trains_nothing(tmp_path, capsys):
    code = cli.main(["train", "--nonfinite", "carry-on", "--nonfinite-limit", "0", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "nonfinite='carry-on' is not one of stop, skip" in err and "nonfinite_limit=0" in err
    assert not (tmp_path / "run").exists()
