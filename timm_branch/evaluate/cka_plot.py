"""The PNG plot of layer-wise CKA curves (:class:`~timm_branch.evaluate.cka_compare.CKAResult`).

Drawn like :mod:`timm_branch.evaluate.plots`: on a :class:`matplotlib.figure.Figure` with its own
Agg canvas, never through ``pyplot``, and written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .._io import atomic_write

if TYPE_CHECKING:
    from .cka_compare import CKAResult

__all__ = ["plot_cka"]

_TYPE_STYLE = {
    "conv": ("tab:blue", "o"),
    "bn": ("tab:orange", "s"),
    "act": ("tab:green", "^"),
    "block": ("tab:red", "D"),
    "other": ("tab:gray", "x"),
}
_CURVE_STYLE = [("black", "-"), ("tab:purple", "--"), ("tab:brown", ":"), ("tab:olive", "-."), ("tab:cyan", "-")]


def _merged_order(results: Mapping[str, CKAResult]) -> list[str]:
    """All layers of all curves, each curve's order kept (a layer new to the list goes right
    after the curve's previous layer)."""
    order: list[str] = []
    for result in results.values():
        last = -1
        for name in result.layers:
            if name in order:
                last = order.index(name)
            else:
                order.insert(last + 1, name)
                last += 1
    return order


def plot_cka(results: Mapping[str, CKAResult], path: str | Path, title: str | None = None) -> Path:
    """Plot named CKA curves to a PNG at ``path`` (written atomically); returns the path.

    x: layer index (execution order, all curves on one axis); y: mean CKA with a band of +- one
    std; one line style per curve; a marker per layer whose shape and colour give its type
    (legend at the bottom); block outputs are named on the top axis. Layers with an undefined
    CKA (NaN: constant output) leave a gap in the line and a grey cross at the bottom. ``title``
    heads the figure; without one, ``"Layer-wise linear CKA: <curve names>"``.
    """
    if not results:
        raise ValueError("plot_cka needs at least one curve")
    order = _merged_order(results)
    index = {name: i for i, name in enumerate(order)}
    kinds: dict[str, str] = {}
    for result in results.values():
        kinds.update(zip(result.layers, result.types))

    fig = Figure(figsize=(max(6.0, min(30.0, 2.0 + 0.14 * len(order))), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curve_handles = []
    any_undefined = False
    for k, (name, result) in enumerate(results.items()):
        colour, style = _CURVE_STYLE[k % len(_CURVE_STYLE)]
        x = np.array([index[n] for n in result.layers], dtype=float)
        mean = np.asarray(result.mean, dtype=float)
        std = np.asarray(result.std, dtype=float)
        ax.plot(x, mean, color=colour, linestyle=style, linewidth=1.2, zorder=2)
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0, zorder=1)
        for kind, (tcolour, marker) in _TYPE_STYLE.items():
            sel = np.array([t == kind for t in result.types], dtype=bool)
            if sel.any():
                ax.scatter(x[sel], mean[sel], color=tcolour, marker=marker, s=22, zorder=3,
                           edgecolors="none" if marker != "x" else None)
        undefined = ~np.isfinite(mean)
        if undefined.any():
            ax.plot(x[undefined], np.full(int(undefined.sum()), 0.03), transform=ax.get_xaxis_transform(),
                    marker="x", color="tab:gray", linestyle="none", markersize=5, zorder=3)
            any_undefined = True
        label = name
        finite = mean[np.isfinite(mean)]
        if finite.size:
            label += f" (mean {finite.mean():.3f})"
        curve_handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
    used_types = [t for t in _TYPE_STYLE if t in kinds.values()]
    type_handles = [Line2D([], [], color=_TYPE_STYLE[t][0], marker=_TYPE_STYLE[t][1], linestyle="none", label=t)
                    for t in used_types]
    if any_undefined:
        type_handles.append(Line2D([], [], color="tab:gray", marker="x", linestyle="none",
                                   label="undefined (constant output)"))
    ax.set_xlabel("layer index (forward order)")
    ax.set_ylabel("linear CKA")
    ax.set_xlim(-0.5, len(order) - 0.5)
    low = min([0.0] + [float(np.nanmin(np.asarray(r.mean, float) - np.asarray(r.std, float)))
                       for r in results.values() if np.isfinite(np.asarray(r.mean, float)).any()])
    ax.set_ylim(min(low - 0.05, 0.0), 1.05)
    ax.grid(True, alpha=0.3)
    blocks = [(index[n], n) for n in order if kinds.get(n) == "block"]
    if blocks and len(blocks) <= 60:
        top = ax.secondary_xaxis("top")
        top.set_xticks([i for i, _ in blocks], labels=[n for _, n in blocks], rotation=90, fontsize=6)
        for i, _ in blocks:
            ax.axvline(i, color=_TYPE_STYLE["block"][0], alpha=0.12, linewidth=0.8, zorder=0)
    fig.suptitle(title or f"Layer-wise linear CKA: {', '.join(results)}")
    fig.legend(handles=curve_handles + type_handles, loc="outside lower center",
               ncol=min(len(curve_handles) + len(type_handles), 7), fontsize=8, frameon=False)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
