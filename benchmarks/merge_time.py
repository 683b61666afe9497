"""Benchmark, CPU or GPU: the time of ``add_branches`` and ``merge_branches``, against one training step.

For each model of ``--models`` (timm, ``pretrained=False``, on the device, in ``torch.channels_last``
with ``--channels-last``), three timed operations on copies of the same weights:

- ``step`` (the baseline): one Branch-tuning training step of a copy branched once with
  ``add_branches(shape, bn)``: ``loss = mean(forward_features(x)^2)`` on a batch of
  ``--batch-size`` x ``--img-size`` px (under autocast with ``--precision bf16``), backward, SGD over
  ``branch_parameters`` (``_common.make_train_step``, the step of ``step_time.py``);
- ``add``: ``add_branches(model, shape, bn)`` on a second copy, as a user calls it (the FX trace that
  finds the conv -> BatchNorm pairs included);
- ``merge``: ``merge_branches(model)`` on that copy, folding its branches into the kernels and
  restoring the stock modules. The branches are the zero-initialised ones ``add`` made: folding
  costs the same for any finite values.

Each round runs ``step``, ``add``, ``merge`` in this fixed order (``merge`` needs the branches that
``add`` made), each timed with ``time.perf_counter``, between ``torch.cuda.synchronize()`` calls on
CUDA (``_common.time_interleaved``); ``--warmup`` untimed rounds first. Reported per model: the
median of each, and ``median(add) / median(step)`` and ``median(merge) / median(step)``: how many
training steps one add or one merge costs (a task runs thousands of steps and one of each).

Run (from the repository root)::

    python benchmarks/merge_time.py                        # resnet18 and resnet50, 224 px, batch 32
    python benchmarks/merge_time.py --device cuda --precision bf16 --channels-last --batch-size 128 --markdown
    python benchmarks/merge_time.py --smoke                # a few-round check that everything runs
"""
from __future__ import annotations

import argparse
import copy
import sys

import _common as common


def measure_model(args: argparse.Namespace, name: str, device, sync) -> dict:
    """Median add / merge / step times of ``name`` (see the module docstring), in seconds."""
    import timm_branch

    base = common.build_model(name, args.seed, device, args.channels_last)
    trained = timm_branch.add_branches(copy.deepcopy(base), shape=args.shape, bn=args.bn).train()
    x = common.make_batch(args.batch_size, args.img_size, args.seed, device, args.channels_last)
    step = common.make_train_step(trained, list(timm_branch.branch_parameters(trained)), x, args.lr, args.momentum, args.precision)
    cycled = copy.deepcopy(base)
    del base

    def add() -> None:
        timm_branch.add_branches(cycled, shape=args.shape, bn=args.bn)

    def merge() -> None:
        timm_branch.merge_branches(cycled)

    times = common.time_interleaved({"step": step, "add": add, "merge": merge}, args.warmup, args.rounds, sync, rotate=False)
    return {"model": name, **{op: common.median_iqr(t) for op, t in times.items()},
            "branches": sum(1 for _ in timm_branch.branch_parameters(trained))}


def table(results: list[dict], markdown: bool) -> str:
    headers = (["model", "branched convs", "training step, median (ms)", "add_branches, median (ms)", "IQR (ms)",
                "add vs step", "merge_branches, median (ms)", "IQR (ms)", "merge vs step"]
               if markdown else
               ["model", "branches", "step ms", "add ms", "IQR", "add x step", "merge ms", "IQR", "merge x step"])
    rows = []
    for r in results:
        step = r["step"][0]
        rows.append([
            r["model"], str(r["branches"]), f"{step * 1e3:.2f}",
            f"{r['add'][0] * 1e3:.1f}", f"{r['add'][1] * 1e3:.1f}-{r['add'][2] * 1e3:.1f}", f"{r['add'][0] / step:.2f}x",
            f"{r['merge'][0] * 1e3:.1f}", f"{r['merge'][1] * 1e3:.1f}-{r['merge'][2] * 1e3:.1f}", f"{r['merge'][0] / step:.2f}x",
        ])
    return common.markdown_table(headers, rows) if markdown else common.text_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50", help="comma-separated timm model names (default resnet18,resnet50)")
    p.add_argument("--shape", default="cross", help="branch shape: 1x1, cross or full (default cross)")
    p.add_argument("--bn", default="frozen", help="BatchNorm policy: frozen, affine or train (default frozen)")
    p.add_argument("--img-size", type=int, default=224, help="training-step input size in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="training-step batch size (default 32)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds of step, add, merge (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of the step (default 1e-3)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the step (default 0.9)")
    p.add_argument("--smoke", action="store_true", help="quick check that everything runs: resnet18, 32 px, batch 2, no warm-up, 2 rounds, 1 thread unless --threads")
    common.add_run_options(p, compile=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.img_size, args.batch_size, args.rounds, args.warmup = "resnet18", 32, 2, 2, 0
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rounds < 1 or args.warmup < 0 or not args.model_list:
        p.error("--rounds must be >= 1, --warmup >= 0, and --models must name a model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    sync = common.synchronizer(device)
    results = []
    for name in args.model_list:
        print(f"timing {name}: {args.warmup} warm-up + {args.rounds} rounds of step, add, merge ...", file=sys.stderr, flush=True)
        results.append(measure_model(args, name, device, sync))
    info = common.machine_info(device, args.threads)
    setup = (
        f"add_branches(shape={args.shape!r}, bn={args.bn!r}) / merge_branches on models in float32"
        f"{', channels_last' if args.channels_last else ''}; baseline: one Branch-tuning training step, batch "
        f"{args.batch_size} x {args.img_size} px, {args.precision}, loss = mean(forward_features(x)^2), SGD(lr={args.lr}, "
        f"momentum={args.momentum}); {args.warmup} warm-up + {args.rounds} timed rounds of step, add, merge"
    )
    common.print_header(setup, info)
    print(table(results, markdown=False))
    print()
    for r in results:
        step = r["step"][0]
        print(f"{r['model']}: add_branches = {r['add'][0] / step:.2f} training steps, merge_branches = {r['merge'][0] / step:.2f} training steps")
    title = common.section_title(device, "add / merge time", f"{', '.join(args.model_list)}, step at {args.img_size} px", args)
    common.emit_markdown(common.markdown_section(title, info, {"Setup": setup}, table(results, markdown=True)), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
