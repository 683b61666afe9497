"""Write docs/COVERAGE.md: which convs of one model per timm family get a branch, and why not.

    python scripts/coverage.py            # writes docs/COVERAGE.md
    python scripts/coverage.py --select   # reruns the model selection, prints the lists for tests/zoo.py

The model lists come from ``tests/zoo.py``. The table is built from ``timm_branch.pairs._pairing`` on
each model (``pretrained=False``, float32, CPU, a batch of 2 at the input size the tests use).

``--select`` builds every model of every ``timm.list_modules()`` family on the ``meta`` device (no
memory, no weights), counts its parameters and picks, per family, the model with the fewest parameters
that has at least one conv -> BatchNorm pair. It also sorts out the families without such a pair,
the models that need a specific input size and the ones whose pairing falls back. It takes about ten
minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.zoo import (  # noqa: E402
    DEFAULT_INPUT_SIZE,
    FAMILY_MODELS,
    INPUT_SIZES,
    NO_BATCHNORM_FAMILIES,
    NO_PAIR_FAMILIES,
    SPECIAL_MODELS,
)
from timm_branch import PairingFallbackWarning  # noqa: E402
from timm_branch.bn import is_batchnorm  # noqa: E402
from timm_branch.pairs import _pairing, is_conv  # noqa: E402


def _quiet_create(name: str, device: str | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device is None:
            return timm.create_model(name, pretrained=False)
        with torch.device(device):
            return timm.create_model(name, pretrained=False)


def _pair_on_meta(model: nn.Module, size: tuple[int, int]):
    """``_pairing`` on a meta-device model; returns (pairs, reasons, fell_back)."""
    x = torch.empty(2, 3, *size, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs, reasons = _pairing(model, x)
    return pairs, reasons, any(issubclass(w.category, PairingFallbackWarning) for w in caught)


def _accepts(model: nn.Module, size: tuple[int, int]) -> bool:
    """Whether a forward pass at ``size`` runs (shape checks only: the model is on ``meta``)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()(torch.empty(2, 3, *size, device="meta"))
        return True
    except Exception:
        return False


