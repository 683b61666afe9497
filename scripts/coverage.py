"""Write docs/COVERAGE.md: which convs of one model per timm family get a branch, and why not.

    python scripts/coverage.py            # writes docs/COVERAGE.md
    python scripts/coverage.py --select   # reruns the model selection, prints the lists for tests/zoo.py

The model lists come from ``tests/zoo.py``. The table is built from ``timm_branch.pairs._pairing`` on
each model (``pretrained=False``, float32, CPU, a batch of 2 at the input size the tests use).

``--select`` builds every model of every ``timm.list_modules()`` family on the ``meta`` device (no
memory, no weights), counts its parameters and picks, per family, the model with the fewest parameters
that has at least one conv -> BatchNorm pair with ``add_branches``' defaults; for a family without one,
the smallest model with a pair under the widest ``norms``/``through`` (``WIDEST``), and for a family
without even that, the reason. Models alike in every module class (widths aside) are paired once. It
also sorts out the models that need a specific input size and the ones whose pairing falls back (with
the defaults and with the widest settings). It takes about fifteen minutes on two CPU cores; writing
the table, about three.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
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
    UNBRANCHABLE_FAMILIES,
    WIDENED_FAMILY_MODELS,
)
from timm_branch import PairingFallbackWarning  # noqa: E402
from timm_branch.bn import is_batchnorm  # noqa: E402
from timm_branch.pairs import DEFAULT_NORMS, DEFAULT_THROUGH, NORM_KINDS, THROUGH_KINDS, _pairing, is_conv, norm_kind  # noqa: E402


def _quiet_create(name: str, device: str | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device is None:
            return timm.create_model(name, pretrained=False)
        with torch.device(device):
            return timm.create_model(name, pretrained=False)


DEFAULTS: dict[str, tuple[str, ...]] = {"norms": DEFAULT_NORMS, "through": DEFAULT_THROUGH}
WIDEST: dict[str, tuple[str, ...]] = {"norms": NORM_KINDS, "through": THROUGH_KINDS}
"""The widest ``add_branches`` pairing: every norm kind, through every kind of op."""


def _pair_on_meta(model: nn.Module, size: tuple[int, int], **pairing):
    """``_pair`` on a meta-device model, with an empty batch of ``size``."""
    return _pair(model, torch.empty(2, 3, *size, device="meta"), **pairing)


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


@dataclasses.dataclass(frozen=True)
class _Built:
    """What the selection needs to know of one model, read off its meta-device build."""

    params: int
    name: str
    kinds: frozenset[str]  # the norm kinds add_branches can pair with ("batch", "layer", "group")
    has_conv: bool
    norm_types: frozenset[str]  # class names of every norm layer, selectable or not (for reasons)
    structure: int  # hash of the module classes in order: models equal in it differ only in widths

    @property
    def pairable(self) -> bool:
        return self.has_conv and bool(self.kinds)


def _built(name: str) -> _Built:
    model = _quiet_create(name, "meta")
    modules = list(model.modules())
    return _Built(
        params=sum(p.numel() for p in model.parameters()),
        name=name,
        kinds=frozenset(kind for m in modules if (kind := norm_kind(m)) is not None),
        has_conv=any(is_conv(m) for m in modules),
        # Norm layers by name: "norm" in the class name, no conv inside (not ConvNormAct, NormFreeBlock).
        norm_types=frozenset(type(m).__name__ for m in modules
                             if "norm" in type(m).__name__.lower() and not any(is_conv(c) for c in m.modules())),
        structure=hash(tuple(type(m).__name__ for m in modules)),
    )


def _first_paired(rows: list[_Built], family: str, **pairing) -> str | None:
    """The first model of ``rows`` with a conv -> norm pair under ``pairing``; a structure is tried once."""
    seen: set[int] = set()
    for row in rows:
        if row.structure in seen:
            continue
        seen.add(row.structure)
        model = _quiet_create(row.name, "meta")
        try:
            pairs, _, _ = _pair_on_meta(model, tuple(model.pretrained_cfg["input_size"][1:]), **pairing)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"# {family}: pairing {row.name} failed on meta: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if pairs:
            return row.name
    return None


def _why_unpaired(rows: list[_Built]) -> str:
    """Why no model of a family has a conv -> norm pair, even with the widest settings."""
    if not any(row.has_conv for row in rows):
        return f"{len(rows)} models, none with a convolution"
    pairable = [row for row in rows if row.pairable]
    if not pairable:
        types = sorted(set().union(*(row.norm_types for row in rows)))
        uses = f"they normalise with {', '.join(types)} only" if types else "no norm layer at all (normaliser-free)"
        return f"{len(rows)} models with convs, none with a BatchNorm, LayerNorm or GroupNorm: {uses}"
    return (f"{len(pairable)} models with convs and norm layers, none with a conv feeding one even through "
            f"activations and convs ({pairable[0].name}: {_common_reasons(pairable[0].name, **WIDEST)})")


def _common_reasons(name: str, **pairing) -> str:
    """The two most common reasons the pairing leaves convs of the model ``name`` (built on meta) unpaired."""
    model = _quiet_create(name, "meta")
    _, reasons, _ = _pair_on_meta(model, tuple(model.pretrained_cfg["input_size"][1:]), **pairing)
    return "; ".join(f"{n} convs {r}" for r, n in collections.Counter(reasons.values()).most_common(2))


def _print_literal(declaration: str, entries: dict | list, params: dict[str, int] | None = None) -> None:
    """Print ``declaration = {...}`` (or ``[...]``) for tests/zoo.py, a model's size beside it with ``params``."""
    is_dict = isinstance(entries, dict)
    print(f"{declaration} = {'{' if is_dict else '['}")
    for key in entries:
        note = f"  # {params[entries[key]] / 1e6:.2f} M params" if params else ""
        print(f"    {key!r}: {entries[key]!r},{note}" if is_dict else f"    {key!r},")
    print("}\n" if is_dict else "]\n")


