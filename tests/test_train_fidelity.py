"""The trainer's fidelity to the reference code: the paper preset, trained BatchNorms, branch decay."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch

from timm_branch.bn import is_batchnorm
from timm_branch.data import NORMALIZATIONS
from timm_branch.train import checkpoint as ckpt
from timm_branch.train.config import PRESETS, TrainConfig
from timm_branch.train.continual import ContinualRun
from timm_branch.train.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="test_resnet", image_size=16, batch_size=32, epochs=1, num_tasks=2, linear_probe=False, knn_k=5)


def _run(tmp_path, **kwargs) -> ContinualRun:
    return ContinualRun(TrainConfig(**{**TINY, "output": str(tmp_path / "run"), **kwargs}), progress=False)


def _bn_affine(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model = timm.create_model("test_resnet", num_classes=0)
    norms = [n for n, m in model.named_modules() if is_batchnorm(m)]
    return {k: v for k, v in weights.items() if any(k in (f"{n}.weight", f"{n}.bias") for n in norms)}


def test_bn_train_optimises_the_batchnorm_affine_parameters(tmp_path):
    """``bn="train"``: the BatchNorms' affine parameters require grad, so they must be optimised
    (they were handed to no optimiser, so Branch-tuning's "BN not frozen" ablation could not run)."""
    run = _run(tmp_path, strategy="branch", bn="train")
    run_dir = run.run().parent
    before, after = (_bn_affine(safetensors.torch.load_file(ckpt.task_dir(run_dir, t) / "model.safetensors")) for t in (0, 1))
    assert before and all(not torch.equal(before[k], after[k]) for k in before)


def test_branch_optimiser_groups_batchnorm_without_decay_and_branches_with_their_own(tmp_path):
    run = _run(tmp_path, strategy="branch", bn="train", branch_weight_decay=0.0)
    learner = run.new_learner()
    run.prepare_task(learner, 1)
    optimizer, _ = run.make_optimizer(learner, total=4, warmup=1)
    branch_group, kept = optimizer.param_groups[1], optimizer.param_groups[2]
    bn_params = {id(p) for m in learner.backbone.modules() if is_batchnorm(m) for p in m.parameters(recurse=False)}
    assert bn_params <= {id(p) for p in kept["params"]} and kept["weight_decay"] == 0 and kept["lars_exclude"]
    assert branch_group["weight_decay"] == 0.0 and len(branch_group["params"]) > 0
    assert optimizer.param_groups[0]["weight_decay"] > 0  # the projector's kernels keep the recipe's decay


def test_param_groups_branch_decay():
    branch, kernel = torch.nn.Parameter(torch.zeros(2, 2, 3)), torch.nn.Parameter(torch.zeros(2, 2))
    groups = param_groups([("branch.x", branch), ("method.w", kernel)], 1e-4, branch_weight_decay=0.0)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups] == [([id(kernel)], 1e-4), ([id(branch)], 0.0)]
    assert [len(g["params"]) for g in param_groups([("branch.x", branch)], 1e-4)] == [1]  # default: decayed like kernels


def test_paper_preset_fills_only_unset_fields():
    paper = TrainConfig(preset="paper", data=["cifar100:/data/c.npz"]).with_preset()
    assert (paper.shape, paper.bn, paper.branch_weight_decay, paper.zero_init_last, paper.optimizer) == (
        "cross-pair", "affine", 0.0, False, "lars")
    assert paper.normalization == "cifar100"
    assert TrainConfig(preset="paper", data=["cifar10:/d"]).with_preset().normalization == "cifar10"
    assert TrainConfig(preset="paper").with_preset().normalization == "imagenet"  # digits: no CIFAR statistics
    mine = TrainConfig(preset="paper", bn="frozen", shape="cross").with_preset()
    assert (mine.shape, mine.bn, mine.branch_weight_decay) == ("cross", "frozen", 0.0)
    library = TrainConfig().with_preset()
    assert (library.shape, library.bn, library.normalization, library.optimizer) == ("cross", "frozen", "imagenet", None)
    assert set(PRESETS["paper"]) >= set(PRESETS["library"])  # the paper sets every field the library defaults
    with pytest.raises(ValueError, match="preset='authors' is not one of library, paper"):
        TrainConfig(preset="authors").validate()


