"""Benchmark, CPU or GPU: a branch's tap gradient against the frozen kernel's full weight gradient, conv by conv.

Branch-tuning's speed premise (the GPU speed issue, point 1): a branched conv's backward needs the
input gradient and the weight gradient of the branch taps only, ``1 / k^2`` of the full ``k x k``
weight gradient for a ``"1x1"`` branch and ``(2k - 1) / k^2`` for ``"cross"``. Whether the device's
kernels turn fewer multiply-adds into less time depends on the shape: cuDNN chooses an algorithm
per shape (``k x 1`` and ``1 x k`` kernels over input windows are not the ``3 x 3`` case it is tuned
for), and a single tap is computed as one matrix product with a long reduction (batch x pixels).

For every conv that ``add_branches`` gives a tap-only backward in ``--model``, at the input shape a
forward of ``--batch-size`` x ``--img-size`` px gives it, this times (``_common.time_interleaved``,
between ``torch.cuda.synchronize()`` calls on CUDA), on random ``x`` and output gradient in the
compute dtype (bfloat16 with ``--precision bf16``) and layout (``--channels-last``):

- ``full`` (the baseline): the whole kernel's weight gradient
  (``aten.convolution_backward``, weight only), what fine-tuning pays on top of the input gradient;
- ``input``: the input gradient, which both fine-tuning and the branch pay;
- ``1x1``, ``cross``: the tap gradients ``BranchedConv``'s backward computes, the device's way
  (``timm_branch.branch_conv.taps_grad``: on the CPU one GEMM of gathered taps, on CUDA one
  sub-convolution per line of taps).

Convs of the same shape are timed once and counted as often as the model has them. Reported per
shape: medians and the ratios ``tap / full``; for the whole model: the count-weighted sums, as
``tap / full`` and as the backward's ``(input + tap) / (input + full)``. Pointwise (``1 x 1``) kernels
are left out: for them every shape is the full weight gradient.

Run (from the repository root)::

    python benchmarks/tap_grad.py                          # resnet18, 64 px, batch 32, CPU
    python benchmarks/tap_grad.py --device cuda --precision bf16 --channels-last --img-size 224 --batch-size 128
    python benchmarks/tap_grad.py --smoke                  # a few-round check that everything runs
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter

import torch

import _common as common

SHAPES = ("1x1", "cross")


def conv_shapes(args: argparse.Namespace, device: torch.device) -> Counter:
    """``Counter`` of ``(geometry, kernel shape, input shape, output shape)`` over the model's
    branched convs with a tap-only backward and a kernel of more than one tap (the input as the
    convolution sees it, after ``Conv2dSame``'s padding)."""
    import timm_branch
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same
    from timm_branch.branch import get_branch, iter_branches

    model = timm_branch.add_branches(common.build_model(args.model, args.seed, device, args.channels_last)).eval()
    found: Counter = Counter()

    def record(conv, inputs, output) -> None:
        x = inputs[0]
        if isinstance(conv, Conv2dSame):
            x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        kernel = conv.parametrizations.weight.original
        found[(get_branch(conv).geometry, tuple(kernel.shape), tuple(x.shape), tuple(output.shape))] += 1

    hooks = [conv.register_forward_hook(record) for _, conv, branch in iter_branches(model)
             if branch.geometry is not None and math.prod(branch.kernel_size) > 1]
    with torch.no_grad(), common.autocast(device, args.precision):
        model.forward_features(common.make_batch(args.batch_size, args.img_size, args.seed, device, args.channels_last))
    for hook in hooks:
        hook.remove()
    return found


def time_shape(args: argparse.Namespace, key: tuple, device: torch.device, sync) -> dict[str, tuple[float, float, float]]:
    """Median and quartiles (seconds) of ``full``, ``input`` and every tap shape for one conv shape."""
    from timm_branch.branch import tap_indices
    from timm_branch.branch_conv import _conv_backward, tap_plan, taps_grad

    geometry, kernel_shape, x_shape, out_shape = key
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    memory_format = torch.channels_last if args.channels_last and len(x_shape) == 4 else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def tensor(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).contiguous(memory_format=memory_format)

    x, kernel = tensor(x_shape), tensor(kernel_shape)
    grad_out = tensor(out_shape)
    steps = {
        "full": lambda: _conv_backward(grad_out, x, kernel, geometry, False, [False, True, False]),
        "input": lambda: _conv_backward(grad_out, x, kernel, geometry, False, [True, False, False]),
    }
    for shape in SHAPES:
        plan = tap_plan(tuple(kernel_shape[2:]), tap_indices(tuple(kernel_shape[2:]), shape))
        steps[shape] = lambda plan=plan: taps_grad(grad_out, x, kernel, geometry, plan)
    times = common.time_interleaved(steps, args.warmup, args.rounds, sync)
    return {name: common.median_iqr(t) for name, t in times.items()}


def build_rows(results: list[tuple[tuple, int, dict]]) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows per conv shape and the count-weighted totals (seconds) per timed operation."""
    rows, totals = [], Counter()
    for (geometry, kernel_shape, x_shape, _), count, med in results:
        full = med["full"][0]
        for name, (m, _, _) in med.items():
            totals[name] += count * m
        rows.append([
            "x".join(map(str, kernel_shape)), "x".join(map(str, x_shape)), f"{geometry.stride[0]}", str(count),
            f"{full * 1e3:.3f}", f"{med['input'][0] * 1e3:.3f}",
            *(f"{med[s][0] * 1e3:.3f} ({med[s][0] / full:.2f}x)" for s in SHAPES),
        ])
    return rows, dict(totals)


def table(rows: list[list[str]], markdown: bool) -> str:
    headers = ["kernel", "input", "stride", "convs", "full wgrad ms", "input grad ms", *(f"{s} taps ms (x full)" for s in SHAPES)]
    return common.markdown_table(headers, rows) if markdown else common.text_table(headers, rows)


def summary(totals: dict[str, float], device: torch.device) -> list[str]:
    full, inp = totals["full"], totals["input"]
    # Multiply-adds against the full gradient for a 3 x 3 kernel; on CUDA cross computes its centre
    # tap once per line, the CPU's gathered GEMM once.
    work = {"1x1": "1/9", "cross": "5/9" if device.type == "cpu" else "6/9"}
    return [f"{s}: tap gradient {totals[s] / full:.3f}x the full weight gradient (work {work[s]} for a 3x3 kernel); "
            f"backward (input + weight gradient) {(inp + totals[s]) / (inp + full):.3f}x fine-tuning's" for s in SHAPES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    p.add_argument("--img-size", type=int, default=64, help="input size in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per conv shape (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each operation first (default 3)")
    p.add_argument("--smoke", action="store_true", help="quick check that everything runs: 32 px, batch 2, no warm-up, 2 rounds, 1 thread unless --threads")
    common.add_run_options(p, compile=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.img_size, args.batch_size, args.rounds, args.warmup = 32, 2, 2, 0
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    sync = common.synchronizer(device)
    shapes = conv_shapes(args, device)
    print(f"timing {len(shapes)} conv shapes of {args.model}: {args.warmup} warm-up + {args.rounds} rounds each ...",
          file=sys.stderr, flush=True)
    results = [(key, count, time_shape(args, key, device, sync)) for key, count in shapes.items()]
    rows, totals = build_rows(results)
    info = common.machine_info(device, args.threads)
    setup = (f"{args.model} (pretrained=False), the convs add_branches gives a tap-only backward (kernels of more than one "
             f"tap), at their input shapes for batch {args.batch_size} x {args.img_size} px, {args.precision}"
             f"{', channels_last' if args.channels_last else ''}; random x and output gradient; {args.warmup} warm-up + "
             f"{args.rounds} timed rounds per shape, interleaved")
    common.print_header(setup, info)
    print(table(rows, markdown=False))
    print()
    lines = summary(totals, device)
    print("\n".join(lines))
    title = common.section_title(device, "tap gradient vs full weight gradient", f"{args.model}, {args.img_size} px", args)
    common.emit_markdown(common.markdown_section(title, info, {"Setup": setup}, table(rows, markdown=True),
                                                 "\n".join(f"- {line}" for line in lines)), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
