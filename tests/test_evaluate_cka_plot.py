"""The CKA curves' plot (timm_branch.evaluate.cka_plot): one PNG, written atomically, layers merged."""
from __future__ import annotations

import pytest

from _helpers import recorded_figures
from timm_branch.evaluate.cka_compare import CKAResult
from timm_branch.evaluate.cka_plot import _merged_order, plot_cka

PNG = b"\x89PNG\r\n\x1a\n"


def _curve(layers: list[str], types: list[str], mean: list[float]) -> CKAResult:
    return CKAResult(layers=layers, types=types, mean=mean, std=[0.0] * len(mean), values=[mean])


def test_plot_of_two_curves_with_an_undefined_layer(tmp_path):
    stability = _curve(["conv1", "bn1", "act1", "layer1.0"], ["conv", "bn", "act", "block"], [0.9, float("nan"), 0.7, 0.6])
    plasticity = _curve(["conv1", "bn1", "extra", "act1"], ["conv", "bn", "other", "act"], [0.5, 0.6, 0.4, 0.3])
    out = plot_cka({"stability": stability, "plasticity": plasticity}, tmp_path / "plots" / "cka.png", title="t")
    assert out.read_bytes().startswith(PNG)
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["cka.png"]  # no temporary left behind


def test_layers_of_all_curves_on_one_axis_in_forward_order():
    a = _curve(["conv1", "act1", "layer1.0"], ["conv", "act", "block"], [1.0] * 3)
    b = _curve(["conv1", "bn1", "act1", "head"], ["conv", "bn", "act", "other"], [1.0] * 4)
    assert _merged_order({"a": a, "b": b}) == ["conv1", "bn1", "act1", "head", "layer1.0"]


def test_no_curve_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one curve"):
        plot_cka({}, tmp_path / "cka.png")


def test_a_plot_without_a_title_names_its_curves(tmp_path, monkeypatch):
    made = recorded_figures(monkeypatch, "timm_branch.evaluate.cka_plot")
    plot_cka({"stability": _curve(["conv1"], ["conv"], [0.9])}, tmp_path / "cka.png")
    assert made[0].get_suptitle() == "Layer-wise linear CKA: stability"
