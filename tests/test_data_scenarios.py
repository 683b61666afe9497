"""Continual scenarios: class-, data- and domain-incremental tasks over in-memory sources."""
from __future__ import annotations

import pytest
import torch

from timm_branch.data import (
    DataSource,
    Split,
    build_scenario,
    class_incremental,
    concat_sources,
    data_incremental,
    domain_sequence,
)

CIFAR100_TASK0 = [11, 22, 39, 23, 42, 30, 78, 81, 64, 20, 29, 79, 15, 69, 86, 63, 55, 53, 73, 68]


def make_source(num_classes: int = 10, per_class: int = 3, test_per_class: int = 2, size: int = 2,
                name: str = "toy", labelled: bool = True, value: int = 0) -> DataSource:
    """Tiny source: every image is filled with ``value`` (to tell sources apart), labels cycle."""
    def split(per: int) -> Split:
        n = num_classes * per
        labels = torch.arange(n) % num_classes
        images = torch.full((n, 3, size, size), value, dtype=torch.uint8)
        images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # tells images apart
        return Split(images, labels if labelled else None)

    test = split(test_per_class) if test_per_class else None
    classes = [f"c{i}" for i in range(num_classes)] if labelled else None
    return DataSource(name, split(per_class), test, classes)


def assert_partition(parts: list[torch.Tensor], n: int) -> None:
    """Disjoint, complete, ascending int64 index sets of range(n)."""
    joined = torch.cat(parts)
    assert all(p.dtype == torch.int64 for p in parts)
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert len(joined) == n and torch.equal(joined.sort().values, torch.arange(n))


# --------------------------------------------------------------------------------- class-incremental


def test_class_incremental_is_disjoint_complete_and_labelled_by_task():
    src = make_source(num_classes=10, per_class=3, test_per_class=2)
    tasks = class_incremental(src, 5)
    assert [t.index for t in tasks] == list(range(5)) and all(t.source == "toy" for t in tasks)
    assert_partition([t.train for t in tasks], len(src.train))
    assert_partition([t.test for t in tasks], len(src.test))
    assert sorted(c for t in tasks for c in t.classes) == list(range(10))
    for t in tasks:
        assert len(t.classes) == 2
        assert set(src.train.labels[t.train].tolist()) == set(t.classes)
        assert set(src.test.labels[t.test].tolist()) == set(t.classes)


def test_class_incremental_paper_order_without_touching_global_rng():
    src = make_source(num_classes=100, per_class=1, test_per_class=0)
    state = torch.get_rng_state()
    tasks = class_incremental(src, 5)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not change"
    assert tasks[0].classes == CIFAR100_TASK0
    assert all(t.test is None for t in tasks)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        papers = [c.tolist() for c in torch.randperm(100).chunk(5)]
    assert [t.classes for t in tasks] == papers


def test_class_incremental_seeding_and_uneven_split():
    src = make_source(num_classes=10)
    same = [t.classes for t in class_incremental(src, 5, seed=1)]
    assert same == [t.classes for t in class_incremental(src, 5, seed=1)]
    assert same != [t.classes for t in class_incremental(src, 5, seed=2)]
    uneven = class_incremental(src, 4)  # chunk would give 3, 3, 3, 1; tensor_split balances
    assert [len(t.classes) for t in uneven] == [3, 3, 2, 2]
    assert_partition([t.train for t in uneven], len(src.train))


def test_class_incremental_errors():
    with pytest.raises(ValueError, match="unlabeled"):
        class_incremental(make_source(labelled=False), 2)
    with pytest.raises(ValueError, match="cannot make 11 tasks from 10 classes"):
        class_incremental(make_source(num_classes=10), 11)
    with pytest.raises(ValueError, match="positive integer"):
        class_incremental(make_source(), 0)
    # 4 class names but only classes 0..2 have images: one task of 4 is empty
    src = make_source(num_classes=3)
    src.classes = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="no training images"):
        class_incremental(src, 4)


# ---------------------------------------------------------------------------------- data-incremental


def test_data_incremental_equal_disjoint_complete_and_matches_random_split():
    src = make_source(num_classes=10, per_class=5, test_per_class=1)  # 50 train images
    tasks = data_incremental(src, 5)
    assert_partition([t.train for t in tasks], 50)
    assert [len(t.train) for t in tasks] == [10] * 5
    assert all(t.classes is None and torch.equal(t.test, torch.arange(10)) for t in tasks)
    papers = torch.utils.data.random_split(range(50), [10] * 5, generator=torch.Generator().manual_seed(42))
    assert [sorted(p.indices) for p in papers] == [t.train.tolist() for t in tasks]


