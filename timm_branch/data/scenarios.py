"""Continual-learning scenarios: how one dataset is cut into a sequence of tasks.

A :class:`Task` holds **indices** (int64) into the train and test splits of one
:class:`~timm_branch.data.sources.DataSource`; no image is copied. A :class:`Scenario` bundles
that source with its tasks, so every scenario is consumed the same way::

    scenario = build_scenario("class", load_source("cifar100:/data", 32), num_tasks=5)
    for task in scenario.tasks:
        train = scenario.train(task.index)     # a Split: images uint8 (N, 3, 32, 32), labels
        ...

Kinds:

- ``"class"`` (:func:`class_incremental`): the classes are permuted with a seed and cut into
  ``num_tasks`` groups, as in the CaSSLe and Branch-tuning papers (``torch.manual_seed(5);
  torch.randperm(100).chunk(5)`` for CIFAR-100, reproduced exactly but with a local generator).
- ``"data"`` (:func:`data_incremental`): the train images are shuffled with a seed and cut into
  ``num_tasks`` equal parts, whatever their class (seed 42 in the papers).
- ``"domain"`` (:func:`domain_sequence`): each of several sources is one task. The sources are
  concatenated into one (:func:`concat_sources`, which needs equal image shapes; load them with
  the same ``image_size``) and every task indexes its own block of it.

All randomness comes from a local ``torch.Generator``: building a scenario never changes the
global RNG state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .files import ImageFiles
from .sources import DataSource, Split

SCENARIO_KINDS = ("class", "data", "domain")


@dataclass
class Task:
    """One task of a continual scenario.

    Attributes:
        index: position in the sequence, 0-based.
        train: int64 ``(N_t,)`` indices into the source's train split, ascending.
        test: int64 ``(M_t,)`` indices into the source's test split, ascending, or ``None`` when
            the source has no test split.
        classes: the labels of the task's classes (class-incremental: in the permutation order;
            domain: sorted), or ``None`` when the task is not defined by classes
            (data-incremental) or the data is unlabeled.
        source: name of the source the task's data comes from.
    """

    index: int
    train: torch.Tensor
    test: torch.Tensor | None
    classes: list[int] | None
    source: str


@dataclass
class Scenario:
    """A source and the tasks that index into it.

    Attributes:
        kind: ``"class"``, ``"data"`` or ``"domain"``.
        source: the data every task's indices refer to (for ``"domain"``, the concatenation).
        tasks: the tasks in training order.
    """

    kind: str
    source: DataSource
    tasks: list[Task]

    def __len__(self) -> int:
        return len(self.tasks)

    def train(self, index: int) -> Split:
        """The train images and labels of task ``index`` (a copy)."""
        return self.source.train.subset(self.tasks[index].train)

    def test(self, index: int) -> Split | None:
        """The test images and labels of task ``index`` (a copy), or ``None``."""
        task = self.tasks[index]
        if task.test is None or self.source.test is None:
            return None
        return self.source.test.subset(task.test)


def _check_num_tasks(num_tasks: int, available: int, what: str) -> int:
    if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if num_tasks > available:
        raise ValueError(f"cannot make {num_tasks} tasks from {available} {what}")
    return int(num_tasks)


def _check_not_empty(tasks: list[Task]) -> list[Task]:
    for task in tasks:
        if task.train.numel() == 0:
            raise ValueError(
                f"task {task.index} of source {task.source!r} has no training images"
                + (f" (classes {task.classes})" if task.classes is not None else "")
            )
    return tasks


def class_incremental(source: DataSource, num_tasks: int, seed: int = 5) -> list[Task]:
    """Split ``source`` into ``num_tasks`` tasks of disjoint classes.

    The class order is ``torch.randperm(num_classes)`` drawn from ``torch.Generator().
    manual_seed(seed)``, which gives the same permutation as the papers' ``torch.manual_seed(seed);
    torch.randperm(num_classes)`` (seed 5: CIFAR-100 task 0 is classes 11, 22, 39, 23, ...)
    without touching the global RNG. The permutation is cut with ``torch.tensor_split``: when
    ``num_tasks`` divides ``num_classes`` this equals the papers' ``.chunk(num_tasks)``;
    otherwise the first tasks get one class more (``chunk`` could return fewer tasks than asked).

    Each task's ``train``/``test`` are the (ascending) indices of the images whose label is in
    its classes; ``num_classes`` is :attr:`DataSource.num_classes`.

    Raises:
        ValueError: unlabeled train split, ``num_tasks`` < 1 or more tasks than classes, or a
            task without any training image.
    """
    if source.train.labels is None:
        raise ValueError(f"class-incremental tasks need labels, but source {source.name!r} is unlabeled")
    num_classes = source.num_classes
    num_tasks = _check_num_tasks(num_tasks, num_classes, "classes")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_classes, generator=gen)
    test_labels = None if source.test is None else source.test.labels
    tasks = []
    for i, group in enumerate(torch.tensor_split(order, num_tasks)):
        train = torch.isin(source.train.labels, group).nonzero().flatten()
        test = None if test_labels is None else torch.isin(test_labels, group).nonzero().flatten()
        tasks.append(Task(i, train, test, group.tolist(), source.name))
    return _check_not_empty(tasks)


def data_incremental(source: DataSource, num_tasks: int, seed: int = 42) -> list[Task]:
    """Split the train images of ``source`` into ``num_tasks`` random, equal, disjoint parts.

    The parts are ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))`` cut with
    ``torch.tensor_split`` (sizes differ by at most one), each sorted ascending: the same sets
    as ``torch.utils.data.random_split(range(N), [N // num_tasks] * num_tasks,
    generator=torch.Generator().manual_seed(seed))`` when ``num_tasks`` divides ``N``.
    Labels are not needed.

    Every task's ``test`` is the whole test split (``arange(len(test))``; ``None`` without a test
    split): data-incremental tasks share one label space, so there is no per-task test set.
    ``classes`` is ``None``.
    """
    n = len(source.train)
    num_tasks = _check_num_tasks(num_tasks, n, "training images")
    gen = torch.Generator().manual_seed(seed)
    parts = torch.tensor_split(torch.randperm(n, generator=gen), num_tasks)
    test = None if source.test is None else torch.arange(len(source.test))
    tasks = [Task(i, part.sort().values, test, None, source.name) for i, part in enumerate(parts)]
    return _check_not_empty(tasks)


def concat_sources(sources: Sequence[DataSource], labels: str = "disjoint", name: str | None = None) -> DataSource:
    """Concatenate sources into one; their images must have equal shapes ``(C, H, W)``.

    Nothing is resized here (load the sources with one ``image_size``:
    :func:`~timm_branch.data.sources.load_source` guarantees square ``image_size`` images).

    Args:
        sources: one or more sources; their train splits are concatenated in order, and so
            are the test splits of those that have one (``test`` is ``None`` if none has).
        labels: how the label spaces combine when every split is labelled:
            ``"disjoint"`` (default): source ``k``'s labels are shifted by the number of classes
            of the sources before it, and class names become ``"<source>/<class>"`` (or
            ``"<source>/<label>"``); ``"shared"``: labels are kept as they are, which requires
            every source to have the same ``classes`` (or, without names, the same number of
            classes). If any train split is unlabeled, all labels are dropped (None).
        name: the new source's name; default: the names joined with ``"+"``.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("concat_sources needs at least one source")
    if labels not in ("disjoint", "shared"):
        raise ValueError(f"labels must be 'disjoint' or 'shared', got {labels!r}")
    shapes = {s.image_shape for s in sources}
    if len(shapes) > 1:
        listing = ", ".join(f"{s.name}: {s.image_shape}" for s in sources)
        raise ValueError(
            f"cannot concatenate sources with different image shapes ({listing}); "
            "load them with the same image_size"
        )
    with_test = [s for s in sources if s.test is not None]
    labelled = all(s.train.labels is not None for s in sources) and all(s.test.labels is not None for s in with_test)
    offsets = [0] * len(sources)
    classes = None
    if labelled:
        if labels == "shared":
            first = sources[0]
            for s in sources[1:]:
                if s.classes != first.classes or s.num_classes != first.num_classes:
                    raise ValueError(
                        f"labels='shared' needs identical classes, but {first.name!r} has "
                        f"{first.classes or first.num_classes} and {s.name!r} has {s.classes or s.num_classes}"
                    )
            classes = None if first.classes is None else list(first.classes)
        else:
            classes = []
            total = 0
            for k, s in enumerate(sources):
                offsets[k] = total
                names = s.classes if s.classes is not None else [str(c) for c in range(s.num_classes)]
                classes += [f"{s.name}/{c}" for c in names]
                total += len(names)

    def cat(splits: list[tuple[int, Split]]) -> Split:
        images = _cat_images([split.images for _, split in splits])
        if not labelled:
            return Split(images, None)
        return Split(images, torch.cat([split.labels + offsets[k] for k, split in splits]))

    train = cat([(k, s.train) for k, s in enumerate(sources)])
    test = cat([(k, s.test) for k, s in enumerate(sources) if s.test is not None]) if with_test else None
    return DataSource(name or "+".join(s.name for s in sources), train, test, classes)