def select() -> None:
    """Rerun the selection and print the dicts for tests/zoo.py."""
    start = time.time()
    families: dict[str, list[_Built]] = {}
    for family in timm.list_modules():
        families[family] = sorted((_built(name) for name in timm.list_models(module=family)), key=lambda r: (r.params, r.name))
        print(f"# {family}: {len(families[family])} models built on meta ({time.time() - start:.0f} s)", file=sys.stderr)

    chosen: dict[str, str] = {}
    no_pair: dict[str, str] = {}
    no_bn: list[str] = []
    widened: dict[str, str] = {}
    unbranchable: dict[str, str] = {}
    for family, rows in families.items():
        with_bn = [row for row in rows if "batch" in row.kinds]
        name = _first_paired(with_bn, family, **DEFAULTS) if with_bn else None
        if name is not None:
            chosen[family] = name
            continue
        if with_bn:
            no_pair[family] = (f"{len(with_bn)} models with BatchNorm, none with a conv feeding one "
                               f"({with_bn[0].name}: {_common_reasons(with_bn[0].name)})")
        else:
            no_bn.append(family)
        name = _first_paired([row for row in rows if row.pairable], family, **WIDEST)
        if name is not None:
            widened[family] = name
        else:
            unbranchable[family] = _why_unpaired(rows)
        print(f"# {family}: widest {name} ({time.time() - start:.0f} s)", file=sys.stderr)

    sizes: dict[str, tuple[int, int]] = {}
    fallback: list[str] = []
    wide_fallback: list[str] = []
    for name in sorted({*chosen.values(), *widened.values(), *SPECIAL_MODELS}):
        model = _quiet_create(name, "meta")
        size = _input_size_for(model)
        if size is not None:
            sizes[name] = size
        if name not in widened.values() and _pair_on_meta(model, size or DEFAULT_INPUT_SIZE)[2]:
            fallback.append(name)
        if _pair_on_meta(model, size or DEFAULT_INPUT_SIZE, **WIDEST)[2]:
            wide_fallback.append(name)

    params = {row.name: row.params for rows in families.values() for row in rows}
    _print_literal("FAMILY_MODELS: dict[str, str]", chosen, params)
    _print_literal("NO_PAIR_FAMILIES: dict[str, str]", no_pair)
    _print_literal("NO_BATCHNORM_FAMILIES: list[str]", no_bn)
    _print_literal("WIDENED_FAMILY_MODELS: dict[str, str]", widened, params)
    _print_literal("UNBRANCHABLE_FAMILIES: dict[str, str]", unbranchable)
    _print_literal("INPUT_SIZES: dict[str, tuple[int, int]]", sizes)
    _print_literal("FALLBACK_MODELS: list[str]", fallback)
    _print_literal("WIDE_FALLBACK_MODELS: list[str]", wide_fallback)
    print(f"# selection took {time.time() - start:.0f} s", file=sys.stderr)


