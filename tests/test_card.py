"""The model card: YAML front matter that parses, the task history table, an explicit licence."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_branch as tb
from timm_branch.card import (
    DEFAULT_LICENSE,
    PLOT_FILE,
    TAGS,
    parse_front_matter,
    read_run,
    render_folder_card,
    render_model_card,
)
from timm_branch.evaluate.metrics import ContinualMetrics

# A PNG signature and nothing else: enough for "the plot is present".
FAKE_PNG = b"\x89PNG\r\n\x1a\n"


def merged_test_resnet(tasks: int = 1, seed: int = 0, shape: str = "cross") -> torch.nn.Module:
    """``test_resnet`` after ``tasks`` rounds of add_branches / perturb / merge, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        tb.add_branches(model, shape=shape)
        with torch.no_grad():
            for branch in tb.branch_parameters(model):
                branch.copy_(torch.randn(branch.shape, generator=gen) * 1e-2)
        tb.merge_branches(model)
    return model.eval()


def fabricate_run(run: Path, tasks: int = 2, plot: bool = True, data: str = "cifar10:/home/someone/private/data") -> Path:
    """A finished run folder like the trainer writes: config.yaml, task-K/ folders, metrics.json."""
    run.mkdir(parents=True, exist_ok=True)
    config = {"model": "test_resnet", "pretrained": "test_resnet.r160_in1k", "data": [data], "scenario": "class",
              "num_tasks": tasks, "method": "simclr", "strategy": "branch", "shape": "cross", "bn": "frozen",
              "epochs": 3, "seed": 0, "output": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metrics = ContinualMetrics(num_tasks=tasks, task_classes=[[2 * k, 2 * k + 1] for k in range(tasks)],
                               meta={k: config[k] for k in ("strategy", "method", "model", "shape", "bn", "data", "scenario")})
    for k in range(tasks):
        folder = run / f"task-{k}"
        tb.save_pretrained(merged_test_resnet(tasks=k + 1), folder)
        (folder / "trainer_state.safetensors").write_bytes(b"not pushed")
        (folder / "task.json").write_text(json.dumps({"task": k, "strategy": "branch", "method": "simclr",
                                                      "branches": True, "cassle": False}))
        per_task = [0.9 if j <= k else 0.25 for j in range(tasks)]
        metrics.add(k, knn_top1=0.5 + 0.125 * k, linear_top1=0.625 + 0.125 * k, knn_per_task=per_task,
                    linear_per_task=per_task)
    metrics.save(run)
    if plot:
        (run / PLOT_FILE).write_bytes(FAKE_PNG)
    return run


def test_front_matter_parses_and_has_the_metadata():
    card = render_model_card(merged_test_resnet(), repo_id="org/name")
    assert card.startswith("---\nlibrary_name: timm\n")
    meta = parse_front_matter(card)
    assert meta["library_name"] == "timm"
    assert set(TAGS) <= set(meta["tags"]) and "timm-branch" in meta["tags"]
    assert meta["license"] == "apache-2.0"  # test_resnet's pretrained_cfg
    assert 'timm.create_model("hf-hub:org/name", pretrained=True)' in card
    assert "arXiv 2403.18266" in card and "`test_resnet`" in card


def test_a_bare_model_claims_no_base_model(tmp_path):
    """timm gives a pretrained=False model its architecture's default pretrained_cfg: that names
    weights it may never have loaded, so neither render_model_card nor save_pretrained claims them."""
    model = merged_test_resnet()
    for card in (render_model_card(model), (tb.save_pretrained(model, tmp_path / "out") / "README.md").read_text()):
        assert "base_model" not in parse_front_matter(card)
        assert "- Source weights: not recorded (the architecture's default weights are `timm/test_resnet.r160_in1k`" in card
    named = render_model_card(model, base_model="timm/test_resnet.r160_in1k")
    assert parse_front_matter(named)["base_model"] == "timm/test_resnet.r160_in1k"


def test_licence_is_always_explicit(caplog):
    model = merged_test_resnet()
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "license"}
    assert parse_front_matter(render_model_card(model))["license"] == DEFAULT_LICENSE == "other"
    assert parse_front_matter(render_model_card(model, license="mit"))["license"] == "mit"
    # A base model's licence binds derived weights: a different argument is ignored, with a warning.
    model.pretrained_cfg["license"] = "apache-2.0"
    with caplog.at_level(logging.WARNING, logger="timm_branch.card"):
        assert parse_front_matter(render_model_card(model, license="mit"))["license"] == "apache-2.0"
    assert "ignored" in caplog.text


def test_history_table_from_the_model():
    card = render_model_card(merged_test_resnet(tasks=2))
    rows = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(rows) == 2
    assert rows[0].startswith("| 0 | cross | frozen | 15 |") and rows[1].startswith("| 1 | cross | frozen | 15 |")
    no_history = render_model_card(timm.create_model("test_resnet", pretrained=False))
    assert "No merged branches recorded." in no_history


def test_folder_card_reads_the_run(tmp_path):
    run = fabricate_run(tmp_path / "run")
    card = render_folder_card(run / "task-1", repo_id="org/name", plot_name=PLOT_FILE)
    meta = parse_front_matter(card)
    assert meta["datasets"] == ["uoft-cs/cifar10"]
    assert meta["base_model"] == "timm/test_resnet.r160_in1k" and meta["license"] == "apache-2.0"
    rows = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells == ["1", "cross", "frozen", "15", "cifar10; class-incremental task 1 (of tasks 0-1) (classes 2, 3)", "simclr",
                     "branch", "3", "62.50%", "75.00%"]
    assert f"![top-1 accuracy after each task]({PLOT_FILE})" in card
    assert "/home/someone" not in card  # local paths stay private
    # An earlier task's card stops at that task, although metrics.json has later rows.
    early = render_folder_card(run / "task-0")
    assert "| 0 | cross | frozen | 15 |" in early and "| 1 |" not in early and PLOT_FILE not in early
    assert "- knn after task 0: average accuracy 90.00%" in early  # the summary stops there too


def test_read_run_tolerates_missing_files(tmp_path):
    info = read_run(tmp_path)
    assert info.config == {} and info.metrics is None and info.tasks == [] and info.plot is None
    (tmp_path / "config.yaml").write_text("data: [digits]\nmethod: byol\nstrategy: finetune\nepochs: 2\n")
    card = render_model_card(merged_test_resnet(), run_dir=tmp_path, upto_task=0)
    meta = parse_front_matter(card)
    assert "datasets" not in meta  # digits has no Hub dataset id
    assert "| 0 | none | trained | – | digits |" in card.replace("earlier 0", "")


def test_parse_front_matter_rejects_bad_cards():
    for text in ("# no front matter\n", "---\nlicense: [unclosed\n---\n", "---\nlicense: mit\n", "---\n- a list\n---\n"):
        with pytest.raises(ValueError):
            parse_front_matter(text)
