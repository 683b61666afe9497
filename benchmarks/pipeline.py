"""Benchmark, CPU or GPU: the data pipeline's share of a continual-SSL training step, and throughput.

What runs is timm-branch's own trainer, :class:`timm_branch.train.ContinualRun`, not a copy of it:
a run of ``TrainConfig(model, data, scenario="data", num_tasks=2, method, strategy, batch_size,
image_size, precision, channels_last, device)``; its learner for task 1 (``new_learner``, then
``prepare_task``: with the default ``--strategy branch`` that is the first Branch-tuning task,
whose backbone (and BYOL's momentum copy) ``add_branches`` has branched, ``shape="cross"``,
``bn="frozen"``); the method recipe's optimiser and warmup-cosine schedule (``build_optimizer`` /
``build_scheduler`` on ``_trainable(learner)``, as ``_train_task`` builds them); networks in train
mode. A fixed batch of ``--batch-size`` uint8 images of task 1 is on the device.

Two variants, each one call of the trainer's step, ``ContinualRun.train_step``:

- ``full``: augment two views of the uint8 batch on the device (the run's ``TwoViewAugment`` with
  the method's recipe, drawn from a device ``torch.Generator``), forward both views, SSL loss
  (BYOL: also the momentum network's forward and the EMA update), backward, optimiser and
  scheduler step;
- ``premade`` (the baseline): the very same call with the run's ``augment`` swapped for a stand-in
  that returns two views the augmentation made once beforehand, so the step skips exactly the
  augmentation.

Both variants train the same learner in turn. Timing: ``--warmup`` untimed steps each, then
``--steps`` rounds in which both run one step, timed with ``time.perf_counter`` between
``torch.cuda.synchronize()`` calls on CUDA, the order alternating from round to round
(``_common.time_interleaved``). Reported per method: the median step times, the share of the
step spent making the views, ``1 - median(premade) / median(full)``, and the throughput
``batch / median(full)`` in images/s (each image two views of ``image_size`` px).

Targets (GPU speed issue): share <= 10 %; throughput above 10x the anchor of ~1.4k images/s
(CaSSLe's ResNet-18 on CIFAR-100, one RTX 3090) on an H100.

``--compile`` runs the trainer with ``TrainConfig.compile``: the backbone and the momentum network
through ``torch.compile`` (inductor), the heads, the losses and the augmentation eager (it draws
from a generator). Compiled and eager are separate runs.

Data: by default a seeded random uint8 tensor of CIFAR-shaped images (``2 * batch`` images, 3 x 32
x 32, the two tasks' worth), handed to the trainer as a temporary ``.npz``; ``--data`` takes any
``timm-branch train --data`` spec instead (``FILE.npz``, ``cifar100:ROOT``, ...) with at least
``2 * batch`` training images.

Run (from the repository root)::

    python benchmarks/pipeline.py                           # resnet18, SimCLR and BYOL, batch 256, 32 px
    python benchmarks/pipeline.py --device cuda --precision bf16 --channels-last [--compile] --markdown
    python benchmarks/pipeline.py --data cifar100:/data/cifar100.npz
    python benchmarks/pipeline.py --smoke                   # a few-step check that everything runs
"""
from __future__ import annotations

import argparse
import collections
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import _common as common

SHARE_TARGET = 0.10
ANCHOR_IMAGES_S = 1400.0
"""CaSSLe's ResNet-18 on CIFAR-100 on one RTX 3090, images/s (two views each)."""
ANCHOR_FACTOR = 10.0
"""Throughput over the anchor that the GPU speed issue aims for on an H100."""
STRATEGIES = ("branch", "finetune", "cassle", "cassle+branch")


class PremadeViews:
    """Stands in for the run's ``TwoViewAugment``: the same two views at every call."""

    def __init__(self, views: list[torch.Tensor]):
        self.views = views

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, rows: slice | None = None) -> list[torch.Tensor]:
        return list(self.views)


def random_cifar_npz(path: Path, n: int, seed: int) -> None:
    """``n`` seeded random uint8 images of CIFAR's shape as ``x_train`` ``(n, 32, 32, 3)``."""
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))


