"""Continual SSL on a folder of your own images, task after task, starting from a timm model.

    python examples/own_images.py --images ~/photos --pretrained resnet18.a1_in1k --output runs/photos
    python examples/own_images.py --images ~/photos --model resnet18 --output runs/scratch   # from scratch
    python examples/own_images.py --images FOLDER --pretrained local-dir:CKPT --smoke         # seconds
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
import logging
from pathlib import Path

from timm_branch.data import IMAGE_EXTENSIONS
from timm_branch.evaluate.report import CURVES_FILE, load_runs, markdown_table
from timm_branch.train import ContinualRun, TrainConfig


def has_class_folders(images: Path) -> bool:
    """Whether the (train) folder holds class sub-folders rather than images."""
    train = images / "train" if (images / "train").is_dir() else images
    return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in train.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="your image folder (layouts above)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", default="resnet18.a1_in1k", help="timm name, hf-hub:org/name or local-dir:PATH")
    start.add_argument("--model", help="a timm architecture to train from scratch instead")
    parser.add_argument("--num-tasks", type=int, default=2)
    parser.add_argument("--method", default="byol", help="simclr | byol | barlow | moco | vicreg | swav")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96, help="shorter side resized, then centre-cropped")
    parser.add_argument("--stream", action="store_true",
                        help="decode each batch in DataLoader workers instead of the whole folder up front (folders larger than memory)")
    parser.add_argument("--output", default="runs/own-images")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    parser.add_argument("--smoke", action="store_true", help="1 epoch at 16 px, batch 8: the pipeline only")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.image_size, args.batch_size = 1, 16, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # per-epoch losses

    config = TrainConfig(
        model=args.model or TrainConfig.model,
        pretrained=None if args.model else args.pretrained,
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
