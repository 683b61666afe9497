"""Continual SSL on a folder of your own images, task after task, starting from a timm model.

    python examples/own_images.py --images ~/photos --pretrained resnet18.a1_in1k --output runs/photos
    python examples/own_images.py --images ~/photos --model resnet18 --output runs/scratch   # from scratch
    python examples/own_images.py --smoke    # seconds, offline: tiny made-up images, a local test_resnet
    python examples/own_images.py --images ~/imagenet --stream --image-size 224 ...            # larger than memory

Folder layouts (``timm_branch.data.load_folder``; any image type PIL reads):

- ``FOLDER/train/<class>/*.jpg`` and ``FOLDER/test/<class>/*.jpg``: the classes are split into
  ``--num-tasks`` class-incremental tasks, and after every task a kNN and a linear probe on the
  frozen features score the model on the test images: ``metrics.json``, ``accuracy_curves.png``
  and ``accuracy_matrix.png`` in the run folder, and the table printed at the end;
- ``FOLDER/<class>/*.jpg``: the same tasks, no evaluation (there is no test split);
- ``FOLDER/*.jpg`` (flat, unlabeled): ``--num-tasks`` random equal parts, no evaluation.

Labels only shape the tasks and the evaluation: training is self-supervised. ``--pretrained``
takes a timm name (downloads its weights once), ``hf-hub:org/name`` or ``local-dir:PATH``; with
it, Branch-tuning starts at the first task, so what the model knew is kept as it learns your images.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
from PIL import Image

import timm_branch
from timm_branch.data import IMAGE_EXTENSIONS
from timm_branch.evaluate.report import CURVES_FILE, load_runs, markdown_table
from timm_branch.cli import configure_logging
from timm_branch.train import ContinualRun, TrainConfig


def has_class_folders(images: Path) -> bool:
    """Whether the (train) folder holds class sub-folders rather than images."""
    train = images / "train" if (images / "train").is_dir() else images
    return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in train.iterdir() if p.is_file())


def write_smoke_images(folder: Path, classes: int = 4, train: int = 8, test: int = 4) -> Path:
    """``folder/train/<class>/*.png`` and ``folder/test/<class>/*.png``: 20x24 noise images whose
    brightness grows with the class, so the tasks and the evaluation have something to tell apart."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            out = folder / split / f"class{c}"
            out.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 160, (20, 24, 3), dtype=np.uint8) + np.uint8(30 * c)).save(out / f"{i}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="your image folder (layouts above); required unless --smoke")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", help="timm name, hf-hub:org/name or local-dir:PATH (default: resnet18.a1_in1k)")
    start.add_argument("--model", help="a timm architecture to train from scratch instead")
    parser.add_argument("--num-tasks", type=int, default=2)
    parser.add_argument("--method", default="byol", help="simclr | byol | barlow | moco | vicreg | swav")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96, help="shorter side resized, then centre-cropped")
    parser.add_argument("--stream", action="store_true",
                        help="decode each batch in DataLoader workers instead of the whole folder up front (folders larger than memory)")
    parser.add_argument("--output", help="run folder (default: runs/own-images; with --smoke a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    parser.add_argument("--smoke", action="store_true",
                        help="1 epoch at 16 px, batch 8: the pipeline only; without --images, made-up images, and "
                             "without --pretrained/--model, a random-init test_resnet saved as a local checkpoint")
    args = parser.parse_args()
    if args.images is None and not args.smoke:
        parser.error("--images is required (or run --smoke on made-up images)")
    pretrained = args.pretrained or "resnet18.a1_in1k"
    if args.smoke:
        args.epochs, args.image_size, args.batch_size = 1, 16, 8
        scratch = Path(tempfile.mkdtemp(prefix="own-images-smoke-"))
        print(f"smoke run in {scratch}")
        args.images = args.images or write_smoke_images(scratch / "images")
        args.output = args.output or str(scratch / "run")
        if args.pretrained is None and args.model is None:  # offline: a local checkpoint, not a download
            start = timm_branch.save_pretrained(timm.create_model("test_resnet", num_classes=0), scratch / "start")
            pretrained = f"local-dir:{start}"
    args.output = args.output or "runs/own-images"
    configure_logging()  # per-epoch losses

    config = TrainConfig(
        model=args.model or TrainConfig.model,
        pretrained=None if args.model else pretrained,
        data=[str(args.images)],
        # Class folders give class-incremental tasks; a flat folder is cut into random equal parts.
        scenario="class" if has_class_folders(args.images) else "data",
        num_tasks=args.num_tasks, method=args.method, strategy="branch", epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, stream=args.stream, output=args.output,
        # Smoke runs have a handful of images: fewer neighbours than the default 20.
        knn_k=5 if args.smoke else TrainConfig.knn_k,
    )
    final = ContinualRun(config, progress=not args.smoke).run(resume=args.resume)

    run_dir = Path(args.output)
    if (run_dir / CURVES_FILE).is_file():
        print(markdown_table(load_runs([run_dir])))  # final top-1, average accuracy, forgetting, ...
        print(f"evaluation plots: {run_dir / CURVES_FILE}, {run_dir / 'accuracy_matrix.png'}")
    else:
        print("no evaluation: give the folder a train/ and a test/ split of class folders to get one")
    print(f'timm.create_model("local-dir:{final}", pretrained=True)')


if __name__ == "__main__":
    main()