def test_paper_preset_run_records_its_settings_and_exports_stock_timm(tmp_path):
    run = _run(tmp_path, strategy="branch", preset="paper", method="moco")
    assert run.eval_transform.mean.flatten().tolist() == pytest.approx(NORMALIZATIONS["imagenet"][0])  # digits: ImageNet's
    backbone = run.new_backbone()
    last_bns = [b.bn2.weight for stage in (backbone.layer1, backbone.layer4) for b in stage]
    assert all((w == 1).all() for w in last_bns)  # zero_init_last=False: no zeroed last BN
    final = run.run()
    saved = TrainConfig.from_yaml(final.parent / "config.yaml")
    assert (saved.preset, saved.shape, saved.bn, saved.branch_weight_decay, saved.optimizer) == (
        "paper", "cross-pair", "affine", 0.0, "lars")
    assert "zero_init_last" not in json.loads((final / "config.json").read_text())
    model = timm.create_model(f"local-dir:{final}", pretrained=True, num_classes=0)
    reference = safetensors.torch.load_file(final / "model.safetensors")
    assert set(model.state_dict()) == set(reference)


def test_normalization_reaches_both_transforms(tmp_path):
    run = _run(tmp_path, normalization="cifar100")
    for transform in (run.eval_transform, run.augment.view1, run.augment.view2):
        assert transform.mean.flatten().tolist() == pytest.approx(NORMALIZATIONS["cifar100"][0])
        assert transform.std.flatten().tolist() == pytest.approx(NORMALIZATIONS["cifar100"][1])


def test_zero_init_last_for_a_model_without_it_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="zero_init_last=False does not apply to mobilenetv3_small_050"):
        _run(tmp_path, model="mobilenetv3_small_050", zero_init_last=False)


def test_online_probe_batches_come_from_every_class_not_the_task(tmp_path):
    """CaSSLe trains its online probe on a parallel loader over the whole labelled training set;
    the probe saw only the current task's labels here before."""
    run = _run(tmp_path, online_probe=True, batch_size=64)
    gen = torch.Generator().manual_seed(0)
    images, labels = run.probe_batch(gen)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8
    task0 = set(run.scenario.tasks[0].classes)
    assert set(labels.tolist()) - task0  # classes of the later task too, while task 0 trains
    rows = [int(torch.nonzero((run.images == img).flatten(1).all(1))[0]) for img in images[:4]]
    assert labels[:4].tolist() == run.labels[rows].tolist()  # each image with its own label


def test_online_probe_leaves_the_ssl_training_unchanged(tmp_path):
    """The probe reads detached, eval-mode features from its own generator: the backbone a run
    trains is the same with and without it."""
    weights = []
    for probe in (False, True):
        final = _run(tmp_path / str(probe), online_probe=probe, num_tasks=1, strategy="finetune").run()
        weights.append(safetensors.torch.load_file(final / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_branch_lr_scale_gives_the_branches_their_own_scheduled_rate(tmp_path):
    run = _run(tmp_path, strategy="branch", branch_lr_scale=5.0)
    learner = run.new_learner()
    run.prepare_task(learner, 1)
    optimizer, scheduler = run.make_optimizer(learner, total=4, warmup=0)
    branch_group = optimizer.param_groups[1]
    assert branch_group["lr"] == pytest.approx(5 * run.lr) and optimizer.param_groups[0]["lr"] == pytest.approx(run.lr)
    assert branch_group["weight_decay"] == optimizer.param_groups[0]["weight_decay"]  # decay as the kernels'
    optimizer.step()
    scheduler.step()
    assert branch_group["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(5.0)  # the schedule scales both
