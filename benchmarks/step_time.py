"""Benchmark, CPU or GPU: one training step of fine-tuning vs Branch-tuning vs a naive two-conv branch.

Variants (all on the same model weights and the same batch, the same loss and optimiser):

- ``fine-tune`` (the baseline): every parameter trainable, ``model.train()`` (BatchNorm in train
  mode), SGD over all parameters.
- ``branch-<shape>`` for ``shape`` in ``1x1``, ``cross``, ``full``: ``timm_branch.add_branches(model,
  shape=shape)`` (default ``bn="frozen"``), ``model.train()``, SGD over ``branch_parameters(model)``.
  One convolution per layer: the branch is a parametrization of the conv weight, ``W + delta``,
  and its backward computes the input gradient and the weight gradient of the branch taps only
  (``timm_branch.branch_conv.BranchedConv``), never the frozen kernel's full weight gradient.
- ``frozen-bn`` (a diagnostic, no target): fine-tuning every conv and the other layers, with
  BatchNorm frozen in eval mode as the branch variants have it; its ratio to ``fine-tune`` is what
  the BatchNorm policy alone costs or saves.
- ``naive-<shape>``: the reference the literature uses (ACNet-style parallel branch convs):
  every conv that ``timm_branch.find_conv_bn_pairs`` pairs is wrapped so that
  ``output = conv(x) + sum(branch_conv(x))`` with extra, bias-free, zero-initialised ``nn.Conv2d``
  branch convs: ``1x1`` -> one 1x1 conv; ``cross`` -> a ``k_h x 1`` conv plus a ``1 x k_w`` conv
  (one conv when the kernel is 1x1; the 1x1 one is dropped for a ``1 x k`` kernel, as it is
  contained in the other); ``full`` -> a ``k_h x k_w`` conv. Every branch conv has the conv's stride,
  dilation and groups; along an axis where the branch kernel is 1 its padding is
  ``padding - centre * dilation`` (``centre = (k - 1) // 2``), so it reads the same input pixel as the
  conv's centre tap (padding 0 for a 3x3, padding 1 conv). The original convs and BatchNorms are
  frozen (BatchNorm in eval mode), only the branch convs train. At build time the wrapped model's
  output is checked against the unwrapped model's (exact equality at zero init on the CPU; on a
  GPU, where cuDNN may choose other convolution algorithms for the two models, to 1e-2 of the
  largest output), and every wrapped conv, given random branch weights, against one conv with the
  branch kernels added onto the centre taps of its weight (on a float32 CPU copy; so the naive
  branch is the same function class as ``branch-<shape>``). Every ``branch-<shape>`` model is
  checked against the unbranched one at zero init too.

Every variant computes ``loss = model.forward_features(x).float().pow(2).mean()`` and runs
``zero_grad(set_to_none=True); loss.backward(); SGD(lr, momentum).step()``.

Device and precision (``--device``, ``--precision``, ``--channels-last``, ``--compile``): the model
and the batch live on the device; ``--precision bf16`` runs the forward under
``torch.autocast(dtype=torch.bfloat16)`` (weights, gradients and optimiser state stay float32, as
in the trainer); ``--channels-last`` converts the model and the batch to ``torch.channels_last``;
``--compile`` compiles every variant's ``forward_features`` with ``torch.compile`` (default mode and
backend inductor, or ``--compile-backend``). Compiled and eager are separate runs: in a compiled run
every variant, the fine-tune baseline included, is compiled, and each variant's first step
(compilation included) is reported with the graphs and graph breaks dynamo made for it.

Step time: all variants live in one process. Each first runs ``--warmup`` steps, then ``--steps``
rounds follow; in each round every variant runs one timed step (``time.perf_counter`` around the
whole step; on CUDA with ``torch.cuda.synchronize()`` before and after, so the time covers the
step's kernels), the starting variant rotating from round to round (ABC, BCA, CAB, ...) so that
drift and cache effects hit all variants alike. Python's garbage collector is paused while timing.
The report gives the median step time per variant (and the inter-quartile range), and the ratio
``median(variant) / median(fine-tune)``. ``torch.set_num_threads(--threads)``, default: every core
this process may run on.

Peak memory on CUDA: one variant after the other, in this process, before the timed rounds:
``torch.cuda.reset_peak_memory_stats``, ``max(1, --warmup)`` steps, then
``torch.cuda.max_memory_allocated`` minus the memory allocated just before those steps (the
caching allocator counts live tensors only, so the other variants' models are in the baseline).
These steps are extra warm-up for the timing.

Peak memory on the CPU, likewise in this process before the timed rounds (since 2026-11-28; before,
the peak resident-set increase of a fresh process per variant, which moved with how malloc reused
memory): the peak bytes of CPU tensors alive at one time during the variant's first
``max(1, --warmup)`` steps, summed in time order from the profiler's memory events
(``_common.cpu_peak_increase``); like CUDA's figure it counts tensors, not allocator slack.
On either device the ratio is ``increase(variant) / increase(fine-tune)``.

Run (from the repository root)::

    python benchmarks/step_time.py                      # CPU when no GPU: resnet18, 64 px, batch 32, 20 steps
    python benchmarks/step_time.py --markdown           # + a Markdown section for benchmarks/RESULTS.md
    python benchmarks/step_time.py --variants fine-tune,branch-cross,naive-cross --steps 50
    python benchmarks/step_time.py --device cuda --precision bf16 --channels-last --model resnet50 \\
        --img-size 224 --batch-size 128 --steps 30 --warmup 5 [--compile]
    python benchmarks/step_time.py --smoke              # a few-step check that everything runs

Targets (speed issue #18), as times the fine-tune step, and never slower than ``naive-<shape>``
where both are measured (:data:`TARGETS`): on the CPU (resnet18, 64 px, batch 32, fp32)
``branch-1x1`` <= 0.75, ``branch-cross`` <= 0.88, ``branch-full`` <= 0.97; on CUDA eager every shape
<= 1.00; on CUDA compiled 0.85, 0.95 and 1.00.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import _common as common

SHAPES = ("1x1", "cross", "full")
BASELINE = "fine-tune"
FROZEN_BN = "frozen-bn"
ALL_VARIANTS = (BASELINE, FROZEN_BN, *(f"branch-{s}" for s in SHAPES), *(f"naive-{s}" for s in SHAPES))
TARGETS = {
    "cpu": {"1x1": 0.75, "cross": 0.88, "full": 0.97},
    "cuda": {"1x1": 1.00, "cross": 1.00, "full": 1.00},
    "cuda-compiled": {"1x1": 0.85, "cross": 0.95, "full": 1.00},
}
"""Step time of ``branch-<shape>`` over fine-tuning that the speed issue (#18) asks for, by device
(and on CUDA by eager or compiled run); every one also no slower than ``naive-<shape>``."""


def targets(device: torch.device, compiled: bool) -> dict[str, float]:
    """The :data:`TARGETS` of a run on ``device`` (CPU targets for any device but CUDA)."""
    if device.type != "cuda":
        return TARGETS["cpu"]
    return TARGETS["cuda-compiled" if compiled else "cuda"]
_GPU_ZERO_INIT_TOLERANCE = 1e-2
"""Largest zero-init output difference accepted on a GPU, relative to the largest output."""


# --------------------------------------------------------------------------------------------------
# The naive reference: conv(x) + branch_conv(x) with extra convs
# --------------------------------------------------------------------------------------------------


class _NaiveBranchConv(nn.Module):
    """``conv(x) + sum(b(x) for b in branches)``: extra zero-initialised convs of a branch shape."""

    def __init__(self, conv: nn.Conv2d, shape: str):
        super().__init__()
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise NotImplementedError(
                f"the naive reference supports plain nn.Conv2d with numeric zero padding only, not "
                f"{type(conv).__name__}(padding={conv.padding!r}, padding_mode={conv.padding_mode!r}); "
                "leave the naive-* variants out (--variants) for this model"
            )
        self.conv = conv
        self.shape = shape
        self.branches = nn.ModuleList(
            _zero_conv(conv, kernel) for kernel in _naive_kernels(tuple(conv.kernel_size), shape)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        h, w = out.shape[-2:]
        for branch in self.branches:
            y = branch(x)
            if y.shape[-2:] != out.shape[-2:]:  # even kernels: the centre-aligned 1-tap conv runs one longer
                y = y[..., :h, :w]
            out = out + y
        return out


def _naive_kernels(kernel_size: tuple[int, int], shape: str) -> list[tuple[int, int]]:
    kh, kw = kernel_size
    if shape == "1x1":
        return [(1, 1)]
    if shape == "full":
        return [(kh, kw)]
    kernels = list(dict.fromkeys([(kh, 1), (1, kw)]))  # a 1x1 kernel: one conv
    if len(kernels) == 2 and (1, 1) in kernels:  # a 1 x k kernel: the 1x1 conv is inside the 1 x k one
        kernels.remove((1, 1))
    return kernels


def _zero_conv(conv: nn.Conv2d, kernel: tuple[int, int]) -> nn.Conv2d:
    padding = []
    for axis in range(2):
        k, p, d = conv.kernel_size[axis], conv.padding[axis], conv.dilation[axis]
        pad = p if kernel[axis] == k else p - ((k - 1) // 2) * d
        if pad < 0:
            raise NotImplementedError(f"{conv} needs negative padding for a centre-aligned {kernel} branch")
        padding.append(pad)
    branch = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel,
        stride=conv.stride,
        padding=tuple(padding),
        dilation=conv.dilation,
        groups=conv.groups,
        bias=False,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    nn.init.zeros_(branch.weight)
    return branch


def add_naive_branches(model: nn.Module, shape: str) -> list[nn.Parameter]:
    """Wrap every paired conv of ``model`` in :class:`_NaiveBranchConv`; freeze everything else.

    Returns the branch convs' weights (the only trainable parameters).
    """
    from timm_branch import find_conv_bn_pairs

    pairs = find_conv_bn_pairs(model)
    for param in model.parameters():
        param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for pair in pairs:
        parent_name, _, child = pair.conv.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = _NaiveBranchConv(getattr(parent, child), shape)
        setattr(parent, child, wrapper)
        params.extend(b.weight for b in wrapper.branches)
    return params


def _train_mode(model: nn.Module, variant: str) -> None:
    """``model.train()``; for the naive reference and ``frozen-bn``, BatchNorm back in eval mode."""
    model.train()
    if variant.startswith("naive-") or variant == FROZEN_BN:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


# --------------------------------------------------------------------------------------------------
# Variants and the training step
# --------------------------------------------------------------------------------------------------


def build_variant(model: nn.Module, variant: str) -> list[nn.Parameter]:
    """Turn ``model`` (in place) into ``variant``; return the parameters the optimiser updates."""
    import timm_branch

    if variant == BASELINE:
        for param in model.parameters():
            param.requires_grad_(True)
        params = list(model.parameters())
    elif variant == FROZEN_BN:
        frozen = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
        params = [p for p in model.parameters() if id(p) not in frozen]
        for param in model.parameters():
            param.requires_grad_(id(param) not in frozen)
    elif variant.startswith("branch-"):
        timm_branch.add_branches(model, shape=variant.removeprefix("branch-"))
        params = list(timm_branch.branch_parameters(model))
    elif variant.startswith("naive-"):
        params = add_naive_branches(model, variant.removeprefix("naive-"))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(ALL_VARIANTS)}")
    _train_mode(model, variant)
    return params


def check_zero_init(base: nn.Module, model: nn.Module, variant: str, x: torch.Tensor) -> float:
    """Max |difference| of ``forward_features`` between ``model`` and ``base`` (both in eval mode,
    float32): zero on the CPU, within :data:`_GPU_ZERO_INIT_TOLERANCE` of the largest output elsewhere."""
    base.eval()
    model.eval()
    with torch.no_grad():
        ref = base.forward_features(x)
        out = model.forward_features(x)
    _train_mode(model, variant)
    diff = (out - ref).abs().max().item()
    exact = x.device.type == "cpu"
    if (exact and not torch.equal(out, ref)) or diff > _GPU_ZERO_INIT_TOLERANCE * ref.abs().max().item():
        raise AssertionError(f"{variant}: output differs from the base model at zero init (max |diff| {diff:.3g})")
    return diff


def check_naive_alignment(model: nn.Module) -> None:
    """Check that each naive branch is the conv-kernel delta it stands for.

    For every :class:`_NaiveBranchConv` (on a float32 CPU copy, with random branch weights),
    ``conv(x) + sum(branch(x))`` must equal one conv whose weight is ``W`` plus the branch kernels
    placed on the centre taps, i.e. the weight-space branch of the same shape.
    """
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not isinstance(module, _NaiveBranchConv):
            continue
        wrapper = copy.deepcopy(module).to("cpu", torch.float32)
        conv = wrapper.conv
        kh, kw = conv.kernel_size
        weight = conv.weight.detach().clone()
        with torch.no_grad():
            for branch in wrapper.branches:
                branch.weight.copy_(torch.randn(branch.weight.shape, generator=gen) * 0.1)
                bh, bw = branch.kernel_size
                rows = slice(None) if bh == kh else slice((kh - 1) // 2, (kh - 1) // 2 + 1)
                cols = slice(None) if bw == kw else slice((kw - 1) // 2, (kw - 1) // 2 + 1)
                weight[:, :, rows, cols] += branch.weight
            size = 2 * max(kh, kw) + 5
            x = torch.randn(2, conv.in_channels, size, size + 1, generator=gen)
            ref = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            out = wrapper(x)
        if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
            diff = (out - ref).abs().max().item() if out.shape == ref.shape else f"shapes {out.shape} vs {ref.shape}"
            raise AssertionError(f"naive {wrapper.shape} branch of {name} is not its centre-aligned kernel delta ({diff})")


def prepare_variant(args: argparse.Namespace, base: nn.Module, variant: str, x: torch.Tensor,
                    check: bool) -> tuple[Callable[[], None], int]:
    """A copy of ``base`` turned into ``variant`` (checked, then compiled if asked); its training
    step and its number of trainable parameters."""
    model = copy.deepcopy(base)
    params = build_variant(model, variant)
    if check:
        if variant != BASELINE:
            check_zero_init(base, model, variant, x[: min(2, len(x))])
        if variant.startswith("naive-"):
            check_naive_alignment(model)
    if args.compile:
        common.compile_features(model, args.compile_backend)
    step = common.make_train_step(model, params, x, args.lr, args.momentum, args.precision)
    return step, sum(p.numel() for p in params)


def first_steps(steps: dict[str, Callable[[], None]], sync: Callable[[], None]) -> dict[str, dict]:
    """One step per variant, alone: its seconds (compilation included) and the graphs and graph
    breaks dynamo made during it."""
    info = {}
    for name, step in steps.items():
        graphs, breaks = common.compile_counters()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        seconds = time.perf_counter() - t0
        graphs_after, breaks_after = common.compile_counters()
        info[name] = {"seconds": seconds, "graphs": graphs_after - graphs, "breaks": breaks_after - breaks}
        print(f"  compiled {name}: first step {seconds:.1f} s, {graphs_after - graphs} graphs, "
              f"{breaks_after - breaks} graph breaks", file=sys.stderr, flush=True)
    return info


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def build_rows(variants, times, memory, n_params, goal: dict[str, float]) -> list[dict]:
    base_t = common.median_iqr(times[BASELINE])[0]
    base_m = memory[BASELINE] if memory else None
    rows = []
    for v in variants:
        med, q1, q3 = common.median_iqr(times[v])
        rows.append({
            "variant": v,
            "params": n_params[v],
            "median_ms": med * 1e3,
            "iqr_ms": (q1 * 1e3, q3 * 1e3),
            "time_ratio": med / base_t,
            "mem_mib": memory[v] if memory else None,
            "mem_ratio": memory[v] / base_m if memory and base_m and base_m > 0 else None,
        })
    medians = {r["variant"]: r["median_ms"] for r in rows}
    for row in rows:
        row["target"] = _target(row, medians, goal)
    return rows


def _target(row: dict, medians: dict[str, float], goal: dict[str, float]) -> str:
    """``ok`` / ``OVER`` for a branch variant against its shape's target in ``goal`` and its naive twin."""
    if not row["variant"].startswith("branch-"):
        return ""
    shape = row["variant"].removeprefix("branch-")
    naive = medians.get(f"naive-{shape}")
    met = row["time_ratio"] <= goal[shape] and (naive is None or row["median_ms"] <= naive)
    return f"{'ok' if met else 'OVER'} (<= {goal[shape]:.2f}x{', <= naive' if naive is not None else ''})"


def _verdict(rows: list[dict]) -> str:
    branch = [r for r in rows if r["variant"].startswith("branch-")]
    if not branch:
        return "no branch-* variant measured"
    over = [f"{r['variant']} ({r['time_ratio']:.3f}x)" for r in branch if r["target"].startswith("OVER")]
    met = [r["variant"] for r in branch if r["target"].startswith("ok")]
    parts = [f"targets met for: {', '.join(met)}"] if met else []
    if over:
        parts.append(f"NOT met for: {', '.join(over)}")
    return "; ".join(parts)


def table(rows: list[dict], compiled: dict[str, dict] | None, markdown: bool) -> str:
    headers = ["variant", "trainable params", "step time, median (ms)", "IQR (ms)", "time vs fine-tune",
               "peak memory increase (MiB)", "memory vs fine-tune", "target"]
    if not markdown:
        headers = ["variant", "trainable", "median ms", "IQR ms", "time x", "peak MiB", "mem x", "target"]
    if compiled:
        headers += ["first step (s)", "graphs", "graph breaks"] if markdown else ["1st step s", "graphs", "breaks"]
    cells = []
    for r in rows:
        row = [r["variant"], f"{r['params']:,}", f"{r['median_ms']:.2f}", f"{r['iqr_ms'][0]:.2f}-{r['iqr_ms'][1]:.2f}",
               f"{r['time_ratio']:.3f}x", common.fmt(r["mem_mib"], ".1f"),
               common.fmt(r["mem_ratio"], ".2f") + ("x" if r["mem_ratio"] is not None else ""), r["target"]]
        if compiled:
            c = compiled[r["variant"]]
            row += [f"{c['seconds']:.1f}", str(c["graphs"]), str(c["breaks"])]
        cells.append(row)
    if not markdown:
        return common.text_table(headers, cells)
    return common.markdown_table(headers, cells, align="lrrrrrrl" + "rrr" * bool(compiled))


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name, built with pretrained=False (default resnet18)")
    p.add_argument("--img-size", type=int, default=64, help="square input size in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (rounds) per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant (default 3)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {','.join(ALL_VARIANTS)}; {BASELINE} is always added")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--profile", action="store_true", help="after timing, print a torch.profiler summary of a few steps per variant")
    p.add_argument("--smoke", action="store_true", help="quick check that everything runs: 32 px, batch 4, no warm-up, 2 steps, 1 thread unless --threads, CPU memory in-process over 1 step")
    common.add_run_options(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.img_size, args.batch_size, args.steps, args.warmup = 32, 4, 2, 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    if BASELINE not in variants:
        variants.insert(0, BASELINE)
    args.variant_list = list(dict.fromkeys(variants))
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --warmup >= 0")
    return args


def profile_step(name: str, step: Callable[[], None], device: torch.device, n: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
    print(f"\n=== profile: {name} ({n} steps) ===")
    # On a GPU both views: where the device spends its time, and where the host does.
    for sort in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    sync = common.synchronizer(device)
    variants = args.variant_list
    base = common.build_model(args.model, args.seed, device, args.channels_last)
    x = common.make_batch(args.batch_size, args.img_size, args.seed, device, args.channels_last)
    steps, n_params = {}, {}
    for v in variants:
        steps[v], n_params[v] = prepare_variant(args, base, v, x, check=True)
    del base
    compiled = first_steps(steps, sync) if args.compile else None

    memory: dict[str, float] | None = None
    memory_method = "not measured (--no-memory)"
    if not args.no_memory:
        # Extra warm-up steps for the timing that follows.
        n = max(1, args.warmup)
        if device.type == "cuda":
            memory = {v: common.cuda_peak_increase(steps[v], n, device) for v in variants}
            memory_method = common.CUDA_MEMORY_METHOD.format(n=n)
        else:
            memory = {v: common.cpu_peak_increase(steps[v], n) for v in variants}
            memory_method = common.CPU_MEMORY_METHOD.format(n=n)
    print(f"timing {len(variants)} variants: {args.warmup} warm-up + {args.steps} interleaved steps each ...", file=sys.stderr, flush=True)
    times = common.time_interleaved(steps, args.warmup, args.steps, sync)
    if args.profile:
        for v in variants:
            profile_step(v, steps[v], device)

    mode = f"torch.compile (backend {args.compile_backend}) of forward_features" if args.compile else "eager"
    setup = (
        f"{args.model} (pretrained=False), {args.img_size}x{args.img_size} px, batch {args.batch_size}, "
        f"{args.precision}{' (autocast)' if args.precision == 'bf16' else ''}, "
        f"{'channels_last' if args.channels_last else 'contiguous (NCHW)'}, {mode}; "
        f"loss = mean(forward_features(x)^2), SGD(lr={args.lr}, momentum={args.momentum}); "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant, interleaved"
    )
    info = common.machine_info(device, args.threads)
    rows = build_rows(variants, times, memory, n_params, targets(device, args.compile))
    common.print_header(setup, info, f"peak memory: {memory_method}")
    print(table(rows, compiled, markdown=False))
    print("\n" + _verdict(rows))
    title = common.section_title(device, "step time", f"{args.model}, {args.img_size} px", args)
    facts = {"Setup": setup, "Peak memory": memory_method}
    common.emit_markdown(common.markdown_section(title, info, facts, table(rows, compiled, markdown=True), _verdict(rows) + "."), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
