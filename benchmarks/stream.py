"""Benchmark, CPU or GPU: training on a streamed image folder against the same folder in memory.

What runs is timm-branch's own trainer, :class:`timm_branch.train.ContinualRun`: two runs of
``TrainConfig(model, data=[FOLDER], scenario="data", num_tasks=2, method, strategy, batch_size,
image_size, precision, channels_last, device)`` that differ only in ``stream`` (and ``workers``),
each with its learner for task 1 as the trainer prepares it (``_common.task_one_learner``; with the
default ``--strategy branch`` the first Branch-tuning task). The pixels are the same in both runs
(one decoder), so both train the same way; only where the images come from differs.

A pass of a variant is task 1 as the trainer runs it: ``--epochs`` epochs of ``--steps`` steps,
the batches from the run's ``epoch_batches`` (its seeded per-epoch orders; in memory: rows of the uint8
tensor on the device; streamed: batches decoded by ``--workers`` DataLoader processes that serve
the whole task, running ahead across epoch ends, pinned and copied to the device while earlier
steps run), each fed to ``ContinualRun.train_step`` (augmentation, forward, loss, backward, optimiser).
It is timed from asking for the first batch (so the streamed pass pays its workers' start, once
per task as in training) to the end of its last step (``torch.cuda.synchronize`` on CUDA), and
reported per epoch. ``decode`` is the streamed run's ``epoch_batches`` alone, with no step: how many
images/s the workers decode and deliver.

Variants alternate pass by pass, ``--rounds`` timed rounds after one untimed; reported: the
median time per epoch, images/s, and the streamed time over the in-memory time (1.00x:
streaming is free).
When ``decode`` delivers fewer images/s than the in-memory epoch trains, the workers are the
bottleneck: raise ``--workers``, or use more cores.

Data: by default a temporary folder of ``--images`` seeded JPEG files (quality 90) of ``--file-size``
px, smooth colour fields with noise (photos compress and decode alike; pure noise would not), in
4 class folders; ``--folder`` takes any image folder ``timm-branch train --data`` accepts instead.

Run (from the repository root)::

    python benchmarks/stream.py                                  # resnet18, SimCLR, 64 px files -> 32 px
    python benchmarks/stream.py --device cuda --precision bf16 --channels-last --workers 8 --markdown
    python benchmarks/stream.py --folder /data/imagenet100 --img-size 224 --workers 16
    python benchmarks/stream.py --smoke                          # a few-step check that everything runs
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _common as common

STRATEGIES = ("branch", "finetune")


def write_folder(root: Path, n: int, size: int, seed: int) -> Path:
    """``n`` seeded JPEGs of ``size`` px in ``root/class0..3/``: smooth colour fields (an upscaled
    4 x 4 random image) plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def task_seconds(run, learner, optimizer, scheduler, indices: torch.Tensor, steps: int, train: bool,
                 counter: list[int]) -> float:
    """One pass of the trainer's loop over task 1's epochs (``train=False``: the batches alone), in
    seconds per epoch."""
    gen = torch.Generator(device=run.device).manual_seed(counter[0])
    sync = common.synchronizer(run.device)
    sync()
    started = time.perf_counter()
    for _, _, batches in run.epoch_batches(indices, 1, 0, steps):
        for batch in batches:
            if train:
                run.train_step(learner, batch, None, gen, optimizer, scheduler, counter[0], counter[1])
                counter[0] += 1
    sync()
    return (time.perf_counter() - started) / run.config.epochs


def measure(args: argparse.Namespace, folder: str, output: Path) -> dict[str, list[float]]:
    """Per-epoch times of the ``memory``, ``streamed`` and ``decode`` variants, one per round, in seconds."""
    from timm_branch.train import ContinualRun, TrainConfig

    runs, learners = {}, {}
    rounds = 1 + args.rounds
    total = rounds * args.epochs * args.steps
    for name, stream in (("memory", False), ("streamed", True)):
        config = TrainConfig(
            model=args.model, data=[folder], scenario="data", num_tasks=2, method=args.method, strategy=args.strategy,
            epochs=args.epochs, batch_size=args.batch_size, image_size=args.img_size, precision=args.precision,
            channels_last=args.channels_last, device=args.device, seed=args.seed, stream=stream, workers=args.workers,
            output=str(output / name),
        )
        runs[name] = ContinualRun(config, progress=False)
        learners[name] = common.task_one_learner(runs[name], total)
    indices = runs["memory"].task_indices(1).to(runs["memory"].device)
    if len(indices) < args.steps * args.batch_size:
        raise SystemExit(f"task 1 has {len(indices)} images, fewer than --steps x --batch-size = {args.steps * args.batch_size}; "
                         "give more --images or fewer --steps")
    times: dict[str, list[float]] = {"memory": [], "streamed": [], "decode": []}
    counters = {name: [0, total] for name in runs}  # (step, total steps) per learner
    with contextlib.ExitStack() as stack:
        for name, run in runs.items():  # the encoders the trainer's step runs (DDP-wrapped under torchrun)
            stack.enter_context(run.task_encoders(learners[name][0]))
        for r in range(rounds):
            one_round(args, runs, learners, counters, indices, times if r else None, reverse=r % 2 == 1)
    return times


