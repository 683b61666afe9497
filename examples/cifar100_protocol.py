"""The CaSSLe / Branch-tuning class-incremental CIFAR-100 protocol, every strategy on one budget, over seeds.

Tasks of CIFAR-100 classes in the papers' order (``seed 5, randperm(100).chunk(T)``), a timm CNN,
one SSL method, and the runs ``finetune``, ``branch``, ``branch-paper`` (Branch-tuning with
``--preset paper``: the authors' settings), ``cassle``, ``cassle+branch`` and the ``joint`` upper
bound, each trained with the same epochs, batch size and image size, for every ``--seeds`` seed.
Each seed's runs go to ``OUTPUT/seed-S/<run>`` with a ``timm-branch report`` table and plots;
runs whose first task is the same computation (every run but ``branch-paper``, whose preset
changes the initialisation and normalisation) start from the ``finetune`` run's task 0 instead of
training it again: the same weights, since each run seeds task 0 alike. With two seeds or more,
``OUTPUT/summary.md`` gives each run's mean ± std over seeds and the
paired differences ``branch - finetune``, ``branch-paper - finetune`` and
``cassle+branch - cassle`` with 95 % intervals.

    python examples/cifar100_protocol.py --data ../shared/data/cifar100.npz            # the paper's budget
    python examples/cifar100_protocol.py --data cifar100.npz --epochs 2 --per-class 100  # reduced
    python examples/cifar100_protocol.py --smoke                                         # seconds, offline
    python examples/cifar100_protocol.py --data cifar100.npz --runs finetune branch \
        --variant branch-bn-train:strategy=branch,bn=train --seeds 0 1 2                # an ablation over seeds

``--data`` is the CIFAR-100 ``.npz`` (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``) or a
torchvision CIFAR-100 root folder. ``--per-class N`` trains on a seeded subset of N training
images per class (written, never committed, under ``--output``; the same subset for every
training seed, chosen by ``--subset-seed``); the test set stays whole unless ``--test-per-class``
says otherwise. Defaults are the paper's: 5 tasks, 500 epochs per task, batch 256, 32 px, LARS
with warmup-cosine and the method's CIFAR recipe. ``--smoke`` makes its own random CIFAR-shaped
data (no ``--data`` needed) and runs 2 tasks of 1 epoch with timm's ``test_resnet``: the
pipeline only, no accuracy.

Geometry: timm's ``resnet18`` keeps its ImageNet stem (7x7 stride-2 conv + max-pool), where the
papers use a CIFAR stem (3x3 stride-1, no pool), so at 32 px its last stage sees 1x1 maps.
``--image-size 128`` upsamples CIFAR once, at load (bilinear), so that the stock ``resnet18``'s
stages see the papers' 32, 16, 8 and 4 px maps, at about 16x the FLOPs of 32 px.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from timm_branch.evaluate import ContinualMetrics
from timm_branch.evaluate.report import report
from timm_branch.evaluate.seeds import seed_summary, seed_table
from timm_branch.train import ContinualRun, TrainConfig

RUNS: dict[str, dict[str, str]] = {
    "finetune": dict(strategy="finetune"),
    "branch": dict(strategy="branch"),
    "branch-paper": dict(strategy="branch", preset="paper"),
    "cassle": dict(strategy="cassle"),
    "cassle+branch": dict(strategy="cassle+branch"),
    "joint": dict(strategy="joint"),
}
"""Each run of the protocol: its ``TrainConfig`` fields beyond the shared budget."""
PAIRS = (("branch", "finetune"), ("branch-paper", "finetune"), ("cassle+branch", "cassle"))
"""The paired differences the summary reports (and each ``--variant`` against ``finetune``)."""
LATER_TASKS_ONLY = frozenset({"strategy", "shape", "bn", "branch_weight_decay", "branch_lr_scale", "distill_weight"})
"""Fields that change nothing in task 0 (no branch and no distillation there): a run that differs
from ``finetune`` only in these shares its first task."""


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:key=value,key=value`` (``TrainConfig`` fields, YAML values) as ``(NAME, fields)``,
    e.g. ``branch-bn-train:strategy=branch,bn=train``."""
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME:key=value[,key=value...], "
                                         "e.g. branch-bn-train:strategy=branch,bn=train")
    fields = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not key=value with a TrainConfig field as key")
        fields[key] = yaml.safe_load(value)
    return name, fields


