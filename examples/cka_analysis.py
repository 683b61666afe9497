"""CKA stability/plasticity analysis of two checkpoints of a run: which layers kept what they knew.

    python examples/cka_analysis.py runs/own-images                       # last task vs the one before
    python examples/cka_analysis.py runs/branch --task 1 --joint runs/joint --output cka/
    python examples/cka_analysis.py --smoke    # seconds: trains a tiny 2-task run first, 2 repeats

The two checkpoints are ``RUN_DIR/task-{K-1}`` and ``RUN_DIR/task-K``, loaded with plain timm. As in
the Branch-tuning paper (arXiv 2403.18266), linear CKA (1 = the same representation up to rotation
and scale) is computed at every conv, BatchNorm, activation and block output:

- **stability**: task K-1's model vs task K's, on the test images of the old tasks 0..K-1
  (the run's own task split, from its ``config.yaml``): how much each layer still represents
  old data as before;
- **plasticity** (with ``--joint``, a ``--strategy joint`` run over the same tasks): task K's model
  vs the jointly trained one, on task K's images: how close each layer came to what training on
  all data at once learns.

Writes ``cka.json`` and ``cka.png`` to ``--output`` (default ``RUN_DIR/cka``) and prints the mean CKA per layer type. The
same analysis from the shell: ``timm-branch cka --run RUN_DIR --task K --stability ... --plasticity ...``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

from timm_branch.data import EvalTransform, build_scenario, load_source
from timm_branch.evaluate.cka_compare import save_results, stability_plasticity
from timm_branch.evaluate.cka_plot import plot_cka
from timm_branch.train import ContinualRun, TrainConfig


def task_images(config: TrainConfig, tasks: range) -> torch.Tensor:
    """The test images (train images when there is no test split) of ``tasks``, in the run's split."""
    source = load_source(config.data[0], config.image_size)  # one-source runs (class/data scenarios)
    scenario = build_scenario(config.scenario, source, config.num_tasks, config.split_seed)
    use_test = source.test is not None
    split = source.test if use_test else source.train
    index = torch.cat([scenario.tasks[t].test if use_test else scenario.tasks[t].train for t in tasks])
    return split.images[index.sort().values]


def checkpoint(run: Path, task: int) -> torch.nn.Module:
    """The merged model a run saved after ``task``, loaded with plain timm."""
    return timm.create_model(f"local-dir:{run / f'task-{task}'}", pretrained=True)


def smoke_run() -> Path:
    """A 2-task Branch-tuning run of a random-init test_resnet on digits (16 px, 1 epoch), in a
    temporary folder: something to analyse when no run is given."""
    config = TrainConfig(model="test_resnet", image_size=16, batch_size=32, epochs=1, num_tasks=2, knn_k=5,
                         linear_probe=False, strategy="branch", output=tempfile.mkdtemp(prefix="cka-smoke-") + "/run")
    return ContinualRun(config, progress=False).run().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?",
                        help="a run folder of timm-branch train (or of examples/own_images.py); required unless --smoke")
    parser.add_argument("--task", type=int, help="K: compare task-K with task-(K-1) (default: the last task)")
    parser.add_argument("--joint", type=Path, help="a --strategy joint run over the same tasks: adds plasticity")
    parser.add_argument("--repeats", type=int, default=10, help="shuffled passes over the images (the paper: 10)")
    parser.add_argument("--output", type=Path, help="folder for cka.json and cka.png (default: RUN/cka)")
    parser.add_argument("--smoke", action="store_true", help="2 repeats; without a run folder, a tiny run trained first")
    args = parser.parse_args()
    repeats = 2 if args.smoke else args.repeats
    if args.run is None:
        if not args.smoke:
            parser.error("give a run folder (or run --smoke, which trains a tiny one first)")
        args.run = smoke_run()
        print(f"smoke: analysing the tiny run {args.run}")
    args.output = args.output or args.run / "cka"

    config = TrainConfig.from_yaml(args.run / "config.yaml")  # the resolved config, split seed included
    task = config.num_tasks - 1 if args.task is None else args.task
    if not 1 <= task < config.num_tasks:
        parser.error(f"--task must lie in 1..{config.num_tasks - 1}: stability needs a task before it")
    results = stability_plasticity(
        checkpoint(args.run, task - 1), checkpoint(args.run, task), checkpoint(args.joint, task) if args.joint else None,
        old_images=task_images(config, range(task)), new_images=task_images(config, range(task, task + 1)),
        transform=EvalTransform(config.image_size), repeats=repeats,
    )

    save_results(results, args.output / "cka.json", meta={"run": str(args.run), "task": task})
    plot_cka(results, args.output / "cka.png", title=f"{args.run.name}: task {task - 1} -> {task}")
    # The paper's reading: under Branch-tuning, BatchNorm outputs stay closest to before (stability)
    # while convs move (plasticity); compare with a --strategy finetune run.
    for curve, result in results.items():
        by_type = ", ".join(f"{kind} {value:.3f}" for kind, value in result.by_type().items())
        print(f"{curve}: mean CKA per layer type: {by_type}")
    print(f"wrote {args.output / 'cka.json'} and {args.output / 'cka.png'}")

if __name__ == "__main__":
    main()
