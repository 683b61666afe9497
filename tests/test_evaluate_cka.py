"""Linear CKA (unbiased HSIC, minibatch form): estimator properties, model comparison, plot, CLI."""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from _helpers import randomise_batchnorm
from timm_branch.data import EvalTransform
from timm_branch.evaluate.cka import (
    CKAResult,
    MinibatchCKA,
    compare_models,
    configure_parser,
    gram_linear,
    hsic_unbiased,
    linear_cka,
    load_results,
    plot_cka,
    run_command,
    save_results,
    stability_plasticity,
)
from timm_branch.evaluate.cka import _u_center

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- numpy references, written from the formulas --------------------------------------------------


def _np_hsic_ustat(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC1 as the U-statistic of Song et al. (2012), summing over distinct index tuples."""
    n = K.shape[0]
    t1 = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    return t1 + t2 - 2 * t3


def _np_hsic_closed(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al.'s closed form, on zero-diagonal copies."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    value = np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ L @ one)
    return value / (n * (n - 3))


def _np_cka(X: np.ndarray, Y: np.ndarray, hsic=_np_hsic_closed) -> float:
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def _np_biased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


# -- the estimator ----------------------------------------------------------------------------------


def test_hsic_against_the_u_statistic_and_closed_form():
    X, Y = _randn(6, 4, seed=1), _randn(6, 3, seed=2)
    K, L = (X @ X.T).numpy(), (Y @ Y.T).numpy()
    brute = _np_hsic_ustat(K, L)
    assert _np_hsic_closed(K, L) == pytest.approx(brute, rel=1e-10)
    assert float(hsic_unbiased(torch.from_numpy(K), torch.from_numpy(L))) == pytest.approx(brute, rel=1e-10)
    u = float((_u_center(torch.from_numpy(K)) * _u_center(torch.from_numpy(L))).sum()) / (6 * 3)
    assert u == pytest.approx(brute, rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(_np_cka(X.numpy(), Y.numpy(), _np_hsic_ustat), rel=1e-10)
    # the inputs' diagonals are left alone
    assert torch.equal(torch.from_numpy(K).diagonal(), (X @ X.T).diagonal())


def test_direct_cka_against_numpy_on_small_matrices():
    for seed, (n, p, q) in enumerate([(5, 2, 7), (9, 12, 3), (16, 8, 8)]):
        X = _randn(n, p, seed=seed)
        Y = torch.tanh(X @ _randn(p, q, seed=seed + 10)) + 0.3 * _randn(n, q, seed=seed + 20)
        assert linear_cka(X, Y) == pytest.approx(_np_cka(X.numpy(), Y.numpy()), rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="n > 3"):
        linear_cka(_randn(3, 4), _randn(3, 4))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(_randn(5, 4), _randn(6, 4))


def test_cka_of_a_representation_with_itself_is_one():
    X = _randn(40, 10, 3, 3, seed=3)  # (n, C, H, W): flattened per sample
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X.float(), X.float()) == pytest.approx(1.0, abs=1e-12)  # float64 inside


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    X = _randn(50, 20, seed=4)
    Y = torch.relu(X @ _randn(20, 30, seed=5)) + 0.5 * _randn(50, 30, seed=6)
    Qx = torch.linalg.qr(_randn(20, 20, seed=7)).Q
    Qy = torch.linalg.qr(_randn(30, 30, seed=8)).Q
    reference = linear_cka(X, Y)
    assert 0.1 < reference < 0.99
    for a, b in [(X @ Qx, Y), (X, Y @ Qy), (3.7 * X, Y), (X, 0.01 * Y), (-2.0 * X @ Qx, 5.0 * Y @ Qy),
                 (X + 4.0, Y - 1.0)]:  # the unbiased estimator is centred: feature means do not matter
        assert linear_cka(a, b) == pytest.approx(reference, rel=1e-9)
    # not vacuous: a non-isotropic scaling changes it
    scale = torch.linspace(0.1, 3.0, 20, dtype=torch.float64)
    assert abs(linear_cka(X * scale, Y) - reference) > 1e-3


def test_near_zero_for_independent_features():
    """Under independence HSIC1 has expectation exactly 0, and as a degenerate U-statistic its
    spread shrinks like 1/n: for isotropic Gaussian features std(HSIC1(K, L)) ~ sqrt(2 p q) / n,
    while HSIC1(K, K) ~ p and HSIC1(L, L) ~ q, so std(CKA) ~ sqrt(2) / n = 0.007 at n = 200
    (measured: 0.0049 at n = 256 over 40 seeds). The bound 0.05 is about 7 standard deviations.
    The biased estimator on the same data is about p / (p + n) = 0.6, far from 0."""
    n, p, q = 200, 300, 300
    for seed in range(3):
        X, Y = _randn(n, p, seed=100 + seed), _randn(n, q, seed=200 + seed)
        assert abs(linear_cka(X, Y)) < 0.05
        assert _np_biased_cka(X.numpy(), Y.numpy()) > 0.4


def test_minibatch_accumulator():
    X, Y = _randn(12, 5, seed=9), _randn(12, 7, seed=10)
    one = MinibatchCKA()
    assert math.isnan(one.result())
    one.update(X, Y)
    assert one.result() == pytest.approx(linear_cka(X, Y), rel=1e-12)
    # several batches of different sizes: sum of HSIC1 terms, then the ratio
    batches = [(_randn(10, 4, seed=s), _randn(10, 6, seed=s + 50)) for s in range(2)] + [(_randn(7, 4, seed=3), _randn(7, 6, seed=4))]
    acc = MinibatchCKA()
    sums = np.zeros(3)
    for A, B in batches:
        acc.update_grams(gram_linear(A), gram_linear(B))
        K, L = (A @ A.T).numpy(), (B @ B.T).numpy()
        sums += [_np_hsic_closed(K, L), _np_hsic_closed(K, K), _np_hsic_closed(L, L)]
    assert acc.batches == 3
    assert acc.result() == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), rel=1e-10)
    # a constant representation has no defined CKA
    const = MinibatchCKA()
    const.update(torch.ones(8, 3), X[:8])
    assert math.isnan(const.result())


# -- comparing models -------------------------------------------------------------------------------


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    return randomise_batchnorm(model, torch.Generator().manual_seed(seed)).eval()  # no zero-init (constant) BN


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_model_against_itself_is_one_everywhere(images):
    model = _resnet()
    transform = EvalTransform(16)
    for other, batch_size in ((model, 12), (copy.deepcopy(model), 24)):
        result = compare_models(model, other, images, transform, batch_size=batch_size, repeats=2, seed=3)
        assert len(result.layers) == 46 and len(result.values) == 2
        np.testing.assert_allclose(result.mean, 1.0, atol=1e-9)
        np.testing.assert_allclose(result.std, 0.0, atol=1e-9)
    assert set(result.types) == {"conv", "bn", "act", "block"}
    order = result.layers  # the forward's order: downsample before the residual ReLU, block last
    assert order.index("layer2.0.downsample.2") < order.index("layer2.0.act2") < order.index("layer2.0")
    assert result.meta["images_per_repeat"] == 24 and result.meta["repeats"] == 2
    assert result.meta["batch_size"] == 24


def test_flags_restored_and_nothing_changes(images):
    model = _resnet()
    model.train()
    model.layer1.eval()  # mixed modes come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare_models(model, _resnet(1), images, EvalTransform(16), batch_size=24, repeats=1)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: no BatchNorm statistics updated
    assert all(p.grad is None for p in model.parameters())
    assert all(-1 - 1e-9 <= m <= 1 + 1e-9 for m in result.mean)

    def broken(x):
        raise RuntimeError("transform failed")

    with pytest.raises(RuntimeError, match="transform failed"):
        compare_models(model, _resnet(1), images, broken, batch_size=12, repeats=1)
    assert [m.training for m in model.modules()] == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_only_shared_layers_and_any_widths(images):
    def net(width: int, extra: bool) -> nn.Module:
        torch.manual_seed(width)
        layers = [nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                  nn.Sequential(nn.Conv2d(width, width + 2, 3), nn.ReLU())]
        return nn.Sequential(*layers, *([nn.Conv2d(width + 2, 3, 1)] if extra else []))

    a, b = net(4, extra=True), net(9, extra=False)
    result = compare_models(a, b, images, EvalTransform(16), batch_size=24, repeats=1)
    assert result.layers == ["0", "1", "2", "3.0", "3.1", "3"]
    assert result.types == ["conv", "bn", "act", "conv", "act", "block"]
    assert result.meta["skipped_layers"] == ["4"]
    assert all(0.0 < m <= 1.0 for m in result.mean)
    explicit = compare_models(a, b, images, EvalTransform(16), layers=["3", "0", "nope"], batch_size=24, repeats=1)
    assert explicit.layers == ["0", "3"] and explicit.meta["skipped_layers"] == ["nope"]
    with pytest.raises(ValueError, match="no layer to compare"):
        compare_models(a, b, images, EvalTransform(16), layers=["4"], repeats=1)
    with pytest.raises(ValueError, match="more than 3 images"):
        compare_models(a, b, images[:3], EvalTransform(16))
    with pytest.raises(ValueError, match="uint8"):
        compare_models(a, b, images.float(), EvalTransform(16))


def test_stability_plasticity(images):
    prev, cur, joint = _resnet(0), _resnet(1), _resnet(2)
    layers = ["act1", "layer1.0", "layer2.0.bn1", "layer4.0"]
    kw = dict(layers=layers, batch_size=12, repeats=2)
    curves = stability_plasticity(prev, cur, joint, images[:12], images[12:], EvalTransform(16), **kw)
    assert list(curves) == ["stability", "plasticity"]
    direct = compare_models(prev, cur, images[:12], EvalTransform(16), **kw)
    assert curves["stability"].mean == direct.mean and curves["stability"].layers == layers
    assert "old-task" in curves["stability"].meta["pair"] and "new-task" in curves["plasticity"].meta["pair"]
    only = stability_plasticity(None, cur, joint, None, images[12:], EvalTransform(16), **kw)
    assert list(only) == ["plasticity"]
    with pytest.raises(ValueError, match="old_images"):
        stability_plasticity(prev, cur, None, None, images, EvalTransform(16))


# -- results, JSON and plot ---------------------------------------------------------------------------


def test_json_round_trip_and_plot(tmp_path):
    a = CKAResult(layers=["conv1", "bn1", "act1", "layer1.0"], types=["conv", "bn", "act", "block"],
                  mean=[0.9, float("nan"), 0.7, 0.6], std=[0.01, float("nan"), 0.02, 0.0],
                  values=[[0.89, float("nan"), 0.68, 0.6], [0.91, float("nan"), 0.72, 0.6]], meta={"repeats": 2})
    b = CKAResult(layers=["conv1", "bn1", "extra", "act1"], types=["conv", "bn", "other", "act"],
                  mean=[0.5, 0.6, 0.4, 0.3], std=[0.0] * 4, values=[[0.5, 0.6, 0.4, 0.3]])
    d = a.to_dict()
    json.dumps(d, allow_nan=False)  # NaN written as null
    assert d["mean"][1] is None and d["mean_by_type"] == {"conv": 0.9, "act": 0.7, "block": 0.6}
    back = CKAResult.from_dict(json.loads(json.dumps(d)))
    assert back.layers == a.layers and math.isnan(back.mean[1]) and back.values[1][0] == 0.91
    a.save_json(tmp_path / "one.json")
    assert load_results(tmp_path / "one.json")["cka"].mean[0] == 0.9
    save_results({"stability": a, "plasticity": b}, tmp_path / "cka.json", meta={"task": 1})
    loaded = load_results(tmp_path / "cka.json")
    assert list(loaded) == ["stability", "plasticity"] and loaded["plasticity"].layers == b.layers
    out = plot_cka({"stability": a, "plasticity": b}, tmp_path / "plots" / "cka.png", title="t")
    assert out.read_bytes().startswith(PNG)
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["cka.png"]  # no temporary left behind


# -- command line --------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    return configure_parser(argparse.ArgumentParser(prog="timm-branch cka")).parse_args(argv)


FAST = ["--image-size", "16", "--batch-size", "16", "--repeats", "1"]


def test_cli_two_models_on_digits(tmp_path, capsys):
    args = _parse(["test_resnet", "test_resnet", "--data", "digits", "--classes", "0", "1", "2",
                   "--num-images", "32", "--output", str(tmp_path), *FAST])
    assert run_command(args) == 0
    data = json.loads((tmp_path / "cka.json").read_text())
    curve = data["curves"]["cka"]
    assert curve["meta"]["num_images"] == 32 and curve["meta"]["model_a"] == "test_resnet"
    # equal seeded random models: 1 everywhere, except the zero-initialised last BNs of the
    # blocks (constant output: undefined, null)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    modules = dict(model.named_modules())
    for name, mean in zip(curve["layers"], curve["mean"]):
        if mean is None:
            assert not modules[name].weight.any(), name
        else:
            assert mean == pytest.approx(1.0, abs=1e-9), name
    assert (tmp_path / "cka.png").read_bytes().startswith(PNG)
    assert "| cka |" in capsys.readouterr().out


def test_cli_stability_and_plasticity_from_classes(tmp_path):
    from timm.models import save_for_hf

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"task-{seed}"
        save_for_hf(_resnet(seed), folder, safe_serialization=True)
        folders.append(folder)
    args = _parse(["--stability", "test_resnet", f"local-dir:{folders[0]}", "--plasticity", f"local-dir:{folders[0]}",
                   str(folders[1]), "--layers", "act1", "layer\\d\\.0", "--types", "act", "block",
                   "--old-classes", "0", "1", "--new-classes", "2", "--num-images", "16",
                   "--output", str(tmp_path / "out"), *FAST])
    assert run_command(args) == 0
    curves = load_results(tmp_path / "out" / "cka.json")
    assert list(curves) == ["stability", "plasticity"]
    for curve in curves.values():
        assert curve.layers == ["act1", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
        assert all(0.0 < m < 1.0 - 1e-6 for m in curve.mean)  # different models


def test_cli_images_from_a_run(tmp_path):
    from timm_branch.train.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig(data=["digits"], num_tasks=5, image_size=16).to_yaml())
    args = _parse(["--stability", "test_resnet", "test_resnet", "--plasticity", "test_resnet", "test_resnet",
                   "--run", str(run), "--task", "2", "--layers", "layer4.*", "--types", "bn",
                   "--output", str(tmp_path / "out"), "--batch-size", "128", "--repeats", "1"])
    assert run_command(args) == 0
    data = json.loads((tmp_path / "out" / "cka.json").read_text())
    old, new = data["curves"]["stability"]["meta"], data["curves"]["plasticity"]["meta"]
    assert data["meta"]["image_size"] == 16 and data["meta"]["task"] == 2 and data["meta"]["data"] == ["digits"]
    assert 120 < old["num_images"] < 170 and 60 < new["num_images"] < 85  # 4 and 2 of 10 digit classes (359 test images)


def test_cli_decodes_only_the_folder_images_it_compares(tmp_path):
    """A folder is listed, not decoded: a broken file of a class not compared is never read."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    (tmp_path / "imgs" / "2" / "5.png").write_bytes(b"\x89PNG garbage")
    argv = ["test_resnet", "test_resnet", "--data", str(tmp_path / "imgs"), "--num-images", "16",
            "--output", str(tmp_path / "out"), *FAST]
    assert run_command(_parse([*argv, "--classes", "0", "1"])) == 0
    assert json.loads((tmp_path / "out" / "cka.json").read_text())["curves"]["cka"]["meta"]["num_images"] == 16
    with pytest.raises(SystemExit, match=r"cannot read image .*5\.png"):
        run_command(_parse([*argv, "--classes", "2"]))


@pytest.mark.parametrize("argv, message", [
    ([], "either two MODELs"),
    (["test_resnet"], "exactly two"),
    (["a", "b", "--stability", "c", "d"], "either two MODELs"),
    (["--stability", "test_resnet", "test_resnet"], "--old-classes"),
    (["--plasticity", "test_resnet", "test_resnet", "--task", "1"], "--task needs --run"),
    (["not_a_model_name", "test_resnet"], "neither local-dir"),
])
def test_cli_usage_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        run_command(_parse([*argv, "--image-size", "16"]))
