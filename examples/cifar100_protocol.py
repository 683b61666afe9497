"""The CaSSLe / Branch-tuning class-incremental CIFAR-100 protocol, every strategy on one budget.

5 tasks of 20 classes in the papers' order (``seed 5, randperm(100).chunk(5)``), timm's ResNet-18,
one SSL method, and the strategies ``finetune``, ``branch``, ``cassle``, ``cassle+branch`` and the
``joint`` upper bound, each trained with the same epochs, batch size and image size; then
``timm-branch report`` compares them.

    python examples/cifar100_protocol.py --data ../shared/data/cifar100.npz            # the paper's budget
    python examples/cifar100_protocol.py --data cifar100.npz --epochs 2 --per-class 100  # reduced
    python examples/cifar100_protocol.py --data cifar100.npz --smoke                     # seconds: the pipeline only

``--data`` is the CIFAR-100 ``.npz`` (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``) or a
torchvision CIFAR-100 root folder. ``--per-class N`` trains on a seeded subset of N training
images per class (written, never committed, under ``--output``); the test set stays whole unless
``--test-per-class`` says otherwise. Defaults are the paper's: 500 epochs per task, batch 256,
32 px, LARS with warmup-cosine and the method's CIFAR recipe.

Differences from the papers that change absolute numbers: timm's ``resnet18`` keeps its ImageNet
stem (7x7 stride-2 conv + max-pool), where the papers use a CIFAR stem (3x3 stride-1, no pool), so
at 32 px the last stage sees 1x1 feature maps; the reported probe is the offline linear probe
(the papers' online probe is ``--online-probe`` in ``timm-branch train``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from timm_branch.evaluate.report import report
from timm_branch.train import ContinualRun, TrainConfig

STRATEGIES = ("finetune", "branch", "cassle", "cassle+branch", "joint")


def write_subset(source: Path, out: Path, per_class: int, test_per_class: int | None, seed: int) -> Path:
    """A seeded class-balanced subset of a CIFAR-100 npz, written to ``out``."""
    data = np.load(source)
    rng = np.random.default_rng(seed)

    def pick(labels: np.ndarray, n: int | None) -> np.ndarray:
        if n is None:
            return np.arange(len(labels))
        chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
        return np.sort(np.concatenate(chosen))

    train, test = pick(data["y_train"], per_class), pick(data["y_test"], test_per_class)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=data["x_train"][train], y_train=data["y_train"][train],
             x_test=data["x_test"][test], y_test=data["y_test"][test])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-100 .npz file or torchvision root folder")
    parser.add_argument("--output", default="runs/cifar100", help="one run folder per strategy, plus report/")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=500, help="epochs per task (the papers: 500)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, help="training images per class (default: all 500)")
    parser.add_argument("--test-per-class", type=int, help="test images per class (default: all 100)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the class order is always seed 5)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 1 epoch, 10+4 images per class, test_resnet")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.epochs, args.batch_size, args.image_size = "test_resnet", 1, 32, 16
        args.per_class, args.test_per_class = args.per_class or 10, args.test_per_class or 4
    num_tasks = 2 if args.smoke else 5

    out = Path(args.output)
    data = args.data
    if args.per_class or args.test_per_class:
        subset = out / "data" / f"cifar100-{args.per_class}-{args.test_per_class}-seed{args.seed}.npz"
        data = str(write_subset(Path(args.data), subset, args.per_class, args.test_per_class, args.seed))
    runs = []
    for strategy in args.strategies:
        config = TrainConfig(
            model=args.model, data=[f"cifar100:{data}"], scenario="class", num_tasks=num_tasks, method=args.method,
            strategy=strategy, epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
            seed=args.seed, precision=args.precision, device=args.device, warmup_epochs=min(10, args.epochs),
            output=str(out / strategy.replace("+", "-")),
        )
        run_dir = Path(config.output)
        run = ContinualRun(config, progress=not args.smoke)
        resume = (run_dir / "config.yaml").exists()
        if resume and TrainConfig.from_yaml(run_dir / "config.yaml") != run.resolved_config():
            raise SystemExit(f"{run_dir} holds a run with another configuration; choose another --output")
        print(f"== {strategy}: {run_dir}{' (resuming)' if resume else ''}")
        run.run(resume=resume)
        runs.append(run_dir)
    print(report(runs, output_dir=out / "report"))


if __name__ == "__main__":
    main()