def _cat_images(parts: list[torch.Tensor | ImageFiles]) -> torch.Tensor | ImageFiles:
    streamed = [isinstance(p, ImageFiles) for p in parts]
    if all(streamed):
        return ImageFiles.cat(parts)
    if any(streamed):
        raise ValueError("cannot concatenate a streamed folder with sources held in memory: stream every source "
                         "(folders only) or none")
    return torch.cat(parts)


def domain_sequence(sources: Sequence[DataSource], labels: str = "disjoint") -> Scenario:
    """One task per source, in order, over ``concat_sources(sources, labels)``.

    Task ``k``'s ``train``/``test`` are the index blocks of source ``k`` inside the concatenated
    train/test splits (``test`` is ``None`` for a source without a test split), ``source`` is
    source ``k``'s name and ``classes`` the sorted labels (after the ``labels`` policy) its train
    split uses, or ``None`` when unlabeled. Returns the :class:`Scenario` (the tasks alone would
    be meaningless without the concatenated source they index).
    """
    sources = list(sources)
    if not sources:
        raise ValueError("domain_sequence needs at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"domain sources need distinct names, got {names}")
    joined = concat_sources(sources, labels)
    tasks = []
    train_start = test_start = 0
    for k, s in enumerate(sources):
        train = torch.arange(train_start, train_start + len(s.train))
        train_start += len(s.train)
        test = None
        if s.test is not None:
            test = torch.arange(test_start, test_start + len(s.test))
            test_start += len(s.test)
        classes = None
        if joined.train.labels is not None:
            classes = joined.train.labels[train].unique().tolist()
        tasks.append(Task(k, train, test, classes, s.name))
    return Scenario("domain", joined, _check_not_empty(tasks))


def build_scenario(
    kind: str,
    source: DataSource | Sequence[DataSource],
    num_tasks: int | None = None,
    seed: int | None = None,
    labels: str = "disjoint",
) -> Scenario:
    """Build a scenario of ``kind`` ``"class"``, ``"data"`` or ``"domain"``.

    Args:
        kind: the scenario kind (see the module docstring).
        source: one :class:`DataSource` for ``"class"`` and ``"data"``; a sequence of them for
            ``"domain"``.
        num_tasks: required for ``"class"``/``"data"``; for ``"domain"`` ``None`` or the number
            of sources.
        seed: the permutation seed; ``None`` uses the papers' (5 for class, 42 for data).
            Not used by ``"domain"``.
        labels: ``"domain"`` only, see :func:`concat_sources`.

    Raises:
        ValueError: unknown kind, wrong argument types, or any error of the kind's builder
            (unlabeled source for ``"class"``, too many tasks, a task without training images).
    """
    if kind not in SCENARIO_KINDS:
        raise ValueError(f"unknown scenario kind {kind!r}; expected one of {SCENARIO_KINDS}")
    if kind == "domain":
        if isinstance(source, DataSource):
            source = [source]
        sources = list(source)
        if num_tasks is not None and num_tasks != len(sources):
            raise ValueError(f"a domain scenario has one task per source: num_tasks={num_tasks} but {len(sources)} sources")
        return domain_sequence(sources, labels)
    if not isinstance(source, DataSource):
        raise ValueError(f"a {kind!r} scenario takes one DataSource, got {type(source).__name__}")
    if num_tasks is None:
        raise ValueError(f"a {kind!r} scenario needs num_tasks")
    if kind == "class":
        tasks = class_incremental(source, num_tasks, 5 if seed is None else seed)
    else:
        tasks = data_incremental(source, num_tasks, 42 if seed is None else seed)
    return Scenario(kind, source, tasks)
