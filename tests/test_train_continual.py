"""The continual trainer on the bundled digits with timm's tiny test_resnet: strategies, resume, CLI."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from _faults import tiny_config, tiny_images
from timm_branch.bn import is_batchnorm
from timm_branch.evaluate import ContinualMetrics
from timm_branch.branch import tap_indices
from timm_branch.pairs import find_conv_bn_pairs, find_conv_norm_pairs, is_conv, norm_kind
from timm_branch.train import checkpoint as ckpt
from timm_branch.train.config import TrainConfig
from timm_branch.train.continual import ContinualRun

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny runs: two threads only spin-wait

TINY = dict(model="test_resnet", image_size=16, batch_size=32, epochs=1, num_tasks=2, linear_probe=False, knn_k=5)


def _config(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(tmp_path / "run"), **kwargs})


def _weights(run_dir, task: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(ckpt.task_dir(run_dir, task) / "model.safetensors")


def test_config_reports_every_problem_at_once():
    config = TrainConfig(model="resnet1800", strategy="magic", shape="star", batch_size=1, data=[])
    with pytest.raises(ValueError) as err:
        config.validate()
    text = str(err.value)
    for needle in ("model='resnet1800' is not a timm model", "strategy='magic'", "shape='star'", "batch_size=1", "data is empty"):
        assert needle in text
    assert "resnet18" in text.split("(close: ")[1].split(")")[0].split(", ")  # nearest by edit distance


def test_config_yaml_round_trip_and_unknown_keys(tmp_path):
    config = TrainConfig(method="byol", data=["digits"], lr=0.1)
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path) == config
    with pytest.raises(ValueError, match=r"unknown configuration keys \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})


def test_batch_larger_than_a_task_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="task 0 has .* training images, fewer than batch_size=2000"):
        ContinualRun(_config(tmp_path, batch_size=2000))
    assert not (tmp_path / "run").exists()


def test_branch_strategy_changes_only_branch_taps_and_keeps_bn(tmp_path):
    run_dir = ContinualRun(_config(tmp_path, strategy="branch", shape="cross"), progress=False).run().parent
    before, after = _weights(run_dir, 0), _weights(run_dir, 1)
    model = timm.create_model("test_resnet", num_classes=0)
    paired = {p.conv for p in find_conv_bn_pairs(model)}
    changed_taps = 0
    for name, module in model.named_modules():
        if name in paired:
            delta = (after[f"{name}.weight"] - before[f"{name}.weight"]).flatten(2)
            taps = tap_indices(module.kernel_size, "cross")
            off = torch.ones(delta.shape[-1], dtype=torch.bool)
            off[taps] = False
            assert (delta[..., off] == 0).all(), name  # only the folded branch moved the kernel
            changed_taps += int((delta[..., taps] != 0).any())
    assert changed_taps == len(paired)  # every branch learned something
    bn_keys = [k for k in before if any(k.startswith(n + ".") for n, m in model.named_modules() if is_batchnorm(m))]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)


def test_norms_reach_add_branches_and_their_layers_stay_frozen(tmp_path):
    """--norms layer: a LayerNorm CNN trains branches on the convs feeding LayerNorms, which stay fixed."""
    config = tiny_config(tmp_path / "run", tiny_images(tmp_path / "images.npz"), model="test_convnext", image_size=32,
                         epochs=1, norms=["layer"], through=["shape"])
    run_dir = ContinualRun(config, progress=False).run().parent
    before, after = _weights(run_dir, 0), _weights(run_dir, 1)
    model = timm.create_model("test_convnext", num_classes=0)
    paired = {p.conv for p in find_conv_norm_pairs(model, norms=("layer",), through=("shape",))}
    assert paired and all(not torch.equal(before[f"{n}.weight"], after[f"{n}.weight"]) for n in paired)
    unpaired = [n for n, m in model.named_modules() if n not in paired and (is_conv(m) or norm_kind(m) == "layer")]
    assert unpaired and all(torch.equal(before[k], after[k]) for n in unpaired for k in before if k.startswith(n + "."))


def test_finetune_strategy_moves_everything(tmp_path):
    run_dir = ContinualRun(_config(tmp_path, strategy="finetune"), progress=False).run().parent
    before, after = _weights(run_dir, 0), _weights(run_dir, 1)
    assert not torch.equal(before["conv1.0.weight"], after["conv1.0.weight"])
    assert not torch.equal(before["conv1.1.running_mean"], after["conv1.1.running_mean"])


def test_joint_strategy_sees_the_union_of_tasks(tmp_path):
    run = ContinualRun(_config(tmp_path, strategy="joint", num_tasks=3))
    union = torch.cat([t.train for t in run.scenario.tasks[:2]])
    assert torch.equal(run.task_indices(1), union)
    assert torch.equal(ContinualRun(_config(tmp_path, strategy="branch", num_tasks=3)).task_indices(1), run.scenario.tasks[1].train)


@pytest.mark.parametrize("method, strategy", [("byol", "cassle+branch"), ("moco", "cassle")])
def test_momentum_and_distillation_strategies_run(tmp_path, method, strategy):
    run = ContinualRun(_config(tmp_path, method=method, strategy=strategy), progress=False)
    final = run.run()
    state = ckpt.read_task_state(final.parent, 1)
    assert any(k.startswith("momentum.") for k in state)
    metrics = (final.parent / "metrics.json").read_text()
    assert '"knn_top1"' in metrics


def _crash_after_task_1_epoch_1(config: TrainConfig, monkeypatch) -> None:
    """Run ``config`` until its checkpoint of task 1's first epoch is written, then crash."""
    original = ckpt.write_checkpoint

    def crash_after(run, task, epoch, *args):
        path = original(run, task, epoch, *args)
        if (task, epoch) == (1, 0):
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(ckpt, "write_checkpoint", crash_after)
    with pytest.raises(KeyboardInterrupt):
        ContinualRun(config, progress=False).run()
    monkeypatch.setattr(ckpt, "write_checkpoint", original)


