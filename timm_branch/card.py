"""The model card (``README.md``) of an exported or pushed model.

A card is Markdown with YAML front matter (the Hub's model metadata)::

    library_name: timm
    license: <see below>
    tags: [timm, timm-branch, branch-tuning, continual-learning, self-supervised-learning]
    base_model: <when known>
    datasets: <Hub dataset ids, when known>

and a body: what Branch-tuning is, the base architecture and its source weights, the task
history (one row per task: data, SSL method, strategy, branch shape, BatchNorm policy, epochs,
final kNN / linear-probe top-1), the accuracy plot when the run folder has one, and how to load
the weights with plain timm.

**Licence.** A card always states a licence explicitly. It is the base model's licence from its
``pretrained_cfg["license"]`` (weights derived from licensed weights keep that licence), else
the ``license`` argument, else ``"other"`` (the Hub's value for "see the card"). An explicit
``license`` that differs from the base model's is ignored with a warning.

Where the facts come from: the branch history stored in the model (or in ``config.json``'s
``timm_branch`` key), and, when a run folder is given, its ``config.yaml`` (data, method,
strategy, epochs, source weights), ``metrics.json`` (per-task accuracies) and
``task-K/task.json`` files. :func:`render_model_card` works on an in-memory model,
:func:`render_folder_card` on an exported folder (``RUN/task-K``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LICENSE",
    "PLOT_FILE",
    "TAGS",
    "RunInfo",
    "card_metadata",
    "parse_front_matter",
    "read_run",
    "render_card",
    "render_folder_card",
    "render_model_card",
]

DEFAULT_LICENSE = "other"
PLOT_FILE = "accuracy_curves.png"
TAGS = ("timm", "timm-branch", "branch-tuning", "continual-learning", "self-supervised-learning")

# Data sources of timm_branch.data whose Hub dataset id is known.
_HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
_SCENARIOS = {"class": "class-incremental", "data": "data-incremental", "domain": "domain-incremental"}
_BRANCH_STRATEGIES = ("branch", "cassle+branch")

_ABOUT = (
    "Branch-tuning (Liu, Zhu, Liu, arXiv 2403.18266) continues self-supervised training on new data "
    "by giving every convolution that feeds a BatchNorm a trainable branch while the original kernels "
    "and the BatchNorm layers stay frozen. After each task the branches are folded back into the "
    "kernels, so this checkpoint is a stock timm model."
)


@dataclass
class RunInfo:
    """What a run folder tells about its tasks (any part may be missing).

    Attributes:
        config: ``config.yaml`` as a plain dict ({} when absent).
        metrics: ``metrics.json`` as a dict (``ContinualMetrics.to_dict`` layout), or None.
        tasks: ``task-K/task.json`` of tasks ``0..upto``; ``{}`` for a task without one.
        plot: the path of ``accuracy_curves.png`` when the run folder has one.
    """

    config: dict = field(default_factory=dict)
    metrics: dict | None = None
    tasks: list[dict] = field(default_factory=list)
    plot: Path | None = None


def read_run(run_dir: str | os.PathLike, upto_task: int | None = None) -> RunInfo:
    """Read the card facts of the run folder ``run_dir``, for tasks ``0..upto_task``.

    ``upto_task`` defaults to the last finished task (``task-K`` folders) or the last row of
    ``metrics.json``. Missing or unreadable files are skipped with a log message: a card is still
    written from what is there. ``metrics.json`` is validated with ``ContinualMetrics``.
    """
    run = Path(run_dir)
    info = RunInfo()
    path = run / "config.yaml"
    if path.is_file():
        try:
            info.config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            log.warning("ignoring %s: not valid YAML (%s)", path, err)
    path = run / "metrics.json"
    metrics = None
    if path.is_file():
        try:
            from .evaluate.metrics import ContinualMetrics

            metrics = ContinualMetrics.load(path)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("ignoring %s: %s", path, err)
    if upto_task is None:
        count = 0
        while (run / f"task-{count}").is_dir():
            count += 1
        upto_task = max(count, len(metrics.rows) if metrics is not None else 0) - 1
    for k in range(upto_task + 1):
        path = run / f"task-{k}" / "task.json"
        try:
            info.tasks.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
        except ValueError:
            info.tasks.append({})
    if metrics is not None:
        # The summary too describes the model after upto_task, not the rest of the run.
        metrics.rows = [r for r in metrics.rows if r.task <= upto_task]
        info.metrics = metrics.to_dict()
    if (run / PLOT_FILE).is_file():
        info.plot = run / PLOT_FILE
    return info


# ---------------------------------------------------------------------------------------------
# metadata


def _source_weights(pretrained_cfg: dict, run: RunInfo | None) -> tuple[str | None, str]:
    """``(hub id of the base weights or None, a sentence on where the starting weights came from)``."""
    cfg = run.config if run else {}
    if run and cfg:
        pretrained = cfg.get("pretrained")
        if not pretrained:
            return None, f"random initialisation of `{cfg.get('model')}` (no pretrained weights)"
        if pretrained.startswith("hf-hub:"):
            repo = pretrained[len("hf-hub:"):].split("@")[0]
            return repo, f"`{repo}` on the Hugging Face Hub"
        if pretrained.startswith("local-dir:"):
            return None, "a local folder (not published)"
        name = pretrained
        if "." not in name and pretrained_cfg.get("tag"):
            name = f"{name}.{pretrained_cfg['tag']}"
        return f"timm/{name}", f"timm's pretrained `{name}` (`timm/{name}` on the Hub)"
    # A timm model names its architecture's default weights whether or not it loaded them
    # (pretrained=False keeps the same pretrained_cfg), so they are not claimed as the base model.
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        return None, (f"not recorded (the architecture's default weights are `{hub_id}`, but a timm model does not "
                      "say whether it loaded them; pass base_model to name the starting weights)")
    return None, "not recorded"


def _licence(pretrained_cfg: dict, license: str | None) -> str:
    base = pretrained_cfg.get("license")
    if base:
        if license and license != base:
            log.warning("keeping the base model's licence %r in the card; the license argument %r is ignored", base, license)
        return str(base)
    return str(license) if license else DEFAULT_LICENSE


def _data_specs(run: RunInfo | None) -> list[str]:
    data = (run.config.get("data") if run else None) or ((run.metrics or {}).get("meta", {}).get("data") if run else None)
    if isinstance(data, str):
        data = [data]
    return [str(d) for d in data or []]


def _hub_datasets(specs: Sequence[str]) -> list[str]:
    found = []
    for spec in specs:
        name = spec.partition(":")[0]
        if spec.startswith("hf-hub:") or spec.startswith("hf:"):
            found.append(spec.split(":", 1)[1])
        elif name in _HUB_DATASETS:
            found.append(_HUB_DATASETS[name])
    return list(dict.fromkeys(found))


def _describe_source(spec: str) -> str:
    """A data spec without local paths (``cifar10:/home/me/data`` -> ``cifar10``)."""
    name, sep, _ = spec.partition(":")
    if sep:
        return name
    if spec.endswith(".npz") or os.sep in spec or "/" in spec:
        return Path(spec).name
    return spec


def card_metadata(
    pretrained_cfg: dict,
    *,
    run: RunInfo | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
) -> dict:
    """The YAML front matter of a card, as a dict (keys in the Hub's usual order)."""
    meta: dict[str, Any] = {"library_name": "timm", "license": _licence(pretrained_cfg, license), "tags": list(TAGS)}
    if base_model is None:
        base_model = _source_weights(pretrained_cfg, run)[0]
    if base_model and base_model != repo_id:
        meta["base_model"] = base_model
    found = list(datasets) if datasets is not None else _hub_datasets(_data_specs(run))
    if found:
        meta["datasets"] = found
    return meta


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a card as a dict; ``ValueError`` if it is missing or invalid."""
    if not text.startswith("---\n"):
        raise ValueError("the card does not start with a '---' YAML front matter block")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("the card's YAML front matter is not closed with '---'")
    try:
        meta = yaml.safe_load(text[4:end])
    except yaml.YAMLError as err:
        raise ValueError(f"the card's YAML front matter does not parse: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError("the card's YAML front matter is not a mapping")
    return meta


# ---------------------------------------------------------------------------------------------
# body


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}%"


def _history_rows(history: list[dict], run: RunInfo | None) -> tuple[list[str], list[list[str]]]:
    """Table header and rows; the first four columns are ``task | branch shape | BatchNorm | branches``."""
    header = ["task", "branch shape", "BatchNorm", "branches", "data", "SSL method", "strategy", "epochs",
              "kNN top-1", "linear top-1"]
    if not run or not (run.tasks or (run.metrics and run.metrics.get("rows"))):
        rows = [[str(i), str(h.get("shape")), str(h.get("bn")), str(h.get("branches")), "–", "–", "–", "–", "–", "–"]
                for i, h in enumerate(history)]
        return header, rows
    cfg, metrics = run.config, run.metrics or {}
    meta = metrics.get("meta", {})
    n = max(len(run.tasks), len(metrics.get("rows", [])))
    task_info = run.tasks + [{}] * (n - len(run.tasks))
    strategy_of = [t.get("strategy") or cfg.get("strategy") or meta.get("strategy") for t in task_info]
    branched = [bool(t["branches"]) if "branches" in t else (strategy_of[k] in _BRANCH_STRATEGIES)
                for k, t in enumerate(task_info)]
    # The history's last entries are this run's branched tasks; earlier entries come from the
    # lineage the run started from.
    used = sum(branched)
    earlier, own = (history[: len(history) - used], history[len(history) - used:]) if used <= len(history) else (history, [])
    rows = [[f"earlier {i}", str(h.get("shape")), str(h.get("bn")), str(h.get("branches")), "(earlier lineage)",
             "–", "–", "–", "–", "–"] for i, h in enumerate(earlier)]
    specs = [_describe_source(s) for s in _data_specs(run)]
    scenario = cfg.get("scenario") or meta.get("scenario")
    classes = metrics.get("task_classes")
    by_task = {r["task"]: r for r in metrics.get("rows", [])}
    own_iter = iter(own)
    for k in range(n):
        entry = next(own_iter, None) if branched[k] else None
        data = ", ".join(specs) or "–"
        if scenario:
            total = metrics.get('num_tasks') or cfg.get('num_tasks') or n
            data += f"; {_SCENARIOS.get(scenario, scenario)} task {k} (of tasks 0-{total - 1})"
        if classes and k < len(classes):
            data += f" (classes {', '.join(map(str, classes[k]))})"
        shape = entry.get("shape") if entry else (cfg.get("shape") if branched[k] else "none")
        bn = entry.get("bn") if entry else (cfg.get("bn") if branched[k] else "trained")
        count = entry.get("branches") if entry else "–"
        row = by_task.get(k, {})
        rows.append([
            str(k), str(shape), str(bn), str(count), data,
            str(task_info[k].get("method") or cfg.get("method") or meta.get("method") or "–"),
            str(strategy_of[k] or "–"), str(cfg.get("epochs", "–")),
            _pct(row.get("knn_top1")), _pct(row.get("linear_top1")),
        ])
    return header, rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(
    *,
    architecture: str,
    pretrained_cfg: dict | None = None,
    history: list[dict] | None = None,
    run: RunInfo | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    plot_name: str | None = None,
) -> str:
    """The card text. ``plot_name``: the relative path of the accuracy plot uploaded with the card."""
    cfg = dict(pretrained_cfg or {})
    history = list(history or [])
    meta = card_metadata(cfg, run=run, license=license, base_model=base_model, datasets=datasets, repo_id=repo_id)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    source = _source_weights(cfg, run)[1] if base_model is None else f"`{base_model}`"
    title = repo_id.split("/")[-1] if repo_id else f"{architecture} (Branch-tuning)"
    lines = ["---", front.rstrip("\n"), "---", "", f"# {title}", "", _ABOUT, "",
             f"- Architecture: `{architecture}` (timm)", f"- Source weights: {source}",
             f"- Licence: `{meta['license']}`"]
    if meta.get("datasets"):
        lines.append(f"- Datasets: {', '.join(f'`{d}`' for d in meta['datasets'])}")
    lines += ["", "## Task history", ""]
    header, rows = _history_rows(history, run)
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        if run is not None:
            lines += ["", "Accuracies are top-1 on the test data of all tasks (all classes) after the task, "
                      "from the run's `metrics.json`; `–` means not recorded."]
    else:
        lines.append("No merged branches recorded.")
    summary = ((run.metrics or {}).get("summary") or {}) if run else {}
    finals = [(probe, s) for probe, s in summary.items() if s and s.get("average_accuracy") is not None]
    if run and run.metrics and run.metrics.get("rows") and finals:
        lines += [""]
        last = max(r["task"] for r in run.metrics["rows"])
        for probe, s in finals:
            parts = [f"average accuracy {_pct(s['average_accuracy'])}"]
            if s.get("forgetting") is not None:
                parts.append(f"forgetting {_pct(s['forgetting'])}")
            lines.append(f"- {probe} after task {last}: " + ", ".join(parts))
    if plot_name:
        lines += ["", "## Accuracy", "", f"![top-1 accuracy after each task]({plot_name})"]
    ref = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    lines += [
        "",
        "## Usage",
        "",
        "Plain timm loads these weights; timm-branch is not needed:",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("{ref}", pretrained=True)',
        "model.eval()",
        "```",
        "",
        'A downloaded copy of this repository loads with `timm.create_model("local-dir:/path/to/folder", pretrained=True)`.',
        "",
    ]
    text = "\n".join(lines)
    parse_front_matter(text)  # never publish a card whose metadata does not parse
    return text


def render_model_card(
    model: nn.Module,
    history: list[dict] | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    upto_task: int | None = None,
    run: RunInfo | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    plot_name: str | None = None,
) -> str:
    """The card of an in-memory merged timm model.

    Args:
        model: the exported timm model (its ``pretrained_cfg`` names the architecture, source
            weights and licence).
        history: one entry per merged task (default: :func:`timm_branch.history.branch_history`).
        run_dir: a run folder to read task facts and metrics from (see :func:`read_run`).
        run: those facts given directly, for a run still writing them (instead of ``run_dir``).
        license, base_model, datasets: override what the card would find itself.
        repo_id: the Hub repository the card is for (title and usage snippet).
        plot_name: relative path of an accuracy plot shipped with the card.
    """
    if history is None:
        from .history import branch_history

        history = branch_history(model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch = cfg.get("architecture") or type(model).__name__
    if run_dir is not None:
        run = read_run(run_dir, upto_task)
    return render_card(architecture=arch, pretrained_cfg=cfg, history=history, run=run, license=license,
                       base_model=base_model, datasets=datasets, repo_id=repo_id, plot_name=plot_name)


def render_folder_card(
    folder: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    upto_task: int | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    plot_name: str | None = None,
) -> str:
    """The card of an exported folder (``config.json`` from :func:`timm_branch.save_pretrained`).

    ``run_dir`` defaults to the folder's parent when ``folder`` is named ``task-K`` and the parent
    holds ``config.yaml`` or ``metrics.json``; ``upto_task`` then defaults to ``K``.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if upto_task is None and folder.name.startswith("task-") and folder.name[5:].isdigit():
        upto_task = int(folder.name[5:])
        if run_dir is None and any((folder.parent / f).is_file() for f in ("config.yaml", "metrics.json")):
            run_dir = folder.parent
    run = read_run(run_dir, upto_task) if run_dir is not None else None
    history = (config.get("timm_branch") or {}).get("history") or []
    return render_card(architecture=config.get("architecture", "unknown"), pretrained_cfg=config.get("pretrained_cfg") or {},
                       history=history, run=run, license=license, base_model=base_model, datasets=datasets,
                       repo_id=repo_id, plot_name=plot_name)
