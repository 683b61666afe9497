"""Helpers shared by the benchmark scripts: device, precision and compilation options, the
training step that ``step_time.py`` and ``merge_time.py`` time, the trainer's task-1 learner that
``pipeline.py`` and ``stream.py`` drive, interleaved timing, peak tensor memory (CPU and CUDA),
machine information and the text / Markdown tables.

The scripts import it as ``_common`` (Python puts the script's own folder, ``benchmarks/``, first
on ``sys.path``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
RECOMPILE_LIMIT = 64
"""Compiled graphs per code object before dynamo falls back to eager. Every variant of a run
recompiles the same ``forward_features`` (other modules, flags, BatchNorm modes), and torch's
default (8) would silently turn later variants back to eager."""


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_run_options(p: argparse.ArgumentParser, compile: bool = True, backend: bool = True) -> None:
    """``--device``, ``--precision``, ``--channels-last``, ``--threads``, ``--seed``, ``--markdown``
    and (with ``compile``) ``--compile``, and (with ``backend`` too) ``--compile-backend``: the
    options the scripts share."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else the CPU (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 under torch.autocast (weights stay float32, as in the trainer; default fp32)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in torch.channels_last memory format")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True: cuDNN times its algorithms per shape and keeps the fastest")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model (the whole run compiled; run again without it for eager)")
        if backend:
            p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile (default inductor)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default: all usable cores, {usable_cores()}; 1 with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write a Markdown section for benchmarks/RESULTS.md: to stdout, or appended to FILE")


def setup_run(args: argparse.Namespace) -> torch.device:
    """Resolve ``--device``, default ``--threads`` (1 with ``--smoke``), set the torch thread count."""
    if args.threads is None:
        # One thread for smoke checks: on a busy machine OpenMP threads that wait for each other
        # can make a step ten times slower.
        args.threads = 1 if getattr(args, "smoke", False) else usable_cores()
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return resolve_device(args.device)


def resolve_device(spec: str) -> torch.device:
    """The trainer's resolution of ``--device`` (:func:`timm_branch.train.distributed.resolve_device`),
    with an early exit when CUDA is asked for and absent."""
    from timm_branch.train.distributed import resolve_device as trainer_device

    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    return trainer_device(spec)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 for ``"bf16"``; a disabled one for ``"fp32"``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def place(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def as_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def compile_features(model: nn.Module, backend: str) -> None:
    """Replace ``model.forward_features`` by its ``torch.compile``'d version, in place.

    The bound method rather than the module: the trainer and these scripts call
    ``forward_features`` / ``forward_head`` directly, never ``model(x)``, and the module itself
    (its classes, state-dict keys, branches) stays as it is for ``add_branches`` / ``merge_branches``.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    model.forward_features = torch.compile(model.forward_features, backend=backend)


def compile_counters() -> tuple[int, int]:
    """Dynamo's counts so far in this process: (graphs compiled, graph breaks)."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --------------------------------------------------------------------------------------------------
# The training step of step_time.py and merge_time.py
# --------------------------------------------------------------------------------------------------


def build_model(name: str, seed: int, device: torch.device, channels_last: bool) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with ``torch.manual_seed(seed)``, placed on ``device``."""
    import timm

    torch.manual_seed(seed)
    return place(timm.create_model(name, pretrained=False), device, channels_last)


def make_batch(batch_size: int, img_size: int, seed: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A seeded float32 batch ``(batch_size, 3, img_size, img_size)`` of standard normal pixels."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    return as_input(x.to(device), channels_last)


def make_train_step(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, lr: float, momentum: float,
                    precision: str) -> Callable[[], None]:
    """One training step: ``zero_grad(set_to_none=True)``; ``loss = mean(forward_features(x)^2)``
    (under autocast for ``bf16``, the loss reduced in float32); ``loss.backward()``;
    ``SGD(params, lr, momentum).step()``."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, precision):
            loss = model.forward_features(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, rounds: int,
                     sync: Callable[[], None], rotate: bool = True) -> dict[str, list[float]]:
    """Wall time in seconds of every call of each of ``steps``, measured in rounds.

    Each step first runs ``warmup`` untimed times (in turn). Then, in each of ``rounds`` rounds,
    every step runs once, timed with ``time.perf_counter`` between two ``sync()`` calls (so on a
    GPU the time covers the step's kernels, not only their launch). With ``rotate`` the first
    step of a round rotates (ABC, BCA, CAB, ...) so that drift and cache effects hit all steps
    alike; without it the order is fixed, for steps that must follow one another. Python's garbage
    collector is paused while timing.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    sync()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)] if rotate else names[i]
                sync()
                t0 = time.perf_counter()
                steps[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def median_iqr(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of ``times``."""
    t = sorted(times)
    # Inclusive quartiles stay within the measured times; the exclusive ones extrapolate from few samples.
    q = statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0], t[0], t[0]]
    return statistics.median(t), q[0], q[2]