def _pair(model: nn.Module, x: torch.Tensor, **pairing):
    """``_pairing`` of ``model`` on the batch ``x``; returns (pairs, reasons, fell_back)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs, reasons = _pairing(model, x, **pairing)
    return pairs, reasons, any(issubclass(w.category, PairingFallbackWarning) for w in caught)


def _why(reasons: dict[str, str]) -> str:
    counted = collections.Counter(reasons.values())
    return "<br>".join(f"{n} × {reason}" for reason, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))) or "–"


def _tally(values: list[str]) -> str:
    """``["layer", "layer", "batch"]`` -> ``"batch 1, layer 2"``."""
    return ", ".join(f"{kind} {n}" for kind, n in sorted(collections.Counter(values).items())) or "–"


def _row(family: str, name: str, widened: bool) -> str:
    """A table row: the default pairing and the widest one's count, or (``widened``) the widest pairing in detail."""
    model = _quiet_create(name).eval()
    size = INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    modules = dict(model.named_modules())
    convs = sum(1 for m in modules.values() if is_conv(m))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    wide, wide_reasons, wide_fell_back = _pair(model, x, **WIDEST)
    if widened:
        kinds = [_tally([norm_kind(m) for m in modules.values() if norm_kind(m) is not None])]
        fed = _tally(["+".join(sorted({norm_kind(modules[n]) for n in pair.norms})) for pair in wide])
        return (f"| {family} | `{name}` | {params:.2f} | {convs} | {kinds[0]} | {len(wide)} | {fed} | "
                f"{_tally([pair.path for pair in wide])} | {len(wide_reasons)} | {_why(wide_reasons)} | "
                f"{'yes' if wide_fell_back else ''} |")
    pairs, reasons, fell_back = _pair(model, x)
    bns = sum(1 for m in modules.values() if is_batchnorm(m))
    return (
        f"| {family} | `{name}` | {params:.2f} | {convs} | {bns} | {len(pairs)} | "
        f"{len(reasons)} | {_why(reasons)} | {'yes' if fell_back else ''} | {len(wide)} |"
    )