def one_round(args, runs, learners, counters, indices: torch.Tensor, times: dict[str, list[float]] | None,
              reverse: bool) -> None:
    """Every variant's pass over the task (in reverse variant order when ``reverse``), recorded in
    ``times`` unless ``None`` (the untimed first round: allocator, thread pools, first reads of the
    files)."""
    variants = ["memory", "streamed", "decode"]
    for name in variants[::-1] if reverse else variants:
        owner = "streamed" if name == "decode" else name
        learner, optimizer, scheduler = learners[owner]
        seconds = task_seconds(runs[owner], learner, optimizer, scheduler, indices, args.steps, name != "decode", counters[owner])
        if times is not None:
            times[name].append(seconds)


def rows(times: dict[str, list[float]], images: int) -> list[list[str]]:
    base = statistics.median(times["memory"])
    out = []
    for name, label in (("memory", "in memory (baseline)"), ("streamed", "streamed"), ("decode", "decode only (no step)")):
        t = times[name]
        med = statistics.median(t)
        out.append([label, f"{med:.3f}", f"{min(t):.3f}-{max(t):.3f}", f"{images / med:,.0f}", f"{med / base:.2f}x"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_task_one_options(p, STRATEGIES)
    p.add_argument("--method", default="simclr", help="SSL method (default simclr)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, two views each (default 64)")
    p.add_argument("--img-size", type=int, default=32, help="side the files decode to and the views' size, px (default 32)")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch (default 8)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the task each pass trains (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per variant, after one untimed (default 3)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes of the streamed run (default: the trainer's: 1 on the CPU, else the usable cores, at most 8)")
    p.add_argument("--folder", default=None, help="an image folder; default: seeded JPEGs written to a temporary folder")
    p.add_argument("--images", type=int, default=None, help="files in the default folder (default 2 x steps x batch: two tasks)")
    p.add_argument("--file-size", type=int, default=64, help="side of the default folder's files, px (default 64)")
    p.add_argument("--smoke", action="store_true", help="quick check that everything runs: batch 8, 2 steps, 2 epochs, 1 timed round, 1 thread unless --threads")
    common.add_run_options(p, compile=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.epochs, args.rounds = 8, 2, 2, 1
    if args.steps < 1 or args.epochs < 1 or args.rounds < 1 or args.batch_size < 2:
        p.error("--steps, --epochs and --rounds must be >= 1, --batch-size >= 2")
    args.images = args.images or 2 * args.steps * args.batch_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    args.device = device.type
    with tempfile.TemporaryDirectory(prefix="timm-branch-stream-") as tmp:
        folder = args.folder or str(write_folder(Path(tmp) / "images", args.images, args.file_size, args.seed))
        print(f"timing {1 + args.rounds} passes of {args.epochs} epochs of {args.steps} steps per variant, interleaved ...",
              file=sys.stderr, flush=True)
        times = measure(args, folder, Path(tmp))
    images = args.steps * args.batch_size
    info = common.machine_info(device, args.threads)
    source = args.folder or f"{args.images} seeded {args.file_size} px JPEG files (quality 90)"
    workers = ("the trainer's default number of workers" if args.workers is None
               else f"{args.workers} worker{'' if args.workers == 1 else 's'}")
    setup = (f"{args.model}, {args.method}, strategy {args.strategy} (task 1), batch {args.batch_size} images x 2 views of "
             f"{args.img_size} px, {args.precision}, {'channels_last' if args.channels_last else 'contiguous (NCHW)'}, eager; "
             f"data {source}; streamed by {workers}; per variant 1 untimed + {args.rounds} timed passes of a task of "
             f"{args.epochs} epochs of {args.steps} steps, interleaved")
    headers = ["variant", "per epoch, median (s)", "range (s)", "images/s", "vs in memory"]
    table_rows = rows(times, images)
    common.print_header(setup, info)
    print(common.text_table(headers, table_rows))
    streamed, decode, memory = (images / statistics.median(times[k]) for k in ("streamed", "decode", "memory"))
    verdict = "keep up with" if decode >= memory else "are slower than"
    print(f"\nstreaming costs {table_rows[1][-1]} the in-memory epoch; the workers decode {decode:,.0f} images/s "
          f"and {verdict} in-memory training ({memory:,.0f} images/s)")
    title = common.section_title(device, "streamed folder vs in memory", f"{args.model}, {args.img_size} px", args)
    closing = ("A pass (a task's epochs) runs from asking for its first batch (worker start included, once per task as in "
               "training) to the end of its last step; the time per epoch is the pass's over its epochs. "
               "`decode only`: the streamed batches with no training step, the workers' delivery rate.")
    common.emit_markdown(common.markdown_section(title, info, {"Setup": setup}, common.markdown_table(headers, table_rows), closing),
                         args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
