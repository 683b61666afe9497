"""Layer-wise linear CKA between two timm models: the stability/plasticity analysis of Branch-tuning.

``timm-branch cka``: loads the models and the images, runs the protocol of
:mod:`timm_branch.evaluate.cka_compare`, prints the mean CKA per layer type and writes
``cka.json`` and ``cka.png`` (:mod:`timm_branch.evaluate.cka_plot`). A bad argument stops with
``timm-branch cka: <what is wrong>`` and exit status 1.

Usage (:func:`configure_parser`, :func:`run_command`)::

    timm-branch cka MODEL_A MODEL_B --data digits [--classes 0 1 2] --output out/
    timm-branch cka --stability PREV CUR --plasticity CUR JOINT --data digits \\
        --old-classes 0 1 2 3 --new-classes 4 5 --output out/
    timm-branch cka --stability RUN/task-0 RUN/task-1 --plasticity RUN/task-1 JOINT/task-1 \\
        --run RUN --task 1 --output out/

A MODEL is ``local-dir:PATH``, ``hf-hub:org/name``, an existing folder (a run's ``task-K``,
read as ``local-dir:``) or a plain timm architecture name, created with ``pretrained=False``
and random weights seeded by ``--seed`` (for tests; two equal names give equal models). Models
are created with ``num_classes=0``. Images come from ``--data`` (a
:func:`~timm_branch.data.load_source` spec, default ``digits``), its test split (``--split``;
the train split when the source has none), restricted to ``--classes`` (one curve) or
``--old-classes`` / ``--new-classes`` (stability / plasticity). ``--run RUN_DIR --task K``
instead takes the data, image size and task split of a ``timm-branch train`` run (its
``config.yaml``; ``--data`` and ``--image-size`` override them): old = the images of tasks
``0..K-1``, new = those of task ``K``. ``--num-images N`` keeps a random subset (seeded) of each set.
An image folder is listed, not decoded up front: only the images compared are decoded, so a folder
larger than memory (a run trained with ``--stream``) works with ``--num-images``.
``--layers`` takes regular expressions on module names, ``--types`` the layer types. The
evaluation transform is :class:`~timm_branch.data.EvalTransform` at ``--image-size`` (default:
the run's, else 32). ``--output DIR`` writes ``cka.json`` (every curve: layers, types, mean,
std, per-repeat values, mean per type) and ``cka.png``; the mean CKA per layer type is printed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..evaluate.cka_compare import CKAResult, compare_models, save_results
from ..evaluate.cka_plot import plot_cka
from ..evaluate.hooks import LAYER_TYPES, select_layers

if TYPE_CHECKING:  # the data package is imported where it is used
    from ..data import ImageFiles

__all__ = ["configure_parser", "run_command"]


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``timm-branch cka`` arguments to ``parser`` (see the module docstring)."""
    parser.description = parser.description or "Layer-wise linear CKA between timm models (Branch-tuning analysis)."
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="two models to compare: local-dir:PATH, hf-hub:org/name, a folder (task-K) or a timm name")
    parser.add_argument("--stability", nargs=2, metavar=("PREV", "CUR"),
                        help="stability curve: model after task t-1 vs after task t, on old-task images")
    parser.add_argument("--plasticity", nargs=2, metavar=("CUR", "JOINT"),
                        help="plasticity curve: model after task t vs jointly trained, on new-task images")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="data source spec (digits, cifar100:ROOT, .npz, folder); default digits or the run's")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="split to take images from (train when the source has no test split)")
    parser.add_argument("--classes", nargs="+", type=int, metavar="C", help="one-curve mode: only these classes")
    parser.add_argument("--old-classes", nargs="+", type=int, metavar="C", help="stability images: these classes")
    parser.add_argument("--new-classes", nargs="+", type=int, metavar="C", help="plasticity images: these classes")
    parser.add_argument("--run", type=Path, metavar="RUN_DIR",
                        help="take data, image size and task split from a timm-branch train run")
    parser.add_argument("--task", type=int, metavar="K", help="with --run: old = tasks 0..K-1, new = task K")
    parser.add_argument("--num-images", type=int, metavar="N", help="random subset of N images per set (seeded)")
    parser.add_argument("--layers", nargs="+", metavar="REGEX", help="module-name patterns (re.fullmatch)")
    parser.add_argument("--types", nargs="+", choices=LAYER_TYPES, default=list(LAYER_TYPES),
                        help="layer types to compare (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="shuffled passes over the images (default 10)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per minibatch (default 128)")
    parser.add_argument("--image-size", type=int, default=None, help="evaluation resolution (default: the run's, else 32)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling, subset and random-init seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output", type=Path, metavar="DIR", help="write DIR/cka.json and DIR/cka.png")
    parser.add_argument("--title", default=None, help="plot title (default: the models each curve compares)")
    return parser


def _fail(message: str):
    raise SystemExit(f"timm-branch cka: {message}")


def _load_model(spec: str, seed: int, device: torch.device) -> nn.Module:
    import timm

    if spec.startswith(("local-dir:", "hf-hub:")):
        model = timm.create_model(spec, pretrained=True, num_classes=0)
    elif Path(spec).is_dir():
        model = timm.create_model(f"local-dir:{Path(spec)}", pretrained=True, num_classes=0)
    else:
        if not timm.is_model(spec):
            _fail(f"{spec!r} is neither local-dir:PATH, hf-hub:NAME, an existing folder nor a timm architecture")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(spec, pretrained=False, num_classes=0)
    return model.to(device).eval()


def _split_of(source, which: str):
    split = source.test if which == "test" and source.test is not None else source.train
    return split


def _source(spec: str, size: int):
    """:func:`~timm_branch.data.load_source`, a folder listed, not decoded (see :func:`_decoded`)."""
    from ..data import is_folder_spec, load_source

    return load_source(spec, size, stream=is_folder_spec(spec))


def _decoded(images: Tensor | ImageFiles) -> Tensor:
    """The uint8 pixels of the images chosen: a tensor as it is, a folder's files decoded."""
    return images if isinstance(images, Tensor) else images.decode()


def _subset(images: Tensor | ImageFiles, num: int | None, seed: int) -> Tensor | ImageFiles:
    if num is None or num >= images.shape[0]:
        return images
    if num < 4:
        _fail(f"--num-images must be at least 4, got {num}")
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:num]
    return images[keep.sort().values]


