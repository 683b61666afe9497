"""Image sources as uint8 tensors: npz files, image folders, torchvision, digits.

Every loader returns a :class:`DataSource`: a named ``train`` :class:`Split`, an optional ``test``
split and optional class names. A split stores its images as one ``uint8`` tensor of shape
``(N, C, H, W)`` (pixel values 0..255, RGB, ``C == 3``; grayscale inputs are replicated to three
channels) and its labels as ``int64`` of shape ``(N,)``, or ``None`` for unlabeled data.
Keeping whole datasets as uint8 tensors lets the batched augmentations of ``augment.py`` run on
CPU or GPU without a per-image Python pipeline; the cost is memory, ``N * 3 * H * W`` bytes
(CIFAR-100 train: 150 MiB; STL-10 unlabeled: 2.6 GiB). A folder too large for that loads with
``stream=True``: its splits hold :class:`~timm_branch.data.files.ImageFiles`, which stand for
that tensor and decode batch by batch in DataLoader workers.

Nothing here downloads anything. A missing dataset is an error that says where it was looked for
and how to get it.

Resolution: :func:`load_folder` and :func:`load_digits` produce ``image_size x image_size``
images; :func:`load_npz` and :func:`load_torchvision` keep the stored resolution.
:func:`load_source`, the single entry point, always returns ``image_size x image_size`` images
(via :func:`~timm_branch.data.resize.resize_center_crop`, a no-op when the size already
matches), so that sources loaded with one ``image_size`` can be concatenated.
"""
from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import ImageFiles
from .resize import resize_center_crop

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
"""File name endings (case-insensitive) that :func:`load_folder` treats as images."""

TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "stl10-unlabeled", "stl10-train+unlabeled")
"""Names accepted by :func:`load_torchvision` (and as ``NAME:ROOT`` specs by :func:`load_source`)."""

_TV_INFO = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "stl10": ("stl10_binary", "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
}


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        images: uint8 ``(N, C, H, W)``, pixel values 0..255, in memory; or the
            :class:`~timm_branch.data.files.ImageFiles` that decode to it (a streamed folder).
        labels: int64 ``(N,)`` with values ``>= 0``, or ``None`` when the split is unlabeled.
    """

    images: torch.Tensor | ImageFiles
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        in_memory = isinstance(self.images, torch.Tensor) and self.images.dtype == torch.uint8 and self.images.ndim == 4
        if not (in_memory or isinstance(self.images, ImageFiles)):
            got = (
                f"{self.images.dtype} {tuple(self.images.shape)}"
                if isinstance(self.images, torch.Tensor)
                else type(self.images).__name__
            )
            raise ValueError(f"Split.images must be a uint8 tensor of shape (N, C, H, W) or ImageFiles, got {got}")
        if self.labels is not None:
            if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.ndim != 1:
                raise ValueError("Split.labels must be None or an int64 tensor of shape (N,)")
            if self.labels.shape[0] != self.images.shape[0]:
                raise ValueError(
                    f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
                )
            if self.labels.numel() and int(self.labels.min()) < 0:
                raise ValueError(f"Split.labels must be >= 0, found {int(self.labels.min())}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> Split:
        """The images (and labels) at ``indices`` (int64 ``(M,)``, or a bool mask ``(N,)``), as a
        new split (a copy; of a streamed split, the files chosen)."""
        indices = torch.as_tensor(indices)
        indices = indices.nonzero().flatten() if indices.dtype == torch.bool else indices.to(torch.int64)
        return Split(self.images[indices], None if self.labels is None else self.labels[indices])


@dataclass
class DataSource:
    """A named dataset: a train split, an optional test split and optional class names.

    Attributes:
        name: short identifier, e.g. ``"cifar100"`` or a folder's name.
        train: the split used for (self-supervised) training.
        test: the held-out split, or ``None``.
        classes: class names indexed by label, or ``None`` (unlabeled, or names unknown).
    """

    name: str
    train: Split
    test: Split | None
    classes: list[str] | None

    def __post_init__(self) -> None:
        if self.test is not None and self.test.images.shape[1:] != self.train.images.shape[1:]:
            raise ValueError(
                f"source {self.name!r}: train images are {tuple(self.train.images.shape[1:])} "
                f"but test images are {tuple(self.test.images.shape[1:])}"
            )
        if self.classes is not None:
            for split_name, split in (("train", self.train), ("test", self.test)):
                if split is not None and split.labels is not None and split.labels.numel():
                    top = int(split.labels.max())
                    if top >= len(self.classes):
                        raise ValueError(
                            f"source {self.name!r}: {split_name} label {top} has no class name "
                            f"({len(self.classes)} classes)"
                        )

    @property
    def num_classes(self) -> int | None:
        """``len(classes)`` when names are known, else ``1 + max label``; ``None`` if unlabeled."""
        if self.classes is not None:
            return len(self.classes)
        tops = [
            int(s.labels.max())
            for s in (self.train, self.test)
            if s is not None and s.labels is not None and s.labels.numel()
        ]
        return max(tops) + 1 if tops else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.train.images.shape[1:])


# ----------------------------------------------------------------------------------------------
# helpers


def _to_rgb_nchw(array: np.ndarray, where: str) -> torch.Tensor:
    """uint8 NHWC (C in 1, 3) or NHW -> contiguous uint8 NCHW with 3 channels."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 4 or tensor.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected images of shape (N, H, W, 3), (N, H, W, 1) or (N, H, W), got {tuple(array.shape)}")
    tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.contiguous()