def cuda_peak_increase(step: Callable[[], object], n_steps: int, device: torch.device) -> float:
    """Peak CUDA memory allocated while running ``n_steps`` steps, above what was allocated just
    before them (MiB).

    ``torch.cuda.reset_peak_memory_stats`` first, ``torch.cuda.max_memory_allocated`` after: the
    caching allocator counts live tensor bytes only, so tensors of other models in the process
    are in the baseline and allocator slack is not counted.
    """
    sync = synchronizer(device)
    gc.collect()
    sync()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(n_steps):
        step()
    sync()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_increase(step: Callable[[], object], n_steps: int) -> float:
    """Peak bytes of CPU tensors allocated while running ``n_steps`` steps and alive at one time,
    in MiB: the CPU counterpart of :func:`cuda_peak_increase`.

    Read from the profiler's memory events (``torch.profiler.profile(profile_memory=True)``): every
    tensor allocation and free during the steps, summed in time order. It counts live tensors, not
    the process's resident set, so it does not depend on how malloc reuses or returns freed
    memory. A tensor allocated before the steps and freed during them is not subtracted (the
    profiler does not know its size): the figure can err high, not low.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n_steps):
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


CPU_MEMORY_METHOD = (
    "peak bytes of CPU tensors alive at one time during the variant's first {n} step(s), from the "
    "profiler's memory events (in this process, before the timed rounds)"
)

CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated during the variant's first {n} step(s), minus "
    "torch.cuda.memory_allocated just before them (peak stats reset per variant, one process)"
)


# --------------------------------------------------------------------------------------------------
# The trainer's own task-1 step (pipeline.py, stream.py)
# --------------------------------------------------------------------------------------------------


def add_task_one_options(p: argparse.ArgumentParser, strategies: Sequence[str]) -> None:
    """``--model`` and ``--strategy``: the trainer run whose task-1 step a script drives."""
    p.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    p.add_argument("--strategy", choices=strategies, default="branch", help="the trainer's strategy for task 1 (default branch)")


def task_one_learner(run, total_steps: int) -> tuple[object, torch.optim.Optimizer, object]:
    """``run``'s (a ``ContinualRun``) learner for task 1, prepared as the trainer prepares it
    (``new_learner``, ``prepare_task``: with a branch strategy, the first Branch-tuning task;
    ``start_epoch``), with the trainer's optimiser and a warmup-free schedule of ``total_steps``
    steps (``make_optimizer``). Returns ``(learner, optimizer, scheduler)``."""
    learner = run.new_learner()
    run.prepare_task(learner, 1)
    run.start_epoch(learner, 0)
    optimizer, scheduler = run.make_optimizer(learner, total_steps, 0)
    return learner, optimizer, scheduler


# --------------------------------------------------------------------------------------------------
# Machine information and reports
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict[str, str]:
    """``machine``, ``versions``, ``date`` and ``command`` (how this process was started)."""
    import timm

    cores = os.cpu_count()
    cpu = (f"{cpu_model()}, {cores} logical cores ({usable_cores()} usable by this process), "
           f"{threads} torch thread{'' if threads == 1 else 's'}")
    versions = f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host {cpu}"
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        machine = cpu
    script = os.path.relpath(sys.argv[0]) if sys.argv[0] else "benchmark"
    return {
        "machine": machine,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join([script, *sys.argv[1:]]),
    }


def print_header(setup: str, info: dict[str, str], *notes: str) -> None:
    """The text report's head: the setup, the machine and versions, then ``notes``, one a line."""
    print("\n" + "\n".join([setup, f"{info['machine']}; {info['versions']}", *notes]) + "\n")


def section_title(device: torch.device, subject: str, details: str, args: argparse.Namespace) -> str:
    """``"GPU <subject>: <details>, bf16, channels_last, compiled"``: the device kind and the run options."""
    options = [args.precision, *(["channels_last"] if args.channels_last else []),
               *(["cudnn.benchmark"] if args.cudnn_benchmark else [])]
    if hasattr(args, "compile"):
        options.append("compiled" if args.compile else "eager")
    return f"{'GPU' if device.type == 'cuda' else 'CPU'} {subject}: {details}, {', '.join(options)}"


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    head = line(headers)
    return "\n".join([head, "-" * len(head), *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` holds ``l`` or ``r`` per column (default: the first column
    left-aligned, the others right-aligned)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_section(title: str, info: dict[str, str], facts: dict[str, str], table: str, closing: str = "") -> str:
    """A RESULTS.md section: title, machine / software / date / command, ``facts``, table, closing line."""
    lines = [f"## {title}", "", f"- Machine: {info['machine']}", f"- Software: {info['versions']}",
             f"- Date: {info['date']}", f"- Command: `{info['command']}`"]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", table]
    if closing:
        lines += ["", closing]
    return "\n".join(lines) + "\n"


def emit_markdown(section: str, dest: str | None) -> None:
    """Print ``section`` (``dest == "-"``), append it to the file ``dest``, or nothing (``None``)."""
    if dest is None:
        return
    if dest == "-":
        print("\n" + section, end="")
        return
    with open(dest, "a", encoding="utf-8") as f:
        f.write("\n" + section)