def _by_classes(split, classes: Sequence[int] | None, what: str) -> Tensor | ImageFiles:
    if classes is None:
        return split.images
    if split.labels is None:
        _fail(f"{what}: the data is unlabeled, classes cannot be chosen")
    mask = torch.isin(split.labels, torch.as_tensor(list(classes), dtype=torch.int64))
    if int(mask.sum()) == 0:
        _fail(f"{what}: no image of classes {list(classes)}")
    return split.images[mask]


def _images_from_run(args) -> tuple[Tensor | ImageFiles | None, Tensor | ImageFiles, int, list[str]]:
    """(old images, new images, image size, data specs) of task ``args.task`` of the run ``args.run``."""
    from ..data import build_scenario
    from ..train.config import TrainConfig

    config_path = args.run / "config.yaml"
    if not config_path.is_file():
        _fail(f"{config_path} not found: --run needs a folder made by timm-branch train")
    if args.task is None:
        _fail("--run needs --task K")
    config = TrainConfig.from_yaml(config_path)
    size = args.image_size or config.image_size
    specs = [args.data] if args.data else list(config.data)
    sources = [_source(spec, size) for spec in specs]
    scenario = build_scenario(config.scenario, sources if config.scenario == "domain" else sources[0],
                              None if config.scenario == "domain" else config.num_tasks, config.split_seed)
    if not 0 <= args.task < len(scenario):
        _fail(f"--task {args.task} is not a task of this run (0..{len(scenario) - 1})")
    use_test = args.split == "test" and scenario.source.test is not None
    split = scenario.source.test if use_test else scenario.source.train

    def indices(task) -> Tensor:
        return task.test if use_test else task.train

    new = split.images[indices(scenario.tasks[args.task])]
    old = None
    if args.task > 0:
        old = split.images[torch.cat([indices(t) for t in scenario.tasks[: args.task]]).sort().values]
    return old, new, size, specs