@pytest.mark.parametrize("config", [
    dict(strategy="cassle+branch", method="byol", epochs=2),
    # SwAV freezes its prototypes for the first epochs of a task: the crash falls in a frozen epoch.
    dict(strategy="branch", method="swav", epochs=3),
], ids=["cassle+branch-byol", "branch-swav"])
def test_resume_after_interruption_reaches_the_same_weights(tmp_path, monkeypatch, config):
    reference = ContinualRun(_config(tmp_path / "a", **config), progress=False).run()
    interrupted = _config(tmp_path / "b", **config)
    _crash_after_task_1_epoch_1(interrupted, monkeypatch)
    assert ckpt.finished_tasks(tmp_path / "b" / "run") == 1
    with pytest.raises(FileExistsError, match="--resume"):
        ContinualRun(interrupted, progress=False).run()
    resumed = ContinualRun(interrupted, progress=False).run(resume=True)
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert ckpt.read_task_state(resumed.parent, 1).keys() == ckpt.read_task_state(reference.parent, 1).keys()
    assert all(torch.equal(v, ckpt.read_task_state(reference.parent, 1)[k]) for k, v in ckpt.read_task_state(resumed.parent, 1).items())
    # The training curve of the interrupted task, its epoch before the crash included (kept in the checkpoint).
    curves = [[row.epochs for row in ContinualMetrics.load(run.parent).rows] for run in (resumed, reference)]
    assert curves[0] == curves[1] and len(curves[0][1]) == config["epochs"]


def test_images_too_small_for_the_model_name_the_flag_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match=r"image_size=16 is too small for vgg11_bn: .*Output size is too small\); "
                                         r"raise --image-size \(32 works\)"):
        ContinualRun(_config(tmp_path, model="vgg11_bn", image_size=16, strategy="finetune"))
    assert not (tmp_path / "run").exists()


def test_logs_show_the_eta_and_learning_against_random_init_and_metrics_keep_the_curve(tmp_path, caplog):
    caplog.set_level("INFO", logger="timm_branch.train")
    run_dir = ContinualRun(_config(tmp_path, epochs=2), progress=False).run().parent
    metrics = ContinualMetrics.load(run_dir)
    said = [r.getMessage() for r in caplog.records if r.name == "timm_branch.train"]
    random_knn = f"{metrics.random_init.knn_top1 * 100:.2f}%"
    assert said[0] == f"before training, a random-init test_resnet: kNN top-1 {random_knn} (what each task's scores compare with)"
    epochs = [m for m in said if " epoch " in m]
    assert [m.split(":")[0] for m in epochs] == ["task 0 epoch 1/2", "task 0 epoch 2/2", "task 1 epoch 1/2", "task 1 epoch 2/2"]
    assert all(", lr " in m and "; elapsed " in m for m in epochs)
    assert all(m.endswith(" left") for m in epochs[:-1]) and not epochs[-1].endswith(" left")  # the ETA, until the end
    done = [m for m in said if " done: " in m]
    assert done == [f"task {t} done: kNN top-1 {row.knn_top1 * 100:.2f}% (random init {random_knn})" for t, row in enumerate(metrics.rows)]
    for row in metrics.rows:
        assert [e["epoch"] for e in row.epochs] == [1, 2] and all(math.isfinite(e["loss"]) for e in row.epochs)
        assert row.epochs[0]["lr"] > row.epochs[1]["lr"] == 0  # warm-up, then the cosine schedule ends at 0