def test_data_incremental_seeding_unlabeled_and_errors():
    src = make_source(num_classes=7, per_class=3, test_per_class=0, labelled=False)  # 21 images
    tasks = data_incremental(src, 4, seed=3)
    assert [len(t.train) for t in tasks] == [6, 5, 5, 5] and all(t.test is None for t in tasks)
    assert_partition([t.train for t in tasks], 21)
    assert [t.train.tolist() for t in tasks] == [t.train.tolist() for t in data_incremental(src, 4, seed=3)]
    assert [t.train.tolist() for t in tasks] != [t.train.tolist() for t in data_incremental(src, 4, seed=4)]
    with pytest.raises(ValueError, match="cannot make 22 tasks from 21 training images"):
        data_incremental(src, 22)


# ------------------------------------------------------------------------------------------- domain


def test_domain_sequence_blocks_and_disjoint_labels():
    a = make_source(num_classes=2, per_class=2, test_per_class=1, name="a", value=10)
    b = make_source(num_classes=3, per_class=1, test_per_class=0, name="b", value=20)
    scenario = domain_sequence([a, b])
    joined = scenario.source
    assert joined.name == "a+b" and len(joined.train) == 7 and len(joined.test) == 2
    assert joined.classes == ["a/c0", "a/c1", "b/c0", "b/c1", "b/c2"]
    t0, t1 = scenario.tasks
    assert t0.source == "a" and t1.source == "b"
    assert t0.train.tolist() == [0, 1, 2, 3] and t1.train.tolist() == [4, 5, 6]
    assert t0.test.tolist() == [0, 1] and t1.test is None
    assert t0.classes == [0, 1] and t1.classes == [2, 3, 4]
    # every task's data is its own source's, labels shifted past the previous source's classes
    assert (scenario.train(0).images[:, 1] == 10).all() and (scenario.train(1).images[:, 1] == 20).all()
    assert torch.equal(scenario.train(1).labels, b.train.labels + 2)
    assert torch.equal(scenario.test(0).labels, a.test.labels) and scenario.test(1) is None


def test_domain_sequence_shared_labels_and_errors():
    a = make_source(num_classes=3, name="a")
    b = make_source(num_classes=3, name="b", value=5)
    shared = domain_sequence([a, b], labels="shared")
    assert shared.source.classes == a.classes
    assert torch.equal(shared.train(1).labels, b.train.labels)
    with pytest.raises(ValueError, match="identical classes"):
        domain_sequence([a, make_source(num_classes=4, name="c")], labels="shared")
    with pytest.raises(ValueError, match="different image shapes"):
        domain_sequence([a, make_source(size=3, name="big")])
    with pytest.raises(ValueError, match="distinct names"):
        domain_sequence([a, a])
    unlabeled = concat_sources([a, make_source(name="u", labelled=False)])
    assert unlabeled.train.labels is None and unlabeled.classes is None


# ------------------------------------------------------------------------------------ build_scenario


def test_build_scenario_kinds_defaults_and_errors():
    src = make_source(num_classes=10, per_class=3)
    class_s = build_scenario("class", src, num_tasks=5)
    assert class_s.kind == "class" and len(class_s) == 5 and class_s.source is src
    assert [t.classes for t in class_s.tasks] == [t.classes for t in class_incremental(src, 5, seed=5)]
    data_s = build_scenario("data", src, num_tasks=3)
    assert [t.train.tolist() for t in data_s.tasks] == [t.train.tolist() for t in data_incremental(src, 3, seed=42)]
    assert [t.train.tolist() for t in build_scenario("data", src, 3, seed=0).tasks] != [
        t.train.tolist() for t in data_s.tasks
    ]
    first = class_s.train(0)
    assert torch.equal(first.images, src.train.images[class_s.tasks[0].train])
    domain_s = build_scenario("domain", [src, make_source(name="other")])
    assert domain_s.kind == "domain" and len(domain_s) == 2
    with pytest.raises(ValueError, match="unknown scenario kind 'task'"):
        build_scenario("task", src, num_tasks=2)
    with pytest.raises(ValueError, match="needs num_tasks"):
        build_scenario("class", src)
    with pytest.raises(ValueError, match="one task per source"):
        build_scenario("domain", [src, make_source(name="other")], num_tasks=3)
    with pytest.raises(ValueError, match="takes one DataSource"):
        build_scenario("data", [src], num_tasks=2)
    empty = make_source(num_classes=3)
    empty.classes = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="task .* has no training images"):
        build_scenario("class", empty, num_tasks=4)
