"""Draw docs/branch_tuning.png, the README's figure: one Branch-tuning task, and the branch shapes.

    python scripts/figure.py             # writes docs/branch_tuning.png

Top: during a task, every conv that feeds a BatchNorm runs with ``W + dW``: ``W`` and the BatchNorm
are frozen, the zero-initialised branch ``dW`` trains; after the task ``dW`` is folded into ``W``
and the model is a stock timm model again. Bottom: the taps a branch trains in a 3x3 kernel for
each ``shape``. Matplotlib only; the PNG carries no timestamp or version metadata.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch, Rectangle  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "branch_tuning.png"
FROZEN, TRAINED, STOCK = "#d9d9d9", "#f5a623", "#9ecae1"


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="black", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "") -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.2))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", fontsize=8, style="italic")


def task_panel(ax) -> None:
    """Training a task (left) and merging after it (right)."""
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4)
    ax.axis("off")
    ax.text(0.1, 3.75, "during task t (t >= 1; every task with --pretrained)", fontsize=10, weight="bold")
    box(ax, 0.2, 2.4, 2.2, 0.8, "kernel W\nfrozen", FROZEN)
    box(ax, 0.2, 0.9, 2.2, 0.8, "branch dW\ntrained, starts at 0", TRAINED)
    ax.text(3.0, 2.05, "+", fontsize=18, ha="center", va="center")
    arrow(ax, (2.45, 2.8), (2.85, 2.2))
    arrow(ax, (2.45, 1.3), (2.85, 1.9))
    box(ax, 3.4, 1.6, 1.8, 0.9, "conv with\nW + dW", FROZEN)
    arrow(ax, (5.25, 2.05), (5.75, 2.05))
    box(ax, 5.8, 1.6, 1.6, 0.9, "BatchNorm\nfrozen", FROZEN)
    ax.text(3.4, 0.95, "any SSL loss, any optimiser;\nno old data, no old model", fontsize=8, va="top")

    ax.text(8.1, 3.75, "after the task", fontsize=10, weight="bold")
    arrow(ax, (7.5, 2.05), (8.3, 2.05), "merge")
    box(ax, 8.4, 1.6, 1.6, 0.9, "conv\nW' = W + dW", STOCK)
    arrow(ax, (10.05, 2.05), (10.35, 2.05))
    box(ax, 10.4, 1.6, 1.4, 0.9, "BatchNorm", STOCK)
    ax.text(8.4, 1.35, "a stock timm model again:\nsave_pretrained, push_to_hub,\ntimm.create_model(...)", fontsize=8, va="top")


def shapes_panel(axes) -> None:
    """The trained taps (orange) of a 3x3 kernel for each branch shape."""
    trained = {"1x1": {(1, 1)}, "cross": {(1, 0), (1, 1), (1, 2), (0, 1), (2, 1)},
               "full": {(r, c) for r in range(3) for c in range(3)}}
    for ax, (shape, taps) in zip(axes, trained.items()):
        for r in range(3):
            for c in range(3):
                ax.add_patch(Rectangle((c, 2 - r), 1, 1, fc=TRAINED if (r, c) in taps else FROZEN, ec="black"))
        ax.set_xlim(-0.1, 3.1)
        ax.set_ylim(-0.1, 3.1)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f'shape="{shape}": {len(taps)} tap{"s" * (len(taps) > 1)}', fontsize=9)


def main() -> None:
    fig = plt.figure(figsize=(10, 4.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[2.2, 1], hspace=0.25)
    task_panel(fig.add_subplot(grid[0, :]))
    shapes_panel([fig.add_subplot(grid[1, i]) for i in range(3)])
    legend = [Patch(fc=FROZEN, ec="black", label="frozen"), Patch(fc=TRAINED, ec="black", label="trained"),
              Patch(fc=STOCK, ec="black", label="merged: stock timm layers")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.savefig(OUTPUT, dpi=110, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
