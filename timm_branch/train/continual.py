"""The continual run: a task sequence, a strategy per task, evaluation and export after each task.

Strategies (``TrainConfig.strategy``):

- ``finetune``: every parameter trains, BatchNorm in train mode.
- ``branch`` (Branch-tuning): before each task after the first, :func:`~timm_branch.add_branches`
  (``shape``, ``bn``); the branches and the SSL heads train; after the task the branches are
  merged. Task 0 is ordinary SSL training.
- ``cassle``: fine-tuning plus CaSSLe distillation (predictor + the method's loss) towards a
  frozen copy of the previous task's backbone and projector; total loss ``ssl + distill_weight *
  distill``.
- ``cassle+branch``: both.
- ``joint``: the offline reference: task t trains (continuing from task t-1's model, like
  fine-tuning) on the union of the data of tasks 0..t.

With ``pretrained`` set, task 0 starts from those weights and uses the strategy too (its CaSSLe
teacher is the pretrained backbone with the freshly initialised projector).

Momentum networks (BYOL, MoCo v2+) are copies of the backbone and heads, branched and merged
together with the online network and EMA-updated on *all* parameters, so they follow the
online network's effective weights, branches included.

Reproducibility: every random draw of task ``t``, epoch ``e`` comes from seeds derived from
``(seed, t, e)``, so a run resumed from a checkpoint draws what an uninterrupted run would.

Data-parallel (under ``torchrun``, :mod:`timm_branch.train.distributed`): every rank draws the
global batch and its augmentations as one process does and runs the backbone (in
``DistributedDataParallel``) on its slice; the backbone features of the global batch are
gathered on every rank before the SSL heads, so the losses, heads, queues, momentum networks,
distiller and probe compute what one process computes. Rank 0 alone writes and evaluates.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._offline import check_hub_reachable
from ..branch import iter_branches
from ..card import read_run, render_model_card
from ..data import NORMALIZATIONS, DataSource, EvalTransform, ImageFiles, Scenario, TwoViewAugment, build_scenario, default_workers, load_source
from ..evaluate import ContinualMetrics, TaskEvaluation, extract_features, knn_predict, linear_probe, per_task_accuracy, top1_accuracy
from ..evaluate.metrics import PROBES
from ..evaluate.plots import plot_accuracy_curves, plot_accuracy_matrix
from ..evaluate.report import CURVES_FILE
from ..export import LOCAL_DIR, create_architecture, create_pretrained, save_pretrained
from ..ssl import SSLMethod, build_distiller, build_method, cosine_momentum, ema_update
from ..surgery import add_branches, branch_parameters, merge_branches, require_norms
from . import checkpoint as ckpt
from . import distributed
from .config import RESUME_MAY_CHANGE, TrainConfig
from .eta import RunClock
from .lock import run_folder_lock
from .optim import build_optimizer, build_scheduler
from .tensorboard import TensorBoardLogger

log = logging.getLogger("timm_branch.train")

ONLINE_PROBE_LR = 0.1
"""Learning rate of the online linear probe (solo-learn's ``classifier_lr``), SGD momentum from the optimiser."""
_PROBE_SALT = 0x5EED_0F_9B0BE
"""Mixed into an epoch's seed for the online probe's generator, so its draws are the probe's own."""
_SCORE_NAMES = {"knn_top1": "kNN top-1", "linear_top1": "linear-probe top-1", "online_top1": "online-probe top-1"}
"""How the per-task log line names the scores of :meth:`ContinualRun.evaluate`."""
_TOO_SMALL = re.compile(r"too small|greater than (the )?actual input size|smaller than kernel|non-positive|"
                        r"Calculated output size")
"""PyTorch's messages for an input smaller than a conv's or a pooling's window."""
_READ_BACK_EVERY = 16
"""Training steps between read-backs of their losses (each read-back waits for the GPU to catch up)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the task stopped and the last checkpoint is kept."""


@dataclass
class Learner:
    """The networks one task trains, and the frozen ones it learns from."""

    backbone: nn.Module
    method: SSLMethod
    momentum: nn.Module | None = None
    teacher: nn.Module | None = None
    teacher_method: SSLMethod | None = None
    distiller: nn.Module | None = None
    probe: nn.Linear | None = None
    encoder: nn.Module | None = None  # the backbone as a task's steps call it (see ContinualRun.task_encoders)
    momentum_encoder: nn.Module | None = None  # the momentum network, likewise

    def trained(self) -> dict[str, nn.Module | None]:
        """The modules whose state a checkpoint keeps (the teacher is rebuilt from the last task)."""
        return {"backbone": self.backbone, "method": self.method, "momentum": self.momentum, "distiller": self.distiller,
                "probe": self.probe}

    def kept(self) -> dict[str, nn.Module | None]:
        """The modules a finished task keeps beside the merged backbone."""
        return {"method": self.method, "momentum": self.momentum, "probe": self.probe}


def features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Global-pooled backbone features ``(B, num_features)`` of a float batch."""
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


def _global(per_view: list[torch.Tensor]) -> list[torch.Tensor]:
    """The features ``(B, num_features)`` of the global batch: each of this rank's per-view
    features ``(b, num_features)`` gathered from every rank in rank order."""
    return [distributed.gather_rows(f) for f in per_view]


class _Encoder(nn.Module):
    """The backbone as one module call, ``views -> [features(backbone, v) for v in views]``
    (each ``(b, num_features)``), the call ``DistributedDataParallel`` must see to reduce gradients."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [features(self.backbone, v) for v in views]


def _seed(config: TrainConfig, task: int, epoch: int) -> int:
    return (config.seed * 1_000_003 + (task + 1) * 10_007 + (epoch + 1) * 101) % (2**62)


class ContinualRun:
    """One continual SSL run in ``config.output``; :meth:`run` trains every unfinished task.

    The pieces of one task's training are public for tools that drive the trainer's own step
    (``benchmarks/``): :meth:`new_learner` and :meth:`prepare_task` give the networks of a task,
    :meth:`make_optimizer` their optimiser and schedule, :meth:`task_encoders` the encoders the
    step calls, :meth:`start_epoch` and :meth:`epoch_batches` one epoch, :meth:`train_step` one
    step; :meth:`task_indices` the training images of a task; :meth:`new_backbone` a fresh
    backbone, :meth:`probe_batch` the online probe's labelled batch, :meth:`evaluate` a backbone's
    scores and :meth:`features` the features they are computed on::

        learner = run.new_learner()
        run.prepare_task(learner, task)
        optimizer, scheduler = run.make_optimizer(learner, total_steps, warmup_steps)
        with run.task_encoders(learner):
            indices = run.task_indices(task).to(run.device)
            for epoch, (_, gen, batches) in enumerate(run.epoch_batches(indices, task, 0, steps)):
                run.start_epoch(learner, epoch)
                for i, batch in enumerate(batches):
                    loss = run.train_step(learner, batch, None, gen, optimizer, scheduler, epoch * steps + i, total_steps)

    Args:
        config: the run's configuration (validated here).
        progress: show tqdm progress bars.
    """

    def __init__(self, config: TrainConfig, progress: bool = True):
        # The preset's settings fill the fields left unset, so everything below reads concrete values.
        config = self.config = config.validate().with_preset()
        self.progress = progress
        self.run_dir = Path(config.output)
        self.tensorboard = TensorBoardLogger(self.run_dir / "tensorboard")
        self.device = distributed.resolve_device(config.device)
        self._check_parallel()
        sources = [load_source(spec, config.image_size, workers=config.workers, stream=config.stream) for spec in config.data]
        source: DataSource | list[DataSource] = sources if config.scenario == "domain" else sources[0]
        self.scenario: Scenario = build_scenario(config.scenario, source, None if config.scenario == "domain" else config.num_tasks, config.split_seed)
        self._check_data()
        self._check_model()
        if config.push_to_hub and distributed.is_main_process():
            from ..hub import resolve_token

            resolve_token()  # no token: fail now, not after a task of training
        images = self.scenario.source.train.images
        # In memory: all of it on the device once. Streamed: decoded batch by batch (_streamed).
        self.images = images if isinstance(images, ImageFiles) else images.to(self.device)
        # The ranks of a machine share its cores for decoding; training on the CPU, its cores run the
        # step, and more workers than one would take them from it (measured: benchmarks/stream.py).
        self._workers = config.workers if config.workers is not None else (
            1 if self.device.type == "cpu" else default_workers(distributed.local_world_size()))
        train_labels = self.scenario.source.train.labels
        if config.online_probe and train_labels is None:
            raise ValueError("online_probe needs labelled training data; the data source has no labels")
        self.labels = train_labels.to(self.device) if config.online_probe else None
        recipe_method = build_method(config.method, 8)  # only for its recipe
        self.recipe = recipe_method.recipe
        r = self.recipe
        mean, std = NORMALIZATIONS[config.normalization]
        self.augment = TwoViewAugment(
            config.image_size, solarize_p=r.solarize_p, blur_p=r.blur_p, crop_min_scale=r.crop_min_scale,
            flip_p=r.flip_p, jitter=r.jitter, jitter_p=r.jitter_p, gray_p=r.gray_p, mean=mean, std=std,
        ).to(self.device)
        self.eval_transform = EvalTransform(config.image_size, mean, std).to(self.device)
        # Recipes give the learning rate for batch 256; scale linearly, as solo-learn does.
        base_lr = config.lr if config.lr is not None else r.lr
        self.lr = base_lr * config.batch_size / 256 if config.lr is None else base_lr
        self.weight_decay = config.weight_decay if config.weight_decay is not None else r.weight_decay

    # -- checks ----------------------------------------------------------------------------------

    def _check_parallel(self) -> None:
        """Refuse a data-parallel setup that cannot compute what one process computes."""
        n = distributed.world_size()
        if distributed.launched_by_torchrun() and n == 1:
            raise ValueError("torchrun started several processes but no process group is initialised: run "
                             "ContinualRun inside timm_branch.train.distributed.process_group(device)")
        if self.config.batch_size % n:
            raise ValueError(f"batch_size={self.config.batch_size} is the global batch; it must be a multiple of "
                             f"the {n} processes, each of which takes an equal share")
        if self.config.sync_bn and n > 1 and self.device.type == "cpu":
            raise ValueError("sync_bn needs GPUs: torch.nn.SyncBatchNorm synchronises CUDA tensors only, and this run "
                             f"is on the CPU with {n} processes (drop --sync-bn)")

    def _check_data(self) -> None:
        for task in self.scenario.tasks:
            n = len(self.task_indices(task.index))
            if n < self.config.batch_size:
                raise ValueError(
                    f"task {task.index} has {n} training images, fewer than batch_size={self.config.batch_size}; "
                    "lower --batch-size or use fewer tasks"
                )

    def _check_model(self) -> None:
        """Refuse, now rather than after task 0 trained, a model without a norm layer of the
        ``norms`` kinds for a branch strategy, a ``zero_init_last`` the model's constructor does
        not take, ``pretrained`` weights on a Hub that cannot be reached, and images too small for
        the model."""
        if self.config.pretrained and not self.config.pretrained.startswith(LOCAL_DIR):
            check_hub_reachable(self.config.pretrained)  # offline: one line now, not a minute of retries
        with torch.device("meta"):  # the architecture only: no memory, no weights
            if self.config.strategy in ("branch", "cassle+branch"):
                require_norms(create_architecture(self.config.pretrained or self.config.model), self.config.norms)
            if self.config.zero_init_last is not None and not self.config.pretrained:
                try:
                    timm.create_model(self.config.model, pretrained=False, zero_init_last=self.config.zero_init_last)
                except TypeError as err:
                    raise ValueError(f"zero_init_last={self.config.zero_init_last} does not apply to {self.config.model}: "
                                     f"its constructor takes no zero_init_last ({err}); leave zero_init_last unset") from None
        self._check_image_size()

    def _check_image_size(self) -> None:
        """Run the model on a batch of ``image_size`` images on the meta device (shapes only, no
        compute), so that images too small for its downsampling are refused with the flag to
        change rather than with PyTorch's message in the first step."""
        name, size = self.config.pretrained or self.config.model, self.config.image_size

        def fails(side: int) -> str | None:
            try:
                model(torch.empty(2, 3, side, side))
            except RuntimeError as err:
                # Other errors: an op the meta device cannot run; the real step will tell.
                return str(err).splitlines()[0] if _TOO_SMALL.search(str(err)) else None
            return None

        with torch.device("meta"):
            model = create_architecture(name, num_classes=0).eval()
            why = fails(size)
            if why is None:
                return
            larger = next((size * 2**k for k in range(1, 8) if fails(size * 2**k) is None), None)
        hint = f" ({larger} works)" if larger is not None else ""
        raise ValueError(f"image_size={size} is too small for {name}: its layers shrink a {size}x{size} image to "
                         f"nothing ({why}); raise --image-size{hint}")

    def task_indices(self, task: int) -> torch.Tensor:
        """The indices ``(N,)`` (int64, on the CPU) into the training images of the images ``task``
        trains on: its own, or with ``strategy="joint"`` those of tasks ``0..task``."""
        if self.config.strategy == "joint":
            return torch.cat([self.scenario.tasks[t].train for t in range(task + 1)])
        return self.scenario.tasks[task].train

    # -- building ----------------------------------------------------------------------------------

    def new_backbone(self, random_init: bool = False) -> nn.Module:
        """A fresh backbone as the run builds it, on the device, seeded with the run's seed: the
        configured model without a classifier (``num_classes=0``), with its pretrained weights if
        any; ``random_init``: the pretrained architecture at random initialisation instead."""
        torch.manual_seed(self.config.seed)
        if self.config.pretrained and random_init:
            model = timm.create_model(self.config.pretrained, pretrained=False, num_classes=0)
        elif self.config.pretrained:
            model = create_pretrained(self.config.pretrained, num_classes=0)
        else:
            # zero_init_last changes the initial weights only, not the architecture: exports stay stock.
            init = {} if self.config.zero_init_last is None else {"zero_init_last": self.config.zero_init_last}
            model = timm.create_model(self.config.model, pretrained=False, num_classes=0, **init)
        return self._place(model)

    def _place(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.config.channels_last else module

    def new_learner(self) -> Learner:
        """The networks as a run starts: the backbone (random or ``pretrained`` weights), the
        method's heads, its momentum copy and the online probe where they apply, on the device.
        Seeded from the configuration: every call returns the same weights."""
        backbone = self.new_backbone()
        torch.manual_seed(_seed(self.config, -1, -1))
        method = self._place(build_method(self.config.method, backbone.num_features))
        momentum = copy.deepcopy(backbone) if method.uses_momentum else None
        probe = None
        if self.config.online_probe:
            probe = self._place(nn.Linear(backbone.num_features, self.scenario.source.num_classes))
        return Learner(backbone, method, momentum, probe=probe)

    def _learner_after(self, task: int) -> Learner:
        """The learner as it was when ``task`` finished, read back from ``task-K``."""
        learner = self.new_learner()
        ckpt.load_task(self.run_dir, task, learner.backbone, learner.kept())
        return learner

    def _uses_branches(self, task: int) -> bool:
        return self.config.strategy in ("branch", "cassle+branch") and (task > 0 or bool(self.config.pretrained))

    def _uses_cassle(self, task: int) -> bool:
        return self.config.strategy in ("cassle", "cassle+branch") and (task > 0 or bool(self.config.pretrained))

    def prepare_task(self, learner: Learner, task: int) -> None:
        """Teacher, distiller and branches for ``task``, identically on a fresh or a resumed run."""
        torch.manual_seed(_seed(self.config, task, -1))
        if self._uses_cassle(task):
            learner.teacher = copy.deepcopy(learner.backbone).eval().requires_grad_(False)
            learner.teacher_method = copy.deepcopy(learner.method).eval().requires_grad_(False)
            learner.distiller = self._place(build_distiller(learner.method))
        else:
            learner.teacher = learner.teacher_method = learner.distiller = None
        for p in learner.backbone.parameters():
            p.requires_grad_(True)
        if self._uses_branches(task):
            for net in (learner.backbone, learner.momentum):
                if net is not None:
                    add_branches(net, shape=self.config.shape, bn=self.config.bn, norms=self.config.norms,
                                 through=self.config.through)
        if learner.momentum is not None:
            learner.momentum.requires_grad_(False)

    def _trainable(self, learner: Learner) -> list[tuple[str, nn.Parameter]]:
        """Every tensor the task trains, by name; branch tensors are named ``branch.*`` (their own
        weight decay, :func:`~timm_branch.train.optim.param_groups`). With branches, the backbone's
        other trainable tensors are its BatchNorms' under ``bn="train"`` (``add_branches`` froze
        the rest)."""
        branches = {id(p) for p in branch_parameters(learner.backbone)}
        named = [(f"{'branch' if id(p) in branches else 'backbone'}.{n}", p)
                 for n, p in learner.backbone.named_parameters() if p.requires_grad]
        named += [(f"method.{n}", p) for n, p in learner.method.named_parameters() if p.requires_grad]
        if learner.distiller is not None:
            named += [(f"distiller.{n}", p) for n, p in learner.distiller.named_parameters()]
        return named

    # -- training ----------------------------------------------------------------------------------

    def _steps_per_epoch(self, task: int) -> int:
        return len(self.task_indices(task)) // self.config.batch_size

    def _epoch_order(self, indices: torch.Tensor, task: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """The epoch's device generator, seeded from ``(seed, task, epoch)``, and the order of
        ``indices`` it draws first (the augmentations draw from it next)."""
        gen = torch.Generator(device=self.device).manual_seed(_seed(self.config, task, epoch))
        return indices[torch.randperm(len(indices), generator=gen, device=self.device)], gen

    def epoch_batches(self, indices: torch.Tensor, task: int, start: int,
                      steps: int) -> Iterator[tuple[torch.Tensor, torch.Generator, Iterator[torch.Tensor]]]:
        """Per epoch ``start..config.epochs - 1`` of ``task``: its order of ``indices`` (on the
        device; :meth:`task_indices`) and its generator, seeded from ``(seed, task, epoch)``, and
        its ``steps`` uint8 global batches ``(batch_size, C, H, W)`` on the device, consecutive
        slices of the order. Pass the generator to :meth:`train_step`: its augmentations draw from it."""
        b = self.config.batch_size
        streamed = self._streamed(indices, task, start, steps) if isinstance(self.images, ImageFiles) else None
        for epoch in range(start, self.config.epochs):
            order, gen = self._epoch_order(indices, task, epoch)
            if streamed is None:
                yield order, gen, (self.images[order[s * b:(s + 1) * b]] for s in range(steps))
            else:
                yield order, gen, itertools.islice(streamed, steps)

    def _streamed(self, indices: torch.Tensor, task: int, start: int, steps: int) -> Iterator[torch.Tensor]:
        """The batches of epochs ``start..`` of ``task`` from a streamed folder, decoded by one set
        of worker processes for the whole task, which run ahead of the step in use across epoch
        ends (so they draw each epoch's order themselves, before the training loop does).

        Each rank decodes only its own rows (:func:`~timm_branch.train.distributed.local_rows`):
        the other rows of a rank's batch are zeros that nothing reads, since each rank augments
        its rows alone.
        """
        b, rows = self.config.batch_size, distributed.local_rows(self.config.batch_size)

        def chosen() -> Iterator[torch.Tensor]:
            for epoch in range(start, self.config.epochs):
                # On the host for the workers: one wait for the device per epoch, not per batch.
                yield from self._epoch_order(indices, task, epoch)[0][: steps * b].view(steps, b)[:, rows].cpu()

        local = self.images.batches(chosen(), self._workers, self.device)
        if rows == slice(0, b):
            return local

        def placed(part: torch.Tensor) -> torch.Tensor:
            batch = part.new_zeros((b, *part.shape[1:]))
            batch[rows] = part
            return batch

        return map(placed, local)

    def make_optimizer(self, learner: Learner, total: int,
                       warmup: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser of ``learner``'s trainable tensors (and the online probe's own group) and
        its warmup-cosine schedule over ``total`` steps, ``warmup`` of them warm-up."""
        cfg = self.config
        optimizer = build_optimizer(cfg.optimizer or self.recipe.optimizer, self._trainable(learner), self.lr, self.weight_decay,
                                    branch_weight_decay=cfg.branch_weight_decay,
                                    branch_lr=None if cfg.branch_lr_scale == 1 else self.lr * cfg.branch_lr_scale)
        if learner.probe is not None:
            # solo-learn's online classifier: its own learning rate, no weight decay, no LARS scaling.
            optimizer.add_param_group(dict(params=list(learner.probe.parameters()), lr=ONLINE_PROBE_LR, weight_decay=0.0, lars_exclude=True))
        return optimizer, build_scheduler(optimizer, total, warmup)

    def start_epoch(self, learner: Learner, epoch: int) -> None:
        """Every trained network in train mode, and the method told which epoch begins."""
        for net in (learner.backbone, learner.method, learner.momentum, learner.distiller, learner.probe):
            if net is not None:
                net.train()
        learner.method.on_epoch_start(epoch)

    def _train_task(self, learner: Learner, task: int, clock: RunClock) -> list[dict]:
        """Train ``task`` from its last checkpoint, if any; returns the record of every epoch of
        the task (:meth:`_epoch_record`), those before a resume included (kept in the checkpoint)."""
        cfg = self.config
        steps = self._steps_per_epoch(task)
        total = steps * cfg.epochs
        optimizer, scheduler = self.make_optimizer(learner, total, steps * cfg.warmup_epochs)
        start = 0
        records: list[dict] = []
        saved = ckpt.read_checkpoint(self.run_dir, task)
        if saved is not None:
            epoch, tensors, optim_state, where = saved
            ckpt.load_module_tensors(tensors, learner.trained(), where)
            optimizer.load_state_dict(optim_state["optimizer"])
            scheduler.load_state_dict(optim_state["scheduler"])
            records = list(optim_state.get("epochs", []))  # absent from checkpoints of older versions
            start = epoch + 1
            clock.skip(start * steps)
            log.info("task %d: resuming after epoch %d", task, epoch)
        indices = self.task_indices(task).to(self.device)
        streak = 0  # non-finite steps in a row (nonfinite="skip")
        for epoch, (order, gen, batches) in enumerate(self.epoch_batches(indices, task, start, steps), start):
            torch.manual_seed(_seed(cfg, task, epoch))
            self.start_epoch(learner, epoch)
            # The online probe's batches have a generator of their own: the SSL draws stay as without it.
            probe_gen = None if self.labels is None else torch.Generator(device=self.device).manual_seed(
                _seed(cfg, task, epoch) ^ _PROBE_SALT)
            bar = tqdm(range(steps), desc=f"task {task} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (self.progress and distributed.is_main_process()), leave=False)
            started = time.perf_counter()
            pending: list[torch.Tensor] = []  # losses not yet read back, of steps step - len + 1 .. step
            loss_sum = 0.0  # of the losses read back this epoch (all of them at its end)
            for step, batch in zip(bar, batches):
                probe = None if probe_gen is None else self.probe_batch(probe_gen)
                try:
                    pending.append(self.train_step(learner, batch, probe, gen, optimizer, scheduler,
                                                   epoch * steps + step, total))
                except torch.OutOfMemoryError as err:
                    raise self._out_of_memory(f"task {task}, epoch {epoch + 1}, step {step + 1}", err) from err
                if len(pending) < _READ_BACK_EVERY and step + 1 < steps:
                    continue
                values = torch.stack(pending).float().cpu().tolist()  # one host sync per read-back
                first = step + 2 - len(pending)  # 1-based step of values[0]
                pending = []
                for i, value in enumerate(values):
                    streak = self._count_nonfinite(value, streak, f"task {task}, epoch {epoch + 1}, step {first + i}")
                loss_sum += sum(values)
                rate = (step + 1) * cfg.batch_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.0f}")
            record = self._epoch_record(epoch, loss_sum / steps, optimizer)
            records.append(record)
            log.info("task %d epoch %d/%d: loss %.4f, lr %.4g; %s", task, epoch + 1, cfg.epochs, loss_sum / steps,
                     record["lr"], clock.advance(steps))
            if distributed.is_main_process():  # every rank holds the same state; one writes it
                self.tensorboard.log_epoch(task * cfg.epochs + epoch + 1, record["loss"], record["lr"])
                ckpt.write_checkpoint(
                    self.run_dir, task, epoch, ckpt.module_tensors(learner.trained()),
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epochs": records},
                )
        return records

    @staticmethod
    def _epoch_record(epoch: int, loss: float, optimizer: torch.optim.Optimizer) -> dict:
        """One epoch's line of ``metrics.json``'s training curve: ``epoch`` (1-based, as logged), the
        mean loss of its steps (skipped non-finite steps make it non-finite: then ``None``) and the
        learning rate of the first parameter group when the epoch ended."""
        return {"epoch": epoch + 1, "loss": loss if math.isfinite(loss) else None, "lr": optimizer.param_groups[0]["lr"]}

    def _count_nonfinite(self, loss: float, streak: int, where: str) -> int:
        """The number of non-finite steps in a row, ``loss``'s step included; raises
        :class:`NonFiniteLossError` when the task must stop.

        Losses are read back every few steps, not after each one (a read-back waits for the GPU), so
        with ``nonfinite="stop"`` training may go on a few steps past a non-finite loss before the
        error. Those steps change the weights in memory only: the error comes before the epoch's
        checkpoint, and nothing non-finite is ever written.
        """
        if math.isfinite(loss):
            return 0
        cfg = self.config
        streak += 1
        if cfg.nonfinite == "stop" or streak >= cfg.nonfinite_limit:
            why = "" if cfg.nonfinite == "stop" else f" ({streak} non-finite steps in a row, --nonfinite-limit {cfg.nonfinite_limit})"
            raise NonFiniteLossError(
                f"{where}: the loss is {loss}{why}; the task stopped, the last checkpoint is intact. "
                "Lower --lr or check the data (--nonfinite skip skips such steps)."
            )
        log.warning("%s: the loss is %s; the update was skipped (%d in a row, the task stops at %d)",
                    where, loss, streak, cfg.nonfinite_limit)
        return streak

    def _out_of_memory(self, where: str, err: torch.OutOfMemoryError) -> torch.OutOfMemoryError:
        """``err`` restated with the batch that did not fit and what to change."""
        cfg = self.config
        return torch.OutOfMemoryError(
            f"{where}: out of memory training a batch of batch_size={cfg.batch_size} (two augmented views of "
            f"{cfg.image_size}x{cfg.image_size} images, {cfg.precision}, on {self.device}). Lower --batch-size "
            f"(e.g. {cfg.batch_size // 2}) or use --precision bf16; the last checkpoint is intact. [{str(err).splitlines()[0]}]"
        )

    def probe_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The online probe's batch, as CaSSLe draws it from a parallel loader over the whole
        labelled training set (not the task's): ``batch_size`` uint8 images ``(B, 3, H, W)`` and
        their labels ``(B,)``, on the device, drawn uniformly with replacement from every class.
        Every rank draws the same batch (streamed folders decode it in this process)."""
        rows = torch.randint(len(self.labels), (self.config.batch_size,), generator=gen, device=self.device)
        if isinstance(self.images, ImageFiles):
            return self.images[rows.cpu()].decode(0).to(self.device), self.labels[rows]
        return self.images[rows], self.labels[rows]

    def train_step(self, learner: Learner, batch: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor] | None,
                   gen: torch.Generator, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   step: int, total: int) -> torch.Tensor:
        """One training step of ``learner`` (inside :meth:`task_encoders`) on a uint8 global batch
        ``(batch_size, C, H, W)``: two augmented views drawn from ``gen``, the SSL loss (plus the
        distillation and the online probe's cross-entropy on ``probe``, ``(images, labels)``, where
        they apply), backward, the optimiser and schedule steps, and the momentum networks' EMA
        update for step ``step`` of ``total``. Returns the loss, a 0-dim tensor on the device, not
        read back (reading it waits for the device). With ``nonfinite="skip"`` a non-finite loss
        updates nothing but the schedule."""
        cfg = self.config
        # The augmentations of the global batch are drawn on every rank; each applies its rows' own.
        views = self.augment(batch, gen, rows=distributed.local_rows(len(batch)))
        if cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        with autocast:
            feats = _global(learner.encoder(views))
            momentum_feats = None
            if learner.momentum_encoder is not None:
                with torch.no_grad():
                    momentum_feats = _global(learner.momentum_encoder(views))
            out = learner.method(feats, momentum_feats)
            loss = out.loss
            if learner.distiller is not None:
                with torch.no_grad():
                    z_frozen = learner.teacher_method.project(_global([features(learner.teacher, v) for v in views]))
                loss = loss + cfg.distill_weight * learner.distiller(out.z, z_frozen, learner.method, learner.teacher_method)
            if learner.probe is not None:
                # The representation as evaluated (eval mode, un-augmented), without shaping it:
                # no gradient to the backbone, no BatchNorm statistics moved by the probe's batch.
                images, labels = probe
                learner.backbone.eval()
                with torch.no_grad():
                    probe_feats = features(learner.backbone, self.eval_transform(images).to(views[0].dtype))
                learner.backbone.train()
                loss = loss + F.cross_entropy(learner.probe(probe_feats), labels)
        # Only "skip" looks at the loss before the update: that check waits for the GPU to finish the
        # forward pass. "stop" reads losses back later, a few steps at a time (see _count_nonfinite).
        if cfg.nonfinite == "skip" and not torch.isfinite(loss):
            # No update, but the schedule follows the step index; torch warns about exactly that
            # when a task's first steps are the skipped ones.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                scheduler.step()
            return loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if learner.momentum is not None:
            m = cosine_momentum(step, total, self.recipe.base_momentum, self.recipe.final_momentum)
            ema_update(learner.backbone, learner.momentum, m)
            for online, target in learner.method.momentum_pairs():
                ema_update(online, target, m)
        return loss.detach()

    def _finish_task(self, learner: Learner, task: int, metrics: ContinualMetrics | None, started: float,
                     epochs: list[dict]) -> dict | None:
        """Merge, then on rank 0 evaluate, add the scores and the training curve ``epochs`` to
        ``metrics`` (in memory: ``metrics.json`` is saved after the folder) and write ``task-K`` with
        a card that reports them; returns the scores (``None`` on the other ranks)."""
        for net in (learner.backbone, learner.momentum):
            if net is not None and next(iter_branches(net), None) is not None:
                merge_branches(net)
        learner.backbone.eval()
        if not distributed.is_main_process():  # every rank merged; one writes
            return None
        scores = self.evaluate(learner.backbone, learner.probe) or {}
        metrics.add(task, **scores, epochs=epochs, seconds=round(time.perf_counter() - started, 2),
                    images=len(self.task_indices(task)))
        trainer_tensors = ckpt.module_tensors(learner.kept())
        info = {"task": task, "strategy": self.config.strategy, "method": self.config.method,
                "branches": self._uses_branches(task), "cassle": self._uses_cassle(task)}
        # The run's facts so far (config.yaml, the earlier tasks' task.json) and this task's.
        facts = read_run(self.run_dir, upto_task=task - 1)
        card = render_model_card(learner.backbone, run=dataclasses.replace(facts, metrics=metrics.to_dict(), tasks=[*facts.tasks, info]))
        ckpt.write_task(self.run_dir, task, lambda folder: save_pretrained(learner.backbone, folder, model_card=card),
                        trainer_tensors, info)
        ckpt.clear_checkpoints(self.run_dir)
        return scores

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, backbone: nn.Module, online_probe: nn.Linear | None = None) -> dict | None:
        """kNN and linear-probe top-1 on all classes and per task (and the online probe's top-1);
        ``None`` for unlabeled data."""
        source = self.scenario.source
        if source.train.labels is None or source.test is None or source.test.labels is None:
            return None
        cfg = self.config
        train_f = self.features(backbone, self.images)
        test_f = self.features(backbone, source.test.images)
        train_y, test_y = source.train.labels, source.test.labels
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        tasks = self.scenario.tasks
        by_classes = self.scenario.kind == "class"
        masks = None
        if not by_classes:
            masks = []
            for t in tasks:
                mask = torch.zeros(len(test_y), dtype=torch.bool)
                mask[t.test] = True
                masks.append(mask)
        classes = [t.classes for t in tasks] if by_classes else None
        result = {}
        knn = knn_predict(train_f, train_y, test_f, num_classes, k=cfg.knn_k, temperature=cfg.knn_temperature).argmax(1)
        result["knn_top1"] = top1_accuracy(knn, test_y)
        result["knn_per_task"] = per_task_accuracy(knn, test_y, task_classes=classes, task_masks=masks)
        if cfg.linear_probe:
            probe = linear_probe(train_f, train_y, test_f, test_y, num_classes)
            result["linear_top1"] = probe.accuracy
            result["linear_per_task"] = per_task_accuracy(probe.predictions, test_y, task_classes=classes, task_masks=masks)
        if online_probe is not None:
            with torch.no_grad():
                online = online_probe.eval()(test_f.to(self.device)).argmax(1).cpu()
            result["online_top1"] = top1_accuracy(online, test_y)
        return result

    def features(self, backbone: nn.Module, images: torch.Tensor | ImageFiles) -> torch.Tensor:
        """:func:`extract_features` of in-memory or streamed images (decoded batch by batch)."""
        size = self.config.eval_batch_size
        if not isinstance(images, ImageFiles):
            return extract_features(backbone, images, self.eval_transform, size, self.device)
        parts = images.batches(size, self._workers, self.device)
        return torch.cat([extract_features(backbone, part, self.eval_transform, size, self.device) for part in parts])

    # -- the run ----------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> Path:
        """Train every unfinished task; returns the folder of the last task's merged model.

        Rank 0 holds the run folder exclusively meanwhile (:mod:`~timm_branch.train.lock`). A
        resume first checks that the configuration keeps every field the finished work depends on
        (:data:`~timm_branch.train.config.RESUME_MAY_CHANGE` lists the others), and the model
        loads before anything is written.
        """
        if resume and not self.run_dir.is_dir():
            raise FileNotFoundError(f"{self.run_dir} does not exist: there is no run to resume")
        main = distributed.is_main_process()
        with run_folder_lock(self.run_dir) if main else contextlib.nullcontext():
            return self._run(resume, main)

    def _run(self, resume: bool, main: bool) -> Path:
        done = ckpt.finished_tasks(self.run_dir)
        if (done or (self.run_dir / ckpt.POINTER).exists()) and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run; resume it with --resume {self.run_dir} or choose another --output")
        if resume:
            ckpt.check_unchanged(self.run_dir, self.resolved_config().to_dict(), RESUME_MAY_CHANGE)
        learner = self._learner_after(done - 1) if done else self.new_learner()
        metrics = self._open_metrics(resume, done) if main else None
        if main and resume:
            self._push_pending()
        clock = RunClock(sum(self._steps_per_epoch(t) for t in range(done, len(self.scenario))) * self.config.epochs)
        for task in range(done, len(self.scenario)):
            started = time.perf_counter()
            self.prepare_task(learner, task)
            with self.task_encoders(learner):
                epochs = self._train_task(learner, task, clock)
            scores = self._finish_task(learner, task, metrics, started, epochs)
            if main:
                self._record_task(metrics, task, scores)
            # The next task reads checkpoint.json, which rank 0 has just removed: wait for its writes.
            distributed.barrier()
        self.tensorboard.close()
        if main:
            self._report_pending()
        return ckpt.task_dir(self.run_dir, len(self.scenario) - 1)

    def _open_metrics(self, resume: bool, done: int) -> ContinualMetrics:
        """The run folder and ``config.yaml``, and the metrics with a row for each of the ``done``
        finished tasks and the random-initialisation scores (rank 0's part of starting a run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_leftovers(self.run_dir)
        from .._io import atomic_write_text

        resolved = self.resolved_config()
        atomic_write_text(self.run_dir / "config.yaml", resolved.to_yaml())
        if not resume or not (self.run_dir / ckpt.RUN_RECORD).is_file():
            ckpt.record_run(self.run_dir, resolved.to_dict())
        metrics_path = self.run_dir / "metrics.json"
        if resume and metrics_path.exists():
            metrics = ContinualMetrics.load(metrics_path)
        else:
            classes = [t.classes for t in self.scenario.tasks] if self.scenario.kind == "class" else None
            metrics = ContinualMetrics(num_tasks=len(self.scenario), task_classes=classes, meta=self._meta())
        # A crash between writing task-K and metrics.json leaves a finished task without its row.
        for task in range(len(metrics.rows), done):
            model = ckpt.load_task(self.run_dir, task, self.new_backbone(random_init=True))
            metrics.add(task, **(self.evaluate(self._place(model).eval()) or {}), recovered=True)
            metrics.save(self.run_dir)
        if metrics.random_init is None:
            scores = self.evaluate(self.new_backbone(random_init=True).eval())
            if scores is not None:
                metrics.set_random_init(**scores)
                log.info("before training, a random-init %s: %s (what each task's scores compare with)",
                         self.config.pretrained or self.config.model, _top1_text(scores))
        return metrics

    @contextlib.contextmanager
    def task_encoders(self, learner: Learner) -> Iterator[None]:
        """For one task's training: ``learner.encoder`` (in ``DistributedDataParallel`` when several
        ranks train) and ``learner.momentum_encoder``, both through ``torch.compile`` with
        ``compile``; with ``sync_bn``, SyncBatchNorm in the backbone and its momentum copy;
        afterwards the original BatchNorm classes again, ready to merge and export."""
        synced = (learner.backbone, learner.momentum) if self.config.sync_bn else ()
        with distributed.synced_batchnorm(*synced):
            encoder = distributed.data_parallel(_Encoder(learner.backbone), self.device)
            momentum = None if learner.momentum is None else _Encoder(learner.momentum)
            if self.config.compile is not None:
                # Both encoders share _Encoder.forward's code, whose compiled graphs dynamo caps
                # (8 by default, then it falls back to eager): drop the last task's, which no
                # longer match the model anyway.
                torch.compiler.reset()
                encoder = torch.compile(encoder, backend=self.config.compile)
                momentum = None if momentum is None else torch.compile(momentum, backend=self.config.compile)
            learner.encoder, learner.momentum_encoder = encoder, momentum
            try:
                yield
            finally:
                learner.encoder = learner.momentum_encoder = None

    def _record_task(self, metrics: ContinualMetrics, task: int, scores: dict) -> None:
        """Rank 0, after ``task`` and its folder: save the metrics and plots, log, and push if asked."""
        cfg = self.config
        metrics.save(self.run_dir)
        self._plot(metrics)
        self._log_task(task, scores, metrics.random_init)
        self.tensorboard.log_task(task, scores, metrics)
        if cfg.push_to_hub and (cfg.push_when == "task" or task == len(self.scenario) - 1):
            self._push_pending(task)

    def _push_pending(self, task: int | None = None) -> None:
        """Push the tasks whose earlier push failed, then ``task``, oldest first. A Hub failure does
        not stop the run: that task and the later ones stay recorded in ``pending_pushes.json``
        (pushing a later one first would leave the Hub on an older model once the retry succeeds)."""
        from ..hub import HubPushError, push_task_folder

        todo = sorted(set(ckpt.read_pending_pushes(self.run_dir)) | ({task} if task is not None else set()))
        if not todo or not self.config.push_to_hub:
            return
        for i, pending in enumerate(todo):
            try:
                url = push_task_folder(
                    ckpt.task_dir(self.run_dir, pending), self.config.push_to_hub, run_dir=self.run_dir,
                    commit_message=f"timm-branch: task {pending} ({self.config.strategy}, {self.config.method})",
                )
            except HubPushError as err:
                ckpt.write_pending_pushes(self.run_dir, todo[i:])
                log.warning("task %d was not pushed (%s); training goes on, and the push is tried again after "
                            "the next task and on --resume", pending, err)
                return
            log.info("task %d pushed: %s", pending, url)
        ckpt.write_pending_pushes(self.run_dir, [])

    def _report_pending(self) -> None:
        """Warn, at the end of the run, about every finished task that is still not on the Hub."""
        pending = ckpt.read_pending_pushes(self.run_dir)
        if pending:
            log.warning(
                "tasks %s are not on the Hub (listed in %s): resume with --resume %s to push them again, or push "
                "one with timm-branch push %s --repo-id %s", ", ".join(map(str, pending)),
                self.run_dir / ckpt.PENDING_PUSHES, self.run_dir, ckpt.task_dir(self.run_dir, pending[-1]),
                self.config.push_to_hub or "ORG/NAME")

    def resolved_config(self) -> TrainConfig:
        """The configuration with every recipe default filled in (what ``config.yaml`` records)."""
        cfg = self.config
        split_seed = cfg.split_seed if cfg.split_seed is not None or cfg.scenario == "domain" else {"class": 5, "data": 42}[cfg.scenario]
        return dataclasses.replace(
            cfg, lr=self.lr, weight_decay=self.weight_decay, optimizer=cfg.optimizer or self.recipe.optimizer, split_seed=split_seed,
        )

    def _plot(self, metrics: ContinualMetrics) -> None:
        """The run's accuracy curve and matrix as PNGs beside metrics.json (labelled data only)."""
        probe = "linear" if metrics.has_matrix("linear") else "knn"
        if metrics.has_matrix(probe):
            plot_accuracy_curves({self.config.strategy: metrics}, self.run_dir / CURVES_FILE, probe=probe)
            plot_accuracy_matrix(metrics, self.run_dir / "accuracy_matrix.png", probe=probe)

    def _meta(self) -> dict:
        return {"strategy": self.config.strategy, "method": self.config.method, "model": self.config.model,
                "shape": self.config.shape, "bn": self.config.bn, "norms": list(self.config.norms),
                "through": list(self.config.through), "seed": self.config.seed,
                "data": list(self.config.data), "scenario": self.scenario.kind}

    def _log_task(self, task: int, scores: dict, random_init: TaskEvaluation | None) -> None:
        """``task``'s top-1 scores, each beside the random-init network's (the sign of learning
        that a slowly falling SSL loss does not give)."""
        baseline = {} if random_init is None else {f"{p}_top1": random_init.top1(p) for p in PROBES}
        log.info("task %d done: %s", task, _top1_text(scores, baseline) or "no labels to evaluate")


def _top1_text(scores: dict, baseline: dict | None = None) -> str:
    """``"kNN top-1 41.20% (random init 30.10%), ..."`` of the ``*_top1`` entries of ``scores``."""
    parts = []
    for key, value in scores.items():
        if not key.endswith("_top1"):
            continue
        before = (baseline or {}).get(key)
        parts.append(f"{_SCORE_NAMES.get(key, key)} {value * 100:.2f}%"
                     + ("" if before is None else f" (random init {before * 100:.2f}%)"))
    return ", ".join(parts)