def _input_size_for(model: nn.Module) -> tuple[int, int] | None:
    """``None`` when the default size works, else the size the model needs."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    native = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    if not cfg.get("fixed_input_size", False) and _accepts(model, DEFAULT_INPUT_SIZE):
        return None
    for side in (96, 128, 160, 192):
        if side < native[0] and _accepts(model, (side, side)):
            return (side, side)
    return native


def select() -> None:
    """Rerun the selection and print the dicts for tests/zoo.py."""
    start = time.time()
    families: dict[str, list[tuple[int, str, bool]]] = {}
    for family in timm.list_modules():
        rows = []
        for name in timm.list_models(module=family):
            model = _quiet_create(name, "meta")
            rows.append((sum(p.numel() for p in model.parameters()), name, any(is_batchnorm(m) for m in model.modules())))
            del model
        families[family] = sorted(rows)
        print(f"# {family}: {len(rows)} models built on meta ({time.time() - start:.0f} s)", file=sys.stderr)

    chosen: dict[str, str] = {}
    no_pair: dict[str, str] = {}
    no_bn: list[str] = []
    for family, rows in families.items():
        with_bn = [name for _, name, has_bn in rows if has_bn]
        if not with_bn:
            no_bn.append(family)
            continue
        for name in with_bn:
            model = _quiet_create(name, "meta")
            try:
                pairs, _, _ = _pair_on_meta(model, tuple(model.pretrained_cfg["input_size"][1:]))
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"# {family}: pairing {name} failed on meta: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            if pairs:
                chosen[family] = name
                break
        else:
            model = _quiet_create(with_bn[0], "meta")
            _, reasons, _ = _pair_on_meta(model, tuple(model.pretrained_cfg["input_size"][1:]))
            common = collections.Counter(reasons.values()).most_common(2)
            no_pair[family] = f"{len(with_bn)} models with BatchNorm, none with a conv feeding one ({with_bn[0]}: " + \
                "; ".join(f"{n} convs {r}" for r, n in common) + ")"

    sizes: dict[str, tuple[int, int]] = {}
    fallback: list[str] = []
    for name in sorted({*chosen.values(), *SPECIAL_MODELS}):
        model = _quiet_create(name, "meta")
        size = _input_size_for(model)
        if size is not None:
            sizes[name] = size
        _, _, fell_back = _pair_on_meta(model, size or DEFAULT_INPUT_SIZE)
        if fell_back:
            fallback.append(name)

    print("FAMILY_MODELS: dict[str, str] = {")
    for family, name in chosen.items():
        params = next(n for n, m, _ in families[family] if m == name)
        print(f"    {family!r}: {name!r},  # {params / 1e6:.2f} M params")
    print("}\n\nNO_PAIR_FAMILIES: dict[str, str] = {")
    for family, reason in no_pair.items():
        print(f"    {family!r}: {reason!r},")
    print("}\n\nNO_BATCHNORM_FAMILIES: list[str] = [")
    for family in no_bn:
        print(f"    {family!r},")
    print("]\n\nINPUT_SIZES: dict[str, tuple[int, int]] = {")
    for name, size in sizes.items():
        print(f"    {name!r}: {size!r},")
    print("}\n\nFALLBACK_MODELS: list[str] = [")
    for name in fallback:
        print(f"    {name!r},")
    print("]")
    print(f"# selection took {time.time() - start:.0f} s", file=sys.stderr)


def _row(family: str, name: str) -> str:
    model = _quiet_create(name).eval()
    size = INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs, reasons = _pairing(model, x)
    fell_back = any(issubclass(w.category, PairingFallbackWarning) for w in caught)
    convs = sum(1 for m in model.modules() if is_conv(m))
    bns = sum(1 for m in model.modules() if is_batchnorm(m))
    counted = collections.Counter(reasons.values())
    left = "<br>".join(f"{n} × {reason}" for reason, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))) or "–"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"| {family} | `{name}` | {params:.2f} | {convs} | {bns} | {len(pairs)} | "
        f"{len(reasons)} | {left} | {'yes' if fell_back else ''} |"
    )


def write(out: Path) -> None:
    header = (
        "| family | model | params (M) | convs | BatchNorms | paired convs | convs without a branch "
        "| why (count × reason) | fallback |\n|---|---|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [
        "# Coverage: which convs get a branch",
        "",
        f"Generated by `python scripts/coverage.py` with timm {timm.__version__} and torch "
        f"{torch.__version__.split('+')[0]} on {datetime.date.today().isoformat()}; do not edit by hand.",
        "",
        "One model per `timm.list_modules()` family that has a conv -> BatchNorm pair (the one with the "
        "fewest parameters; see `tests/zoo.py`), then special variants. *Paired convs* get a branch from "
        "`add_branches`; the other convs are listed with the reason `find_conv_bn_pairs` left them out. "
        "*fallback*: part of the model could not be FX-traced, and its convs were paired by the "
        "conservative fallback rule (a `PairingFallbackWarning`). Counts are for `pretrained=False` models "
        f"and a batch at {DEFAULT_INPUT_SIZE[0]}x{DEFAULT_INPUT_SIZE[1]} (or the size the model needs). "
        "`tests/test_coverage.py` checks every model here (`pytest -m slow`): branched output equals the "
        "original, merged output equals the branched one, and merging restores the stock model.",
        "",
        f"## Families with BatchNorm ({len(FAMILY_MODELS) + len(NO_PAIR_FAMILIES)} of {len(timm.list_modules())})",
        "",
        header,
    ]
    for family, name in sorted(FAMILY_MODELS.items()):
        print(f"{family}: {name}", file=sys.stderr)
        lines.append(_row(family, name))
    if NO_PAIR_FAMILIES:
        lines += ["", "Families with BatchNorm but no conv feeding one:", ""]
        lines += [f"- **{family}**: {reason}" for family, reason in sorted(NO_PAIR_FAMILIES.items())]
    lines += ["", "## Special variants", "", header]
    for name in SPECIAL_MODELS:
        print(f"special: {name}", file=sys.stderr)
        lines.append(_row(_family_of(name), name))
    lines += [
        "",
        f"## Families without BatchNorm ({len(NO_BATCHNORM_FAMILIES)})",
        "",
        "No model of these families has a BatchNorm layer (they use LayerNorm, GroupNorm, RMSNorm or are "
        "normaliser-free), so Branch-tuning does not apply: `add_branches` raises `NoBatchNormError`.",
        "",
        ", ".join(f"`{family}`" for family in NO_BATCHNORM_FAMILIES),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


def _family_of(name: str) -> str:
    return next(family for family in timm.list_modules() if name in timm.list_models(module=family))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--select", action="store_true", help="rerun the model selection and print it for tests/zoo.py")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "COVERAGE.md", help="where to write the table")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.select:
        select()
    else:
        write(args.out)


if __name__ == "__main__":
    main()