def measure_method(args: argparse.Namespace, method: str, data: str, output: Path) -> dict:
    """Time the ``full`` and ``premade`` steps of ``method`` (see the module docstring)."""
    from timm_branch.train import ContinualRun, TrainConfig
    from timm_branch.train.distributed import local_rows

    config = TrainConfig(
        model=args.model, data=[data], scenario="data", num_tasks=2, method=method, strategy=args.strategy,
        batch_size=args.batch_size, image_size=args.img_size, precision=args.precision,
        channels_last=args.channels_last, compile="inductor" if args.compile else None, device=args.device, seed=args.seed,
        output=str(output / method),
    )
    run = ContinualRun(config, progress=False)
    total = 2 * (args.warmup + args.steps)  # both variants' steps: one schedule, one momentum ramp
    learner, optimizer, scheduler = common.task_one_learner(run, total)

    batch = run.images[run.task_indices(1)[: args.batch_size].to(run.device)]
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    augment = run.augment
    views = augment(batch, gen, rows=local_rows(len(batch)))
    premade = PremadeViews([common.as_input(v, args.channels_last) for v in views])
    losses: list[torch.Tensor] = []
    counter = itertools.count()

    def step_with(views_from) -> Callable[[], None]:
        def step() -> None:
            # The trainer's step reads its augmentation from the run: the variants differ in it alone.
            run.augment = views_from
            losses.append(run.train_step(learner, batch, None, gen, optimizer, scheduler, next(counter), total))
        return step

    steps = {"full": step_with(augment), "premade": step_with(premade)}
    sync = common.synchronizer(run.device)
    with run.task_encoders(learner):
        times = common.time_interleaved(steps, args.warmup, args.steps, sync)
        run.augment = augment
        back_to_back = back_to_back_seconds(steps["full"], args.steps, sync)
        syncs = host_syncs(steps["full"]) if run.device.type == "cuda" else None
    if not bool(torch.stack(losses).isfinite().all()):
        # ContinualRun.train_step skips the update of a non-finite loss: such a step would be shorter.
        raise RuntimeError(f"{method}: a non-finite loss during timing; the step times would not be those of training steps")
    full, premade_t = common.median_iqr(times["full"]), common.median_iqr(times["premade"])
    return {"method": method, "full": full, "premade": premade_t, "share": 1 - premade_t[0] / full[0],
            "images_s": args.batch_size / full[0], "premade_images_s": args.batch_size / premade_t[0],
            "back_to_back_images_s": args.batch_size * args.steps / back_to_back, "syncs": syncs}


def back_to_back_seconds(step: Callable[[], None], n: int, sync: Callable[[], None]) -> float:
    """Wall time of ``n`` calls of ``step`` in a row with no wait between them, as the trainer runs
    them (it reads losses back every few steps only): on a GPU the host queues the next step while
    the device still runs the last one."""
    sync()
    started = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - started