def write_subset(source: Path, out: Path, per_class: int | None, test_per_class: int | None, seed: int) -> Path:
    """A seeded class-balanced subset of a CIFAR-100 npz, written to ``out`` (kept if already there)."""
    if out.is_file():
        return out
    data = np.load(source)
    rng = np.random.default_rng(seed)

    def pick(labels: np.ndarray, n: int | None) -> np.ndarray:
        if n is None:
            return np.arange(len(labels))
        chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
        return np.sort(np.concatenate(chosen))

    train, test = pick(data["y_train"], per_class), pick(data["y_test"], test_per_class)
    _save(out, x_train=data["x_train"][train], y_train=data["y_train"][train],
          x_test=data["x_test"][test], y_test=data["y_test"][test])
    return out


def write_random_cifar(out: Path, per_class: int, test_per_class: int) -> Path:
    """Random CIFAR-shaped data (100 classes of 32x32 RGB noise, each class a brightness): the
    smoke run's input, so that it needs no download and no ``--data``."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        arrays[f"x_{split}"] = (rng.integers(0, 128, (len(labels), 32, 32, 3)) + labels[:, None, None, None]).astype(np.uint8)
        arrays[f"y_{split}"] = labels
    _save(out, **arrays)
    return out


def _save(out: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary name, then renamed: an interrupted write leaves no half file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part.npz")
    np.savez(part, **arrays)
    part.replace(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="CIFAR-100 .npz file or torchvision root folder (not needed with --smoke)")
    parser.add_argument("--output", default="runs/cifar100", help="OUTPUT/seed-S/<run> per seed and run, OUTPUT/summary.md")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs of the protocol")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra run (an ablation), e.g. branch-full:strategy=branch,shape=full; compared with finetune")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--pretrained", help="start every run from these weights (local-dir:PATH, hf-hub:org/name or a timm "
                        "name); task 0 then uses each run's strategy too, so no run shares finetune's task 0")
    parser.add_argument("--num-tasks", type=int, default=5, help="class-incremental tasks (the papers: 5)")
    parser.add_argument("--epochs", type=int, default=500, help="epochs per task (the papers: 500)")
    parser.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs of each task (default: min(10, epochs), "
                        "the papers' 10 of 500; a reduced budget may want fewer)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32, help="128 gives a stock resnet18 the papers' feature-map sizes")
    parser.add_argument("--per-class", type=int, help="training images per class (default: all 500)")
    parser.add_argument("--test-per-class", type=int, help="test images per class (default: all 100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the class order is always seed 5)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the --per-class / --test-per-class subset")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="own random data, 2 tasks, 1 epoch, 10+4 images per class, test_resnet at 16 px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.epochs, args.batch_size, args.image_size, args.num_tasks = "test_resnet", 1, 32, 16, 2
        args.per_class, args.test_per_class = args.per_class or 10, args.test_per_class or 4
    elif args.data is None:
        parser.error("--data is required (the CIFAR-100 .npz or torchvision folder), unless --smoke")
    elif not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist: give the CIFAR-100 .npz file or torchvision root folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    if args.smoke and args.data is None:
        data = str(write_random_cifar(out / "data" / "random-cifar.npz", args.per_class, args.test_per_class))
    elif args.per_class or args.test_per_class:
        name = f"cifar100-{args.per_class}-{args.test_per_class}-seed{args.subset_seed}.npz"
        data = str(write_subset(Path(args.data), out / "data" / name, args.per_class, args.test_per_class, args.subset_seed))
    else:
        data = args.data
    print(f"protocol: {args.model} at {args.image_size} px, {args.method}, {args.num_tasks} tasks x {args.epochs} epochs, "
          f"batch {args.batch_size}, runs {', '.join(args.runs)}, seeds {args.seeds} -> {out}", flush=True)
    runs = {**{name: RUNS[name] for name in args.runs}, **dict(args.variant)}
    folders: dict[str, dict[int, Path]] = {name: {} for name in runs}
    for seed in args.seeds:
        for name, fields in runs.items():
            config = TrainConfig(
                model=args.model, pretrained=args.pretrained, data=[f"cifar100:{data}"], scenario="class", num_tasks=args.num_tasks, method=args.method,
                epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, seed=seed,
                precision=args.precision, channels_last=args.channels_last, device=args.device,
                warmup_epochs=min(10, args.epochs) if args.warmup_epochs is None else args.warmup_epochs,
                output=str(out / f"seed-{seed}" / name.replace("+", "-")), **fields,
            )
            shares = set(fields) <= LATER_TASKS_ONLY and name != "finetune" and not args.pretrained
            first = folders.get("finetune", {}).get(seed) if shares else None
            folders[name][seed] = _train(config, progress=not args.smoke, first_task=first)
        print(report([folders[name][seed] for name in runs], output_dir=out / f"seed-{seed}" / "report"), flush=True)
    if len(args.seeds) > 1:
        pairs = [p for p in PAIRS if all(name in runs for name in p)]
        pairs += [(name, "finetune") for name, _ in args.variant if "finetune" in runs]
        summary = seed_summary(folders, pairs)
        table = seed_table(summary)
        (out / "summary.md").write_text(f"{table}\n", encoding="utf-8")
        as_json = {part: {k: {f: dataclasses.asdict(e) for f, e in v.items()} for k, v in summary[part].items()}
                   for part in ("strategies", "pairs")}
        (out / "summary.json").write_text(json.dumps({**as_json, "seeds": summary["seeds"]}, indent=2), encoding="utf-8")
        print(table)


def _train(config: TrainConfig, progress: bool, first_task: Path | None = None) -> Path:
    """Run (or resume) one run folder; a folder holding another configuration is refused. A new
    run with ``first_task`` (a finished run folder of the same first task) starts from its task 0."""
    run_dir = Path(config.output)
    run = ContinualRun(config, progress=progress)
    if first_task is not None and not run_dir.exists():
        _copy_first_task(first_task, run_dir, run.resolved_config())
    resume = (run_dir / "config.yaml").exists() or (run_dir / "task-0").is_dir()
    if (run_dir / "config.yaml").exists() and TrainConfig.from_yaml(run_dir / "config.yaml") != run.resolved_config():
        raise SystemExit(f"{run_dir} holds a run with another configuration; choose another --output")
    done = resume and (run_dir / f"task-{config.num_tasks - 1}").is_dir()
    print(f"== seed {config.seed} {run_dir.name}: {run_dir}{' (done)' if done else ' (resuming)' if resume else ''}", flush=True)
    if not done:
        run.run(resume=resume)
    return run_dir


def _copy_first_task(source: Path, run_dir: Path, config: TrainConfig) -> None:
    """``source``'s task 0 (model folder and evaluation) as the first task of a new run folder for
    ``config``, staged beside it and renamed into place."""
    staging = run_dir.with_name(f".{run_dir.name}.first-task")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "task-0", staging / "task-0")
    info_path = staging / "task-0" / "task.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info_path.write_text(json.dumps({**info, "strategy": config.strategy}, indent=2), encoding="utf-8")
    metrics = ContinualMetrics.load(source / "metrics.json")
    metrics.rows = metrics.rows[:1]
    metrics.meta = {**metrics.meta, "strategy": config.strategy, "shape": config.shape, "bn": config.bn}
    metrics.save(staging)
    staging.rename(run_dir)


if __name__ == "__main__":
    main()
