"""The model card (``README.md``) written next to an exported model."""
from __future__ import annotations

from torch import nn

_ABOUT = (
    "Branch-tuning (Liu, Zhu, Liu, arXiv 2403.18266) continues self-supervised training on new data "
    "by giving every convolution that feeds a BatchNorm a trainable branch while the original kernels "
    "and the BatchNorm layers stay frozen. After each task the branches are folded back into the "
    "kernels, so this checkpoint is a stock timm model."
)


def render_model_card(model: nn.Module, history: list[dict]) -> str:
    """A Markdown model card with YAML front matter for a merged timm model.

    Args:
        model: the exported timm model (its ``pretrained_cfg`` names the architecture, source
            weights and licence).
        history: one entry per merged task, as :func:`timm_branch.history.branch_history` gives.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch = cfg.get("architecture") or type(model).__name__
    source = cfg.get("hf_hub_id") or cfg.get("tag")
    licence = cfg.get("license") or "other"
    front = ["---", "library_name: timm", f"license: {licence}", "tags:"]
    front += [f"- {tag}" for tag in ("timm", "timm-branch", "branch-tuning", "continual-learning", "self-supervised-learning")]
    if cfg.get("hf_hub_id"):
        front.append(f"base_model: {cfg['hf_hub_id']}")
    front.append("---")
    lines = front + ["", f"# {arch} (Branch-tuning)", "", _ABOUT, "", f"- Architecture: `{arch}`"]
    lines.append(f"- Source weights: `{source}`" if source else "- Source weights: not recorded")
    lines += ["", "## Branch history", ""]
    if history:
        lines += ["| task | branch shape | BatchNorm | branches |", "|---|---|---|---|"]
        lines += [f"| {i} | {h['shape']} | {h['bn']} | {h['branches']} |" for i, h in enumerate(history)]
    else:
        lines.append("No merged branches recorded.")
    lines += [
        "",
        "## Usage",
        "",
        "Plain timm loads this folder; timm-branch is not needed:",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:/path/to/this/folder", pretrained=True)',
        "```",
        "",
    ]
    return "\n".join(lines)