def write(out: Path) -> None:
    header = (
        "| family | model | params (M) | convs | BatchNorms | paired convs | convs without a branch "
        "| why (count × reason) | fallback | paired convs, widest |\n|---|---|---:|---:|---:|---:|---:|---|---|---:|"
    )
    total = len(timm.list_modules())
    lines = [
        "# Coverage: which convs get a branch",
        "",
        f"Generated by `python scripts/coverage.py` with timm {timm.__version__} and torch "
        f"{torch.__version__.split('+')[0]} on {datetime.date.today().isoformat()}; do not edit by hand.",
        "",
        f"Every one of timm's {total} model families (`timm.list_modules()`) is in one of three sections: "
        "branched with `add_branches`' defaults (a conv feeds a BatchNorm through shape-only ops and "
        "elementwise activations), branched only with wider `norms`/`through`, or not branched at all, with "
        "the reason. Each family is shown by its smallest model that pairs (see `tests/zoo.py`), then special "
        "variants. *Paired convs* get a branch; the other convs are listed with the reason the pairing left "
        "them out. *Widest* is `norms=(\"batch\", \"layer\", \"group\"), through=(\"shape\", \"act\", \"conv\")`. "
        "*fallback*: part of the model could not be FX-traced, and its convs were paired by the "
        "conservative fallback rule (a `PairingFallbackWarning`). Counts are for `pretrained=False` models "
        f"and a batch at {DEFAULT_INPUT_SIZE[0]}x{DEFAULT_INPUT_SIZE[1]} (or the size the model needs). "
        "`tests/test_coverage.py` checks every model here with the widest settings (`pytest -m slow`), in "
        "float64: branched output equals the original, merged output equals the branched one, and merging "
        "restores the stock model. The paper studied BatchNorm only: branching in front of LayerNorm or "
        "GroupNorm is this project's extension, with no accuracy claim until it has been measured.",
        "",
        f"## Families with BatchNorm ({len(FAMILY_MODELS) + len(NO_PAIR_FAMILIES)} of {total})",
        "",
        header,
    ]
    for family, name in sorted(FAMILY_MODELS.items()):
        print(f"{family}: {name}", file=sys.stderr)
        lines.append(_row(family, name, widened=False))
    if NO_PAIR_FAMILIES:
        lines += ["", "Families with BatchNorm but no conv feeding one:", ""]
        lines += [f"- **{family}**: {reason}" for family, reason in sorted(NO_PAIR_FAMILIES.items())]
    lines += [
        "",
        f"## Families branched only with wider norms/through ({len(WIDENED_FAMILY_MODELS)} of {total})",
        "",
        "No conv of these families feeds a BatchNorm by default (most have none); with the widest settings "
        "their smallest model below pairs. *fed norms* and *through* count the paired convs by the kinds of "
        "norm layer they feed and by the widest kind of op on the way: together, the `norms` and `through` a "
        "model needs (e.g. `add_branches(model, norms=(\"layer\",))` where all are `layer` through `shape`).",
        "",
        "| family | model | params (M) | convs | norm layers | paired convs, widest | fed norms | through "
        "| convs without a branch | why (count × reason) | fallback |",
        "|---|---|---:|---:|---|---:|---|---|---:|---|---|",
    ]
    for family, name in sorted(WIDENED_FAMILY_MODELS.items()):
        print(f"{family}: {name} (widened)", file=sys.stderr)
        lines.append(_row(family, name, widened=True))
    lines += ["", "## Special variants", "", header]
    for name in SPECIAL_MODELS:
        print(f"special: {name}", file=sys.stderr)
        lines.append(_row(_family_of(name), name, widened=False))
    lines += [
        "",
        f"## Families that cannot be branched ({len(UNBRANCHABLE_FAMILIES)} of {total})",
        "",
        "No model of these families has a conv whose output reaches a BatchNorm, LayerNorm or GroupNorm "
        "through shape-only ops, activations and convs, so `add_branches` finds nothing to branch even "
        "with the widest settings (models alike in every module class but widths were tried once):",
        "",
        *[f"- **{family}**: {reason}" for family, reason in sorted(UNBRANCHABLE_FAMILIES.items())],
        "",
        f"## Families without BatchNorm ({len(NO_BATCHNORM_FAMILIES)})",
        "",
        "No model of these families has a BatchNorm layer, so `add_branches` with its default `norms` raises "
        "`NoBatchNormError`; those in the two sections above say whether wider settings branch them.",
        "",
        ", ".join(f"`{family}`" for family in NO_BATCHNORM_FAMILIES),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
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
