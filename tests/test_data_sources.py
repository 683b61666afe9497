"""Offline data sources: npz, image folders, torchvision layouts (faked), digits, load_source."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_branch.data import files
from timm_branch.data import (
    DataSource,
    Split,
    build_scenario,
    load_digits,
    load_folder,
    load_npz,
    load_source,
    load_torchvision,
    resize_center_crop,
)

SHARED_CIFAR100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar100.npz"


def write_npz(path: Path, n_train: int = 6, n_test: int = 4, size: int = 5, **overrides) -> dict:
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train, size, size + 1, 3), dtype=np.uint8),
        y_train=rng.integers(0, 3, n_train).astype(np.int32),
        x_test=rng.integers(0, 256, (n_test, size, size + 1, 3), dtype=np.uint8),
        y_test=rng.integers(0, 3, n_test).astype(np.int64),
        classes=np.array(["a", "b", "c"]),
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------------------------- Split / resize


def test_split_validates_dtype_shape_and_labels():
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    assert len(Split(images, torch.tensor([0, 1, 2]))) == 3
    with pytest.raises(ValueError, match="uint8"):
        Split(images.float(), None)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Split(images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="int64"):
        Split(images, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=">= 0"):
        Split(images, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="no class name"):
        DataSource("x", Split(images, torch.tensor([0, 1, 5])), None, ["a", "b"])
    sub = Split(images, torch.tensor([0, 1, 2])).subset(torch.tensor([2, 0]))
    assert sub.labels.tolist() == [2, 0] and sub.images.shape == (2, 3, 4, 4)
    masked = Split(images, torch.tensor([0, 1, 2])).subset(torch.tensor([True, False, True]))
    assert masked.labels.tolist() == [0, 2]


def test_resize_center_crop_keeps_aspect_and_dtype():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert resize_center_crop(x, 8) is x
    wide = torch.zeros(1, 3, 10, 30, dtype=torch.uint8)
    wide[..., 8:22] = 200  # a middle band, 14 of 30 columns
    out = resize_center_crop(wide, 5)
    assert out.shape == (1, 3, 5, 5) and out.dtype == torch.uint8
    # shorter side 10 -> 5 (30 -> 15 wide), then the centre 5 of 15 columns: inside the band;
    # a plain (stretching) resize to 5x5 would show the black borders
    assert (out == 200).all(), out[0, 0]
    assert resize_center_crop(torch.rand(1, 3, 6, 4), 2).dtype == torch.float32


# -------------------------------------------------------------------------------------------- npz


def test_load_npz_converts_nhwc_to_nchw(tmp_path):
    arrays = write_npz(tmp_path / "toy.npz")
    src = load_npz(tmp_path / "toy.npz")
    assert src.name == "toy" and src.classes == ["a", "b", "c"] and src.num_classes == 3
    assert src.train.images.dtype == torch.uint8 and src.train.images.shape == (6, 3, 5, 6)
    assert torch.equal(src.train.images, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert src.train.labels.dtype == torch.int64 and src.train.labels.tolist() == arrays["y_train"].tolist()
    assert src.test.images.shape == (4, 3, 5, 6) and src.test.labels.tolist() == arrays["y_test"].tolist()


def test_load_npz_optional_keys_and_grayscale(tmp_path):
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "gray.npz", x_train=gray)
    src = load_npz(tmp_path / "gray.npz")
    assert src.train.labels is None and src.test is None and src.classes is None and src.num_classes is None
    assert src.train.images.shape == (2, 3, 4, 4)
    assert all(torch.equal(src.train.images[:, c], torch.from_numpy(gray)) for c in range(3))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x_train=None), "missing required key 'x_train'"),
        (dict(x_train=np.zeros((6, 5, 6, 3), np.float32)), "'x_train' must be uint8"),
        (dict(x_test=np.zeros((4, 5, 6, 4), np.uint8)), r"'x_test'.*\(N, H, W, 3\)"),
        (dict(y_train=np.zeros(5, np.int64)), r"'y_train'.*shape \(6,\)"),
        (dict(y_train=np.zeros(6, np.float32)), "labels must be integers"),
        (dict(y_test=np.array([0, 1, -1, 0])), "labels must be >= 0"),
        (dict(x_test=None), "has 'y_test' but no 'x_test'"),
        (dict(classes=np.array(["a", "b"])), "no class name"),
        (dict(classes=np.array([1, 2, 3])), "'classes' must be a 1-d array of strings"),
        (dict(classes=np.array(["a", None, "c"], dtype=object)), "without pickle"),
    ],
)
def test_load_npz_errors_name_the_file_and_problem(tmp_path, overrides, message):
    path = tmp_path / "bad.npz"
    write_npz(path, **overrides)
    with pytest.raises(ValueError, match=message) as err:
        load_npz(path)
    assert str(path) in str(err.value)


def test_load_npz_missing_or_not_an_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------------------- folders


def save_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


def test_load_folder_imagefolder_with_train_and_val(tmp_path):
    root = tmp_path / "pets"
    save_image(root / "train" / "dog" / "1.png", (20, 10), (0, 255, 0))
    save_image(root / "train" / "dog" / "sub" / "2.JPG", (9, 9), (0, 250, 0))
    save_image(root / "train" / "cat" / "1.png", (8, 16), (255, 0, 0), mode="L")  # grayscale file
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    (root / "train" / ".hidden").mkdir()
    save_image(root / "val" / "dog" / "3.bmp", (12, 12), (0, 255, 0))
    src = load_folder(root, 8)
    assert src.name == "pets" and src.classes == ["cat", "dog"]
    assert src.train.images.shape == (3, 3, 8, 8) and src.train.images.dtype == torch.uint8
    assert src.train.labels.tolist() == [0, 1, 1]
    cat = src.train.images[0]
    assert (cat[0] == cat[1]).all() and (cat[1] == cat[2]).all(), "grayscale files become RGB"
    assert src.test.labels.tolist() == [1] and src.test.images.shape == (1, 3, 8, 8)


def test_load_folder_flat_unlabeled_and_centre_crop(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:20] = (0, 255, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    save_image(tmp_path / "b.png", (6, 6), (10, 20, 30))
    src = load_folder(tmp_path, 6)
    assert src.train.labels is None and src.classes is None and src.test is None
    a = src.train.images[0].float()
    # shorter side 10 -> 6 (30 -> 18 wide), centre 6 columns = the green third: not stretched
    assert (a[1] > 200).all() and (a[0] < 30).all() and (a[2] < 30).all()
    assert src.train.images[1, :, 0, 0].tolist() == [10, 20, 30]


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_folder(tmp_path / "empty", 8)
    bad = tmp_path / "bad"
    save_image(bad / "ok.png", (4, 4), (1, 2, 3))
    (bad / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_folder(bad, 8)
    mixed = tmp_path / "mixed"
    save_image(mixed / "x.png", (4, 4), (1, 2, 3))
    save_image(mixed / "cls" / "y.png", (4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="mixes images"):
        load_folder(mixed, 8)
    unknown = tmp_path / "unknown"
    save_image(unknown / "train" / "a" / "1.png", (4, 4), (1, 2, 3))
    save_image(unknown / "test" / "b" / "1.png", (4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match=r"\['b'\] are not among the train classes"):
        load_folder(unknown, 8)


# ------------------------------------------------------------------------------------- torchvision


def test_load_torchvision_missing_says_where_and_how(tmp_path):
    for name, folder in [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary")]:
        with pytest.raises(FileNotFoundError) as err:
            load_torchvision(name, tmp_path)
        message = str(err.value)
        assert str(tmp_path / folder) in message and "download=True" in message and "never downloads" in message
    with pytest.raises(ValueError, match="unknown torchvision source"):
        load_torchvision("mnist", tmp_path)


@pytest.fixture
def trust_files(monkeypatch):
    """torchvision checks md5 sums of the real archives; let it accept the tiny fakes below."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(stl10, "check_integrity", lambda *args, **kwargs: True)