def _labels_tensor(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"{where}: expected labels of shape ({n},), got {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {array.dtype}")
    if n and array.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {array.min()}")
    return torch.from_numpy(array.astype(np.int64))


def _replicate_gray(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def resize_source(source: DataSource, image_size: int) -> DataSource:
    """``source`` with every image resized (shorter side, then centre crop) to ``image_size``.

    Returns ``source`` itself when its images already are ``image_size x image_size``.
    """
    if source.image_shape[1:] == (image_size, image_size):
        return source

    def resize(split: Split | None) -> Split | None:
        if split is None:
            return None
        if isinstance(split.images, ImageFiles):  # decoded later: at the new side, by decode_image
            return Split(split.images.at_size(image_size), split.labels)
        chunks = [resize_center_crop(c, image_size) for c in split.images.split(4096)]
        return Split(torch.cat(chunks), split.labels)

    return DataSource(source.name, resize(source.train), resize(source.test), source.classes)


# ----------------------------------------------------------------------------------------------
# npz


def load_npz(path: str | os.PathLike) -> DataSource:
    """Load a dataset stored as a numpy ``.npz`` archive (no pickle).

    Keys:
        ``x_train``: uint8 ``(N, H, W, C)`` with C in {1, 3}, or ``(N, H, W)`` (grayscale). Required.
        ``y_train``: integer ``(N,)``, labels ``>= 0``. Optional: without it the train split is
        unlabeled.
        ``x_test``, ``y_test``: the same for the test split. Optional; ``y_test`` needs ``x_test``.
        ``classes``: ``(K,)`` strings, the class names indexed by label. Optional.
    Other keys are ignored. Images are converted to NCHW with three channels.

    The name of the source is the file name without ``.npz``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive (a single array was stored)")
    with archive:
        keys = set(archive.files)
        if "x_train" not in keys:
            raise ValueError(f"{path}: missing required key 'x_train' (found keys: {sorted(keys)})")
        if "y_test" in keys and "x_test" not in keys:
            raise ValueError(f"{path}: has 'y_test' but no 'x_test'")

        def read(key: str) -> np.ndarray:
            try:
                return archive[key]
            except ValueError as err:  # object arrays need pickle, which is refused
                raise ValueError(f"{path}: key {key!r} cannot be read without pickle ({err})") from err

        def images(key: str) -> torch.Tensor:
            array = read(key)
            if array.dtype != np.uint8:
                raise ValueError(f"{path}: {key!r} must be uint8, got {array.dtype}")
            return _to_rgb_nchw(array, f"{path}: {key!r}")

        def split(x_key: str, y_key: str) -> Split:
            x = images(x_key)
            y = _labels_tensor(read(y_key), x.shape[0], f"{path}: {y_key!r}") if y_key in keys else None
            return Split(x, y)

        train = split("x_train", "y_train")
        test = split("x_test", "y_test") if "x_test" in keys else None
        classes = None
        if "classes" in keys:
            names = read("classes")
            if names.ndim != 1 or names.dtype.kind not in "US":
                raise ValueError(f"{path}: 'classes' must be a 1-d array of strings, got {names.dtype} {names.shape}")
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    try:
        return DataSource(path.stem, train, test, classes)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------------------------
# image folders


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_below(folder: Path, seen: set[str]) -> list[Path]:
    """Image files in ``folder`` and its sub-folders, sorted, hidden entries skipped.

    Links are followed, but a linked folder that leads back to ``folder`` or above it, or to a
    folder walked already, is skipped with a warning (a link loop would walk forever or take in
    other classes' images), and a file whose real path is in ``seen`` (the real paths of the
    files found so far, updated here) is counted once only.
    """
    found, walked = [], set()
    top = Path(os.path.realpath(folder))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = Path(os.path.realpath(Path(dirpath) / name))
            if str(real) in walked or real == top or real in top.parents:
                log.warning("%s links back to %s: skipped, its images are counted once", Path(dirpath) / name, real)
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            real = os.path.realpath(path)
            if _is_image(path) and real not in seen:
                seen.add(real)
                found.append(path)
    return found


def _read_split_folder(folder: Path, image_size: int, classes: list[str] | None,
                       workers: int | None, stream: bool) -> tuple[Split, list[str] | None]:
    """Read one split folder: class sub-folders (labelled) or images directly inside (unlabeled).

    ``classes``: the class list to label with (from the train split), or ``None`` to derive it.
    """
    entries = [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]
    subdirs = [e for e in entries if e.is_dir()]
    direct = [e for e in entries if _is_image(e)]
    if subdirs and direct:
        raise ValueError(
            f"{folder}: mixes images ({direct[0].name}, ...) and sub-folders ({subdirs[0].name}, ...); "
            "use either one sub-folder per class or a flat folder of images"
        )
    if subdirs:
        seen: set[str] = set()
        found = {d.name: _images_below(d, seen) for d in subdirs}
        if classes is None:
            classes = sorted(name for name, files in found.items() if files)
        unknown = sorted(name for name, files in found.items() if files and name not in classes)
        if unknown:
            raise ValueError(f"{folder}: class folder(s) {unknown} are not among the train classes {classes}")
        index = {name: i for i, name in enumerate(classes)}
        files, labels = [], []
        for name in sorted(found):
            files += found[name]
            labels += [index.get(name, -1)] * len(found[name])
    else:
        files, labels = direct, None
    if not files:
        raise ValueError(f"{folder}: no images found (looked for files ending in {', '.join(IMAGE_EXTENSIONS)})")
    images = ImageFiles(files, image_size)
    return Split(images if stream else images.decode(workers), None if labels is None else torch.tensor(labels, dtype=torch.int64)), (
        classes if labels is not None else None
    )


def load_folder(path: str | os.PathLike, image_size: int, workers: int | None = None,
                stream: bool = False) -> DataSource:
    """Load a folder of images into memory, decoding them in ``workers`` DataLoader worker
    processes (``None``: one per 256 images, at most 8 and at most the usable cores; ``0``: in
    this process), or, with ``stream=True``, only list its files.

    Layouts (hidden files and folders are ignored):

    - ``path/<class>/**/<image>``: labelled, ImageFolder style; ``classes`` are the sorted names
      of the class folders that contain images, labels index that list.
    - ``path/<image>``: a flat folder of unlabeled images (``labels`` and ``classes`` are None).
    - ``path/train/`` and optionally ``path/test/`` (or, when there is no ``test/``,
      ``path/val/``), each in one of the layouts above: the train and test splits. Test labels
      use the train split's classes; a test class folder unknown to train is an error.

    Without a ``train/`` folder everything is the train split and ``test`` is None.

    Every image is decoded with PIL, converted to RGB, resized with bicubic interpolation so
    that its **shorter side** is ``image_size`` (aspect ratio kept) and **centre-cropped** to
    ``image_size x image_size``: nothing is stretched, and the borders of the longer side are cut
    off (:func:`~timm_branch.data.files.decode_image`). The result is kept in memory as uint8
    ``(N, 3, image_size, image_size)``; with ``stream=True`` the splits' ``images`` are
    :class:`~timm_branch.data.files.ImageFiles` instead, decoded batch by batch when used (for
    folders larger than memory; the pixels are the same).

    Errors (``ValueError``) name the folder with no images, the unreadable file, or the mixed
    layout; a missing folder raises ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    image_size = int(image_size)
    if (path / "train").is_dir():
        train, classes = _read_split_folder(path / "train", image_size, None, workers, stream)
        test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
        test = None
        if test_dir is not None:
            test, test_classes = _read_split_folder(test_dir, image_size, classes, workers, stream)
            if classes is None and test_classes is not None:
                raise ValueError(
                    f"{path}: train/ is a flat folder of unlabeled images but {test_dir.name}/ has class "
                    "folders; labelled test data needs labelled train data to define the classes"
                )
    else:
        train, classes = _read_split_folder(path, image_size, None, workers, stream)
        test = None
    return DataSource(path.name, train, test, classes)


# ----------------------------------------------------------------------------------------------
# torchvision datasets


def load_torchvision(name: str, root: str | os.PathLike) -> DataSource:
    """Load CIFAR-10, CIFAR-100 or STL-10 from a local torchvision ``root`` (never downloads).

    ``name``:
        ``"cifar10"`` / ``"cifar100"``: 50000 train and 10000 test images, 32x32, labelled
        (CIFAR-100: the 100 fine labels).
        ``"stl10"``: the 5000 labelled train images, 96x96.
        ``"stl10-unlabeled"``: the 100000 unlabeled images as the train split (labels None).
        ``"stl10-train+unlabeled"``: the 5000 labelled plus the 100000 unlabeled images as the
        train split, all with labels None (a split is labelled entirely or not at all; this is
        the usual STL-10 SSL pre-training set).
        For every STL-10 variant the test split is the 8000 labelled test images and
        ``classes`` the 10 class names, so linear probes and kNN evaluation work.

    Expects torchvision's layout: ``root/cifar-10-batches-py``, ``root/cifar-100-python`` or
    ``root/stl10_binary``. When missing or corrupted, ``FileNotFoundError`` says where it looked
    and how to get the files.
    """
    if name not in TORCHVISION_SOURCES:
        raise ValueError(f"unknown torchvision source {name!r}; expected one of {TORCHVISION_SOURCES}")
    try:
        import torchvision.datasets as tvd
    except ImportError as err:  # pragma: no cover - torchvision is installed with timm
        raise ImportError(f"load_torchvision({name!r}) needs torchvision: pip install torchvision") from err
    root = Path(root)
    base = "stl10" if name.startswith("stl10") else name
    folder, url = _TV_INFO[base]

    def missing(err: Exception) -> FileNotFoundError:
        cls = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}[base]
        return FileNotFoundError(
            f"{base} not found (or corrupted) in {root / folder}: ({err}). This loader never downloads. "
            f"To get it, on a machine with internet run `torchvision.datasets.{cls}({str(root)!r}, download=True)`, "
            f"or download {url} and extract it into {root}."
        )

    try:
        if base == "stl10":
            split = {"stl10": "train", "stl10-unlabeled": "unlabeled", "stl10-train+unlabeled": "train+unlabeled"}[name]
            train_ds = tvd.STL10(str(root), split=split, download=False)
            test_ds = tvd.STL10(str(root), split="test", download=False)
            train_images = torch.from_numpy(np.ascontiguousarray(train_ds.data))
            test_images = torch.from_numpy(np.ascontiguousarray(test_ds.data))
            train_labels = torch.from_numpy(train_ds.labels.astype(np.int64)) if split == "train" else None
            test_labels = torch.from_numpy(test_ds.labels.astype(np.int64))
            classes = list(test_ds.classes)
        else:
            cls = tvd.CIFAR10 if base == "cifar10" else tvd.CIFAR100
            train_ds = cls(str(root), train=True, download=False)
            test_ds = cls(str(root), train=False, download=False)
            train_images = _to_rgb_nchw(train_ds.data, f"{root / folder} (train)")
            test_images = _to_rgb_nchw(test_ds.data, f"{root / folder} (test)")
            train_labels = torch.tensor(train_ds.targets, dtype=torch.int64)
            test_labels = torch.tensor(test_ds.targets, dtype=torch.int64)
            classes = list(train_ds.classes)
    except RuntimeError as err:
        raise missing(err) from err
    return DataSource(
        name,
        Split(_replicate_gray(train_images.contiguous()), train_labels),
        Split(_replicate_gray(test_images.contiguous()), test_labels),
        classes,
    )


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DataSource:
    """scikit-learn's bundled handwritten digits: 1797 8x8 grayscale images, 10 classes, offline.

    Pixel values 0..16 are scaled to 0..255, upscaled to ``image_size`` with bilinear
    interpolation, rounded to uint8 and replicated to three channels: uint8
    ``(N, 3, image_size, image_size)``.

    The train/test split is stratified and seeded (a local ``torch.Generator``): from every
    class, ``round(test_fraction * n_class)`` images go to the test split. With the defaults,
    1438 train and 359 test images. Indices keep the original order within each split.
    Needs scikit-learn (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError("load_digits needs scikit-learn (it bundles the data): pip install scikit-learn") from err
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    bunch = sk_load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32) * (255.0 / 16.0)  # (N, 8, 8)
    x = pixels.unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)

    gen = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = (labels == c).nonzero().flatten()
        n_test = round(test_fraction * len(members))
        is_test[members[torch.randperm(len(members), generator=gen)[:n_test]]] = True
    train = Split(images[~is_test], labels[~is_test])
    test = Split(images[is_test], labels[is_test]) if bool(is_test.any()) else None
    return DataSource("digits", train, test, [str(c) for c in range(10)])


# ----------------------------------------------------------------------------------------------
# one entry point


def is_folder_spec(spec: str) -> bool:
    """Whether :func:`load_source` reads ``spec`` as an image folder, the one kind that streams."""
    return (spec != "digits" and spec.partition(":")[0] not in TORCHVISION_SOURCES and not spec.endswith(".npz")
            and Path(spec).is_dir())


def load_source(spec: str, image_size: int, root: str | os.PathLike | None = None,
                workers: int | None = None, stream: bool = False) -> DataSource:
    """Load a data source from a spec string; images come back as ``image_size x image_size``.

    Specs:
        ``"digits"``: :func:`load_digits`.
        ``"cifar10:ROOT"``, ``"cifar100:ROOT"``, ``"stl10:ROOT"``, ``"stl10-unlabeled:ROOT"``,
        ``"stl10-train+unlabeled:ROOT"``: :func:`load_torchvision` from the folder ``ROOT``;
        without ``:ROOT`` (``"cifar100"``), the ``root`` argument is used. ``NAME:FILE.npz``
        loads the npz file and names the source ``NAME``.
        ``"PATH.npz"``: :func:`load_npz`.
        an existing folder: :func:`load_folder`.

    Sources of another resolution are resized once, at load (shorter side to ``image_size``,
    centre crop, antialiased bilinear; see :func:`resize_source`).

    ``workers`` and ``stream`` are :func:`load_folder`'s. Only a folder streams: with
    ``stream=True`` any other spec is a ``ValueError``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec must be a non-empty string, got {spec!r}")
    name, sep, rest = spec.partition(":")
    is_folder = is_folder_spec(spec)
    if stream and not is_folder:
        raise ValueError(f"cannot stream {spec!r}: only an image folder streams (digits, npz files and torchvision "
                         "datasets load into memory); drop stream / --stream or give a folder")
    if spec == "digits":
        return load_digits(image_size)
    if name in TORCHVISION_SOURCES:
        location = rest if sep else (None if root is None else str(root))
        if not location:
            raise ValueError(
                f"spec {spec!r} needs a folder: write {name}:/path/to/root or pass root=..."
            )
        if location.endswith(".npz"):
            source = load_npz(location)
            source.name = name
        else:
            source = load_torchvision(name, location)
        return resize_source(source, image_size)
    if spec.endswith(".npz"):
        return resize_source(load_npz(spec), image_size)
    if is_folder:
        return load_folder(spec, image_size, workers, stream)
    raise ValueError(
        f"cannot load {spec!r}: it is not 'digits', not NAME:ROOT with NAME in {TORCHVISION_SOURCES}, "
        "not a path ending in .npz, and not an existing folder of images"
    )
