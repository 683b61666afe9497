"""Streamed folders: ImageFiles selects like the tensor it stands for and decodes to its pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_branch.data import (
    ImageFiles,
    Split,
    build_scenario,
    concat_sources,
    decode_image,
    load_folder,
    load_source,
    resize_source,
)


def _write_folder(root: Path, per_class: int = 5, test: int = 2) -> Path:
    """``root/train/<c>/`` and ``root/test/<c>/`` for three classes, PNGs of varied sizes (some
    need a resize and a crop)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test)):
        for c in range(3):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (6 + i + c, 8 + 2 * i, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("folder") / "imgs")


@pytest.fixture(scope="module")
def in_memory(folder):
    return load_folder(folder, 6, workers=0)


@pytest.fixture(scope="module")
def streamed(folder):
    return load_folder(folder, 6, stream=True)


def test_streamed_folder_lists_the_files_of_the_in_memory_load(streamed, in_memory):
    for split in ("train", "test"):
        files, decoded = getattr(streamed, split), getattr(in_memory, split)
        assert isinstance(files.images, ImageFiles) and len(files.images) == len(decoded.images)
        assert files.images.shape == decoded.images.shape and files.images.dtype == torch.uint8
        assert torch.equal(files.labels, decoded.labels)
        assert torch.equal(files.images.decode(workers=0), decoded.images)
    assert streamed.classes == in_memory.classes and streamed.image_shape == (3, 6, 6)


def test_selecting_rows_selects_files_as_on_the_tensor(streamed, in_memory):
    files, pixels = streamed.train.images, in_memory.train.images
    n = len(files)
    mask = torch.arange(n) % 3 == 1
    for index in (torch.tensor([4, 0, 4, n - 1]), mask, slice(2, 9, 3), [1, 2], torch.tensor([-1])):
        chosen = files[index]
        assert isinstance(chosen, ImageFiles)
        assert torch.equal(chosen.decode(workers=0), pixels[index])
    subset = streamed.train.subset(mask)
    assert isinstance(subset.images, ImageFiles) and torch.equal(subset.labels, in_memory.train.labels[mask])
    for bad, message in ((torch.tensor([n]), "out of range"), (torch.tensor([0.5]), "integer"),
                         (torch.ones(n - 1, dtype=torch.bool), "mask"), (torch.zeros(2, 2, dtype=torch.int64), "1-D")):
        with pytest.raises(IndexError, match=message):
            files[bad]


def test_paths_survive_selection_and_concatenation_exactly(tmp_path):
    names = [tmp_path / n for n in ("a.png", "sub dir/ünï.jpg", "b.PNG", "x/y/z.webp")]
    files = ImageFiles(names, 4)
    assert files.files == names and [files.path(i) for i in range(4)] == names
    assert files[torch.tensor([3, 1, 1])].files == [names[3], names[1], names[1]]
    assert files[torch.tensor([], dtype=torch.int64)].files == [] and len(files[2:2]) == 0
    joined = ImageFiles.cat([files[1:], files[:2]])
    assert joined.files == names[1:] + names[:2] and joined.shape == (5, 3, 4, 4)
    assert files.at_size(9).files == names and files.at_size(9).image_size == 9 and files.image_size == 4


def test_batches_decode_the_asked_rows_in_worker_processes(streamed, in_memory):
    files, pixels = streamed.train.images, in_memory.train.images
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    asked = list(order[:12].view(3, 4))
    for workers in (0, 2):
        got = list(files.batches(asked, workers=workers))
        assert len(got) == 3 and all(torch.equal(g, pixels[a]) for g, a in zip(got, asked))
        in_order = list(files.batches(4, workers=workers))
        assert [len(b) for b in in_order] == [4, 4, 4, 3]  # the last batch holds the rest
        assert torch.equal(torch.cat(in_order), pixels)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        next(files.batches(4, workers=-1))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        next(files.batches(0))


def test_an_unreadable_file_is_named_in_the_training_process(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=2, test=0)
    (root / "train" / "c1" / "01.png").write_bytes(b"\x89PNG garbage")
    source = load_folder(root / "train", 6, stream=True)  # listing reads no pixels
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"^cannot read image .*c1/01\.png"):
            list(source.train.images.batches(2, workers=workers))


def test_decode_image_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, 2:6] = 200  # a bright centre band, exactly the centre crop of the 8 px side
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8 and (out == 200).all()
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        ImageFiles([tmp_path / "wide.png"], 0)


def test_load_source_streams_folders_only(folder):
    assert isinstance(load_source(str(folder), 6, stream=True).train.images, ImageFiles)
    assert isinstance(load_source(str(folder), 6, workers=0).train.images, torch.Tensor)
    with pytest.raises(ValueError, match="only an image folder streams"):
        load_source("digits", 8, stream=True)


def test_resizing_a_streamed_source_decodes_at_the_new_side(streamed, folder):
    resized = resize_source(streamed, 5)
    assert isinstance(resized.train.images, ImageFiles) and resized.image_shape == (3, 5, 5)
    assert torch.equal(resized.train.images.decode(workers=0), load_folder(folder, 5, workers=0).train.images)


def test_scenarios_and_concatenation_keep_streamed_images_as_files(streamed, in_memory):
    scenario = build_scenario("class", streamed, num_tasks=3, seed=0)
    reference = build_scenario("class", in_memory, num_tasks=3, seed=0)
    for k in range(3):
        task = scenario.train(k)
        assert isinstance(task.images, ImageFiles)
        assert torch.equal(task.images.decode(workers=0), reference.train(k).images)
    other = type(streamed)("other", streamed.train, streamed.test, streamed.classes)
    joined = concat_sources([streamed, other])
    assert isinstance(joined.train.images, ImageFiles) and len(joined.train) == 2 * len(streamed.train)
    mixed = type(in_memory)("mem", in_memory.train, in_memory.test, in_memory.classes)
    with pytest.raises(ValueError, match="stream every source"):
        concat_sources([streamed, mixed])
    with pytest.raises(ValueError, match="different sides"):
        ImageFiles.cat([streamed.train.images, streamed.train.images.at_size(7)])


def test_split_takes_files_and_checks_their_labels(streamed):
    files = streamed.train.images
    with pytest.raises(ValueError, match="labels"):
        Split(files, torch.zeros(len(files) + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8 tensor"):
        Split([Path("a.png")], None)