def host_syncs(step: Callable[[], None]) -> dict[str, int]:
    """The host-device synchronisations in one call of ``step`` (CUDA only), counted by the source
    line that made them, from ``torch.cuda.set_sync_debug_mode("warn")``'s warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = (f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(collections.Counter(lines).most_common())


def describe_syncs(syncs: dict[str, int] | None) -> str:
    if syncs is None:
        return "not counted (CUDA only)"
    return f"{sum(syncs.values())}" + (f" ({', '.join(f'{k} x{v}' for k, v in syncs.items())})" if syncs else "")


def verdicts(result: dict, on_gpu: bool) -> tuple[str, str]:
    share = f"{'ok' if result['share'] <= SHARE_TARGET else 'OVER'} (<= {SHARE_TARGET:.0%})"
    factor = result["images_s"] / ANCHOR_IMAGES_S
    # The throughput aim is for an H100; on a CPU the ratio to the anchor is printed without a verdict.
    aim = f"{'ok' if factor > ANCHOR_FACTOR else 'UNDER'} (> {ANCHOR_FACTOR:.0f}x)" if on_gpu else "-"
    return share, aim


def table(results: list[dict], on_gpu: bool, markdown: bool) -> str:
    headers = (["method", "full step, median (ms)", "IQR (ms)", "pre-made views step, median (ms)", "IQR (ms)",
                "pipeline share", "share target", "images/s (full)", "images/s (pre-made)", "images/s (back-to-back)", "vs 1.4k anchor", "throughput target"]
               if markdown else
               ["method", "full ms", "IQR", "premade ms", "IQR", "share", "share target", "img/s", "img/s premade", "img/s b2b", "x anchor", "img/s target"])
    rows = []
    for r in results:
        share_ok, aim = verdicts(r, on_gpu)
        rows.append([
            r["method"], f"{r['full'][0] * 1e3:.2f}", f"{r['full'][1] * 1e3:.2f}-{r['full'][2] * 1e3:.2f}",
            f"{r['premade'][0] * 1e3:.2f}", f"{r['premade'][1] * 1e3:.2f}-{r['premade'][2] * 1e3:.2f}",
            f"{r['share']:.1%}", share_ok, f"{r['images_s']:,.0f}", f"{r['premade_images_s']:,.0f}",
            f"{r['back_to_back_images_s']:,.0f}", f"{r['images_s'] / ANCHOR_IMAGES_S:.2f}x", aim,
        ])
    if not markdown:
        return common.text_table(headers, rows)
    return common.markdown_table(headers, rows, align="lrrrrrlrrrrl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_task_one_options(p, STRATEGIES)
    p.add_argument("--methods", default="simclr,byol", help="comma-separated SSL methods (default simclr,byol)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step, two views each (default 256, CaSSLe's)")
    p.add_argument("--img-size", type=int, default=32, help="view size in pixels (default 32, CIFAR)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per variant (default 5)")
    p.add_argument("--data", default=None, help="a timm-branch data spec (FILE.npz, cifar100:ROOT, ...); default: seeded random uint8 CIFAR-shaped images")
    p.add_argument("--smoke", action="store_true", help="quick check that everything runs: batch 8, no warm-up, 2 steps, 1 thread unless --threads")
    common.add_run_options(p, backend=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.warmup = 8, 2, 0
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or not args.method_list:
        p.error("--steps must be >= 1, --warmup >= 0, --batch-size >= 2, and --methods must name a method")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    args.device = device.type  # the trainer resolves "auto" alike; the report names what ran
    results = []
    with tempfile.TemporaryDirectory(prefix="timm-branch-pipeline-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "random-cifar.npz")
            random_cifar_npz(Path(data), 2 * args.batch_size, args.seed)
        for method in args.method_list:
            print(f"timing {method}: {args.warmup} warm-up + {args.steps} interleaved steps per variant ...", file=sys.stderr, flush=True)
            results.append(measure_method(args, method, data, Path(tmp)))

    on_gpu = device.type == "cuda"
    info = common.machine_info(device, args.threads)
    mode = "torch.compile of the backbone and momentum network (TrainConfig.compile)" if args.compile else "eager"
    setup = (
        f"{args.model}, strategy {args.strategy} (task 1), batch {args.batch_size} images x 2 views of "
        f"{args.img_size} px, {args.precision}, {'channels_last' if args.channels_last else 'contiguous (NCHW)'}, {mode}; "
        f"data {args.data or 'seeded random uint8 CIFAR-shaped images'}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant, interleaved"
    )
    common.print_header(setup, info)
    print(table(results, on_gpu, markdown=False))
    print()
    for r in results:
        share_ok, aim = verdicts(r, on_gpu)
        print(f"{r['method']}: pipeline share {r['share']:.1%} of the full step, target {share_ok}; "
              f"{r['images_s']:,.0f} images/s = {r['images_s'] / ANCHOR_IMAGES_S:.2f}x the 1.4k anchor, target {aim}; "
              f"back to back {r['back_to_back_images_s']:,.0f} images/s; host syncs per step: {describe_syncs(r['syncs'])}")
    title = common.section_title(device, "data-pipeline share and throughput", f"{args.model}, {args.img_size} px", args)
    closing = (f"Pipeline share = 1 - pre-made / full (target <= {SHARE_TARGET:.0%}); throughput = batch / full step; "
               f"anchor ~{ANCHOR_IMAGES_S / 1000:.1f}k images/s (CaSSLe ResNet-18, CIFAR-100, one RTX 3090), aim > {ANCHOR_FACTOR:.0f}x on an H100. "
               f"Back-to-back: {args.steps} full steps in a row, one wait at the end, as the trainer runs them. "
               "Host syncs per full step: " + "; ".join(f"{r['method']} {describe_syncs(r['syncs'])}" for r in results) + ".")
    common.emit_markdown(common.markdown_section(title, info, {"Setup": setup}, table(results, on_gpu, markdown=True), closing), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