def _print_summary(results: Mapping[str, CKAResult]) -> None:
    kinds = [t for t in (*LAYER_TYPES, "other") if any(t in r.types for r in results.values())]
    print("| curve | layers | " + " | ".join(kinds) + " | all |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for name, r in results.items():
        by_type = r.by_type()
        finite = [m for m in r.mean if math.isfinite(m)]
        cells = [f"{by_type[k]:.3f}" if k in by_type else "-" for k in kinds]
        overall = f"{np.mean(finite):.3f}" if finite else "-"
        print(f"| {name} | {len(r.layers)} | " + " | ".join(cells) + f" | {overall} |")


def run_command(args: argparse.Namespace) -> int:
    """Run ``timm-branch cka`` with parsed ``args``; returns the exit status (0)."""
    from ..data import EvalTransform

    pair_mode = bool(args.models)
    curve_mode = args.stability is not None or args.plasticity is not None
    if pair_mode == curve_mode:
        _fail("give either two MODELs, or --stability PREV CUR and/or --plasticity CUR JOINT")
    if pair_mode and len(args.models) != 2:
        _fail(f"compare exactly two models, got {len(args.models)}")
    if args.run is not None and pair_mode:
        _fail("--run/--task choose old and new task images: use them with --stability/--plasticity")
    if args.task is not None and args.run is None:
        _fail("--task needs --run RUN_DIR")
    if args.repeats < 1 or args.batch_size < 4:
        _fail("--repeats must be >= 1 and --batch-size >= 4")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    # images
    if args.run is not None:
        old, new, size, data = _images_from_run(args)
        if args.stability is not None and old is None:
            _fail("--task 0 has no old tasks: the stability curve needs --task >= 1")
    else:
        size = args.image_size or 32
        data = [args.data or "digits"]
        source = _source(data[0], size)
        split = _split_of(source, args.split)
        if pair_mode:
            images = _by_classes(split, args.classes, "--classes")
        else:
            old = new = None
            if args.stability is not None:
                if args.old_classes is None:
                    _fail("--stability needs the old-task images: --old-classes C ... or --run RUN_DIR --task K")
                old = _by_classes(split, args.old_classes, "--old-classes")
            if args.plasticity is not None:
                if args.new_classes is None:
                    _fail("--plasticity needs the new-task images: --new-classes C ... or --run RUN_DIR --task K")
                new = _by_classes(split, args.new_classes, "--new-classes")
    transform = EvalTransform(size).to(device)

    # models, each spec loaded once
    cache: dict[str, nn.Module] = {}

    def model(spec: str) -> nn.Module:
        if spec not in cache:
            cache[spec] = _load_model(spec, args.seed, device)
        return cache[spec]

    kwargs = dict(batch_size=args.batch_size, repeats=args.repeats, seed=args.seed)

    def layers_for(a: nn.Module, b: nn.Module) -> list[str] | None:
        if args.layers is None and list(args.types) == list(LAYER_TYPES):
            return None
        in_b = set(select_layers(b, args.layers, args.types))
        return [n for n in select_layers(a, args.layers, args.types) if n in in_b]

    results: dict[str, CKAResult] = {}
    try:
        if pair_mode:
            a, b = (model(s) for s in args.models)
            images = _decoded(_subset(images, args.num_images, args.seed))
            results["cka"] = compare_models(a, b, images, transform, layers=layers_for(a, b), **kwargs)
            results["cka"].meta.update(model_a=args.models[0], model_b=args.models[1])
        else:
            curves = (("stability", args.stability, old, "old-task"), ("plasticity", args.plasticity, new, "new-task"))
            for key, specs, pool, images_name in curves:
                if specs is None:
                    continue
                a, b = (model(spec) for spec in specs)
                imgs = _decoded(_subset(pool, args.num_images, args.seed))
                results[key] = compare_models(a, b, imgs, transform, layers=layers_for(a, b), **kwargs)
                results[key].meta.update(model_a=specs[0], model_b=specs[1], images=images_name)
    except ValueError as err:
        _fail(str(err))

    _print_summary(results)
    if args.output is not None:
        meta = {"data": data, "run": None if args.run is None else str(args.run), "task": args.task,
                "split": args.split, "image_size": size}
        json_path = save_results(results, Path(args.output) / "cka.json", meta)
        png_path = plot_cka(results, Path(args.output) / "cka.png", title=args.title or _title(results))
        print(f"wrote {json_path} and {png_path}")
    return 0


def _title(results: dict[str, CKAResult]) -> str:
    """The plot's default title: each curve with the two models it compares."""
    return "Linear CKA: " + "; ".join(f"{name} {r.meta['model_a']} vs {r.meta['model_b']}" for name, r in results.items())