_LOAD = textwrap.dedent(
    """
    import sys, timm, torch
    model = eval(sys.argv[1])  # the exact line the CLI printed
    assert "timm_branch" not in sys.modules
    out = model.eval()(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, model.num_features) and torch.isfinite(out).all()
    """
)


def test_cli_two_tasks_and_plain_timm_loads_the_result(tmp_path):
    out = tmp_path / "cli-run"
    cmd = [sys.executable, "-m", "timm_branch", "train", "--model", "test_resnet", "--image-size", "16", "--batch-size", "32",
           "--epochs", "1", "--num-tasks", "2", "--no-linear-probe", "--output", str(out), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == f'timm.create_model("local-dir:{out / "task-1"}", pretrained=True)'
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1"}
    loaded = subprocess.run([sys.executable, "-c", _LOAD, last], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr


def test_cli_reports_bad_arguments_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "timm_branch", "train", "--strategy", "nope", "--output", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "strategy='nope' is not one of" in result.stderr


def test_resume_recovers_the_evaluation_of_a_task_finished_just_before_a_crash(tmp_path, monkeypatch):
    from timm_branch.evaluate import ContinualMetrics

    config = _config(tmp_path, num_tasks=2)

    def crash(self, directory):
        raise KeyboardInterrupt("crash between task-0/ and metrics.json")

    monkeypatch.setattr(ContinualMetrics, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ContinualRun(config, progress=False).run()
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert ckpt.finished_tasks(run_dir) == 1 and not (run_dir / "metrics.json").exists()
    ContinualRun(config, progress=False).run(resume=True)
    metrics = ContinualMetrics.load(run_dir)
    assert [row.task for row in metrics.rows] == [0, 1] and metrics.rows[0].extra["recovered"] is True
    assert metrics.random_init is not None and metrics.rows[0].knn_top1 is not None


def test_pretrained_start_uses_the_strategy_from_task_zero(tmp_path):
    base = ContinualRun(_config(tmp_path / "base", num_tasks=1, strategy="finetune"), progress=False).run()
    config = _config(tmp_path, pretrained=f"local-dir:{base}", strategy="branch", shape="1x1", num_tasks=2)
    run_dir = ContinualRun(config, progress=False).run().parent
    start, after = _weights(base.parent, 0), _weights(run_dir, 0)
    delta = (after["conv1.0.weight"] - start["conv1.0.weight"]).flatten(2)
    centre = tap_indices((3, 3), "1x1")
    assert (delta[..., [i for i in range(9) if i not in centre.tolist()]] == 0).all()
    assert (delta[..., centre] != 0).any()  # task 0 trained a branch on the pretrained kernel


def test_domain_sequence_one_task_per_source(tmp_path):
    import numpy as np

    gen = np.random.default_rng(0)
    specs = []
    for name in ("park", "street"):
        arrays = {f"x_{split}": gen.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for split, n in (("train", 40), ("test", 12))}
        arrays |= {f"y_{split}": np.arange(n) % 3 for split, n in (("train", 40), ("test", 12))}
        np.savez(tmp_path / f"{name}.npz", **arrays)
        specs.append(str(tmp_path / f"{name}.npz"))
    run = ContinualRun(_config(tmp_path, scenario="domain", data=specs, num_tasks=2), progress=False)
    assert [t.source for t in run.scenario.tasks] == ["park", "street"]
    run.run()
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert '"linear_top1": null' in metrics and '"knn_per_task"' in metrics


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> str:
    """``train/`` (4 classes of 24) and ``val/`` (4 of 6) PNGs of 20-22 x 24 px: resized and cropped at load."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 6)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (20 + i % 3, 24, 3), dtype=np.uint8) + np.uint8(30 * c)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


def test_streamed_folder_trains_and_evaluates_exactly_as_in_memory(tmp_path, png_folder):
    """--stream: batches decoded by two DataLoader workers that serve a whole task, evaluation
    features batch by batch; the pixels are the in-memory load's, so weights and scores are equal,
    not close."""
    import json

    runs = {}
    for name, stream in (("memory", {}), ("streamed", dict(stream=True, workers=2))):
        config = _config(tmp_path / name, data=[png_folder], batch_size=16, epochs=2, linear_probe=True, **stream)
        run = ContinualRun(config, progress=False)
        assert isinstance(run.images, torch.Tensor) != bool(stream)
        # Training on the CPU, one worker by default: the cores run the step (benchmarks/stream.py).
        assert ContinualRun(dataclasses.replace(config, workers=None), progress=False)._workers == 1
        runs[name] = run.run().parent
    for task in (0, 1):
        got, expected = _weights(runs["streamed"], task), _weights(runs["memory"], task)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    metrics = [json.loads((runs[name] / "metrics.json").read_text()) for name in ("streamed", "memory")]
    scores = [[{k: v for k, v in row.items() if k != "extra"} for row in m["rows"]] for m in metrics]  # extra: seconds
    assert scores[0] == scores[1] and metrics[0]["summary"] == metrics[1]["summary"]
    assert len(scores[0]) == 2 and scores[0][-1]["linear_top1"] is not None


def test_streamed_run_resumed_mid_task_ends_as_the_in_memory_run(tmp_path, monkeypatch, png_folder):
    """The workers' loader runs ahead across epochs; a resumed task starts it at the next epoch."""
    tiny = dict(data=[png_folder], batch_size=16, epochs=3)
    reference = ContinualRun(_config(tmp_path / "memory", **tiny), progress=False).run()
    streamed = _config(tmp_path / "streamed", **tiny, stream=True, workers=1)
    _crash_after_task_1_epoch_1(streamed, monkeypatch)
    resumed = ContinualRun(streamed, progress=False).run(resume=True)
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_saved_configuration_is_resolved(tmp_path):
    run = ContinualRun(_config(tmp_path, method="moco", batch_size=64))
    resolved = run.resolved_config()
    assert resolved.optimizer == "sgd" and resolved.lr == pytest.approx(0.3 * 64 / 256) and resolved.weight_decay == 1e-4
    assert resolved.split_seed == 5


def test_bf16_autocast_and_channels_last_run(tmp_path):
    final = ContinualRun(_config(tmp_path, precision="bf16", channels_last=True, num_tasks=2), progress=False).run()
    weights = _weights(final.parent, 1)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert (final.parent / "accuracy_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_compiled_run_trains_exactly_as_eager(tmp_path):
    """dynamo and AOTAutograd through the branched backbone and the momentum network, with no
    graph break: the aot_eager backend runs the very kernels eager runs, so the weights are equal."""
    from torch._dynamo.utils import counters

    byol = dict(method="byol", batch_size=128)  # a momentum network, and few steps per task
    eager = ContinualRun(_config(tmp_path / "eager", **byol), progress=False).run()
    counters.clear()
    compiled = ContinualRun(_config(tmp_path / "compiled", **byol, compile="aot_eager"), progress=False).run()
    # Per task the online and the momentum encoder; the branched task-1 backbone is a graph of its own.
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]
    for task in (0, 1):
        got, expected = _weights(compiled.parent, task), _weights(eager.parent, task)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_online_linear_probe_trains_alongside_and_is_reported(tmp_path):
    from timm_branch.evaluate import ContinualMetrics

    run = ContinualRun(_config(tmp_path, online_probe=True, epochs=2), progress=False)
    final = run.run()
    metrics = ContinualMetrics.load(final.parent)
    online = [row.extra["online_top1"] for row in metrics.rows]
    assert len(online) == 2 and all(0.0 <= a <= 1.0 for a in online)
    state = ckpt.read_task_state(final.parent, 1)
    assert state["probe.weight"].shape == (10, timm.create_model("test_resnet", num_classes=0).num_features)
    # Trained on labels, the probe fits the labelled training images better than the same probe
    # untrained (the run's seeded initialisation) and than one that predicts every class alike:
    # a comparison of losses, with no accuracy threshold that a seed or a kernel could cross.
    backbone = ckpt.load_task(final.parent, 1, timm.create_model("test_resnet", num_classes=0)).eval()
    feats, labels = run.features(backbone, run.images).double(), run.scenario.source.train.labels

    def loss(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return F.cross_entropy(F.linear(feats, weight.double(), bias.double()), labels).item()

    untrained = run.new_learner().probe
    trained = loss(state["probe.weight"], state["probe.bias"])
    assert trained < loss(untrained.weight.detach(), untrained.bias.detach())
    assert trained < math.log(10)  # the loss of a probe that predicts every class alike


def test_task_folder_card_reports_the_run(tmp_path):
    """task-K/README.md is the card of the run up to task K: no base model for a random-init run,
    one row per task numbered as the folders, task K's own scores included."""
    from timm_branch.card import parse_front_matter, render_folder_card
    from timm_branch.evaluate import ContinualMetrics

    final = ContinualRun(_config(tmp_path, strategy="branch"), progress=False).run()
    card = (final / "README.md").read_text()
    assert card == render_folder_card(final)  # what a push would upload
    assert "base_model" not in parse_front_matter(card)
    assert "- Source weights: random initialisation of `test_resnet`" in card
    def rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| task")]

    assert [row.split(" | ")[0] for row in rows(card)] == ["| 0", "| 1"]
    knn = ContinualMetrics.load(final.parent).rows[1].knn_top1
    assert rows(card)[1].endswith(f"| {100 * knn:.2f}% | – |")
    first = rows((final.parent / "task-0" / "README.md").read_text())
    assert len(first) == 1 and first[0].startswith("| 0 | none | trained |")