def test_load_torchvision_cifar10_layout(tmp_path, trust_files):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        batches[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(x) for x in rng.integers(0, 10, 2)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    src = load_torchvision("cifar10", tmp_path)
    assert src.train.images.shape == (10, 3, 32, 32) and src.test.images.shape == (2, 3, 32, 32)
    assert torch.equal(src.train.images[0], torch.from_numpy(batches["data_batch_1"][0].reshape(3, 32, 32)))
    assert src.classes == [f"c{i}" for i in range(10)] and src.train.labels.dtype == torch.int64


def test_load_torchvision_stl10_splits(tmp_path, trust_files):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(2)
    images = {k: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for k, n in [("train", 2), ("test", 3), ("unlabeled", 4)]}
    for k, x in images.items():
        x.transpose(0, 1, 3, 2).tofile(folder / f"{k}_X.bin")  # STL-10 stores images column-major
    np.array([1, 10], np.uint8).tofile(folder / "train_y.bin")  # 1-based on disk
    np.array([3, 2, 1], np.uint8).tofile(folder / "test_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    labelled = load_torchvision("stl10", tmp_path)
    assert labelled.train.labels.tolist() == [0, 9] and labelled.test.labels.tolist() == [2, 1, 0]
    assert torch.equal(labelled.train.images, torch.from_numpy(images["train"]))
    assert labelled.classes == [f"k{i}" for i in range(10)]
    unlabeled = load_torchvision("stl10-unlabeled", tmp_path)
    assert unlabeled.train.labels is None and len(unlabeled.train) == 4 and len(unlabeled.test) == 3
    assert torch.equal(unlabeled.train.images, torch.from_numpy(images["unlabeled"]))
    both = load_torchvision("stl10-train+unlabeled", tmp_path)
    assert both.train.labels is None and len(both.train) == 6
    assert both.test.labels is not None and both.classes is not None


# ------------------------------------------------------------------------------------------ digits


def test_load_digits_stratified_seeded_split():
    src = load_digits(16)
    assert src.name == "digits" and src.classes == [str(i) for i in range(10)]
    assert len(src.train) + len(src.test) == 1797 and len(src.test) == 359
    assert src.train.images.shape[1:] == (3, 16, 16) and src.train.images.dtype == torch.uint8
    assert torch.equal(src.train.images[:, 0], src.train.images[:, 2])
    assert int(src.train.images.max()) == 255 and int(src.train.images.min()) == 0
    totals = torch.bincount(torch.cat([src.train.labels, src.test.labels]), minlength=10)
    expected_test = torch.round(0.2 * totals.double()).long()
    assert torch.equal(torch.bincount(src.test.labels, minlength=10), expected_test)
    again, other = load_digits(16), load_digits(16, seed=1)
    assert torch.equal(again.test.images, src.test.images)
    assert not torch.equal(other.test.images, src.test.images)
    # the split is a partition: the distinct (image, label) pairs of train and test do not overlap
    def keys(split: Split) -> set[bytes]:
        return {im.numpy().tobytes() + bytes([int(y)]) for im, y in zip(split.images, split.labels)}

    assert not keys(src.train) & keys(src.test)


# ------------------------------------------------------------------------------------- load_source


def test_load_source_specs(tmp_path):
    write_npz(tmp_path / "toy.npz", size=12)
    npz = load_source(str(tmp_path / "toy.npz"), 8)
    assert npz.name == "toy" and npz.image_shape == (3, 8, 8), "npz images are resized to image_size"
    named = load_source(f"cifar100:{tmp_path / 'toy.npz'}", 8)
    assert named.name == "cifar100" and named.image_shape == (3, 8, 8)
    digits = load_source("digits", 8)
    assert digits.name == "digits" and digits.image_shape == (3, 8, 8)
    save_image(tmp_path / "imgs" / "a.png", (5, 7), (1, 2, 3))
    folder = load_source(str(tmp_path / "imgs"), 4)
    assert folder.name == "imgs" and folder.image_shape == (3, 4, 4)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_source("cifar10", 32, root=tmp_path)
    with pytest.raises(ValueError, match="needs a folder"):
        load_source("cifar10", 32)
    with pytest.raises(ValueError, match="cannot load 'imagenet:/x'"):
        load_source("imagenet:/x", 32)
    with pytest.raises(ValueError, match="cannot load"):
        load_source(str(tmp_path / "no_such_folder"), 32)


@pytest.mark.skipif(
    not SHARED_CIFAR100.is_file(),
    reason=f"CIFAR-100 npz not found at {SHARED_CIFAR100} (../shared/data is absent in a fresh clone)",
)
def test_shared_cifar100_npz_and_paper_split():
    src = load_source(f"cifar100:{SHARED_CIFAR100}", 32)
    assert src.train.images.shape == (50000, 3, 32, 32) and src.test.images.shape == (10000, 3, 32, 32)
    assert src.classes[:3] == ["apple", "aquarium_fish", "baby"] and len(src.classes) == 100
    assert (torch.bincount(src.train.labels) == 500).all() and (torch.bincount(src.test.labels) == 100).all()
    scenario = build_scenario("class", src, num_tasks=5)
    first = scenario.tasks[0]
    assert first.classes == [11, 22, 39, 23, 42, 30, 78, 81, 64, 20, 29, 79, 15, 69, 86, 63, 55, 53, 73, 68]
    assert len(first.train) == 10000 and len(first.test) == 2000
    assert set(src.train.labels[first.train].tolist()) == set(first.classes)


def test_load_folder_decodes_in_worker_processes_in_file_order(tmp_path, monkeypatch):
    """Two DataLoader workers, two images per batch: the same tensor as decoding in this process,
    and an unreadable file is still named by a plain ValueError of the loading process."""
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (5 + i, 9, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(files, "_DECODE_BATCH", 2)
    here = load_folder(tmp_path, 6, workers=0).train.images
    assert torch.equal(load_folder(tmp_path, 6, workers=2).train.images, here)
    assert torch.equal(load_folder(tmp_path, 6).train.images, here)  # few files: decoded here
    (tmp_path / "3.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"^cannot read image .*3\.png"):
        load_folder(tmp_path, 6, workers=2)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        load_folder(tmp_path, 6, workers=-1)
