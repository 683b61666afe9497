"""TensorBoard curves of a continual run: event files when tensorboard is installed, a quiet no-op otherwise."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from timm_branch.train import ContinualRun, TrainConfig
from timm_branch.train import tensorboard as tb


def _tiny_npz(path) -> str:
    """4 classes of 16 train and 4 test 8x8 noise images, each class a little brighter than the last."""
    rng = np.random.default_rng(0)

    def split(per_class: int):
        labels = np.repeat(np.arange(4), per_class)
        images = rng.integers(0, 160, (len(labels), 8, 8, 3)) + 24 * labels[:, None, None, None]
        return images.astype(np.uint8), labels

    (x_train, y_train), (x_test, y_test) = split(16), split(4)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _run(tmp_path) -> ContinualRun:
    config = TrainConfig(model="test_resnet", data=[_tiny_npz(tmp_path / "tiny.npz")], num_tasks=2, epochs=2,
                         batch_size=16, image_size=16, knn_k=3, output=str(tmp_path / "run"))
    run = ContinualRun(config, progress=False)
    run.run()
    return run


def test_event_files_hold_the_epoch_curves_and_task_metrics(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]  # 2 tasks x 2 epochs
    assert [step for step, _ in scalars["train/lr"]] == [1, 2, 3, 4]
    assert all(np.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
    # per task: one warmup epoch up to the peak learning rate, then cosine decay to 0
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([run.lr, 0, run.lr, 0], abs=1e-7)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = saved["rows"]
    for probe in ("knn", "linear"):
        # float32 in the event file, float64 in metrics.json
        assert scalars[f"eval/{probe}_top1"] == [(r["task"], pytest.approx(r[f"{probe}_top1"])) for r in rows]
        assert scalars[f"eval/{probe}_task1"] == [(r["task"], pytest.approx(r[f"{probe}_per_task"][1])) for r in rows]
        # forgetting is defined from the second task on
        assert scalars[f"eval/{probe}_forgetting"] == [(1, pytest.approx(saved["summary"][probe]["forgetting"]))]
    assert run.tensorboard._writer is None  # closed at the end of the run


def test_without_tensorboard_the_logger_is_a_no_op_that_says_so_once(tmp_path, monkeypatch, caplog):
    # A None entry in sys.modules makes the import fail, as when the package is not installed.
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(tb, "_missing_reported", False)
    with caplog.at_level(logging.INFO, logger=tb.__name__):
        for name in ("a", "b"):
            logger = tb.TensorBoardLogger(tmp_path / name)
            logger.log_epoch(1, 0.5, 0.1)
            logger.log_task(0, {"knn_top1": 0.5, "knn_per_task": [0.5, 0.0]})
            logger.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    notices = [r for r in caplog.records if "TensorBoard is not installed" in r.getMessage()]
    assert len(notices) == 1
