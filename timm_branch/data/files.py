"""Image files decoded on demand: a split that stands for a uint8 tensor without holding it.

An :class:`ImageFiles` is the list of a folder split's files and the side they decode to. It
takes the place of the ``uint8 (N, 3, s, s)`` tensor in a :class:`~timm_branch.data.sources.Split`
when the images do not fit in memory (``load_folder(..., stream=True)``): selecting rows selects
files, and :meth:`ImageFiles.batches` decodes batches in DataLoader worker processes while the
model trains on the previous ones, so the batched augmentations of ``augment.py`` still run on
the training device. Decoding a file gives exactly the pixels that decoding the folder up front
gives (the same :func:`decode_image`), so a streamed run trains bit for bit as an in-memory one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

_FILES_PER_WORKER = 256
"""With ``workers=None``, decoding a whole split uses one worker per this many files."""
_DECODE_BATCH = 256
"""Images per batch when :meth:`ImageFiles.decode` decodes a whole split."""
_MAX_WORKERS = 8
"""With ``workers=None``, at most this many decoding workers (and at most the usable cores)."""


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """The image at ``path`` as uint8 ``(image_size, image_size, 3)`` RGB: PIL decode, bicubic
    resize of the shorter side to ``image_size`` (aspect ratio kept), centre crop.

    Raises:
        ValueError: the file cannot be read as an image (the message names it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            width, height = img.size
            scale = image_size / min(width, height)
            new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
            if (new_w, new_h) != (width, height):
                img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def default_workers(processes: int = 1) -> int:
    """Decoding workers for each of ``processes`` training processes on one machine: the usable
    cores shared among them, at most 8 each, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_MAX_WORKERS, cores // max(1, processes)))


class _FileBatches(torch.utils.data.Dataset):
    """Decodes whole batches: ``__getitems__(rows)`` is uint8 ``(len(rows), 3, s, s)``, or the
    message of the first file that cannot be read, so that the training process, not a worker,
    raises the error."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> torch.Tensor | str:
        return self.__getitems__([row])

    def __getitems__(self, rows: list[int]) -> torch.Tensor | str:
        size = self.files.image_size
        out = torch.empty(len(rows), size, size, 3, dtype=torch.uint8)
        pixels = out.numpy()  # PIL's arrays are read-only: copy them in through numpy
        for j, i in enumerate(rows):
            try:
                pixels[j] = decode_image(self.files.path(i), size)
            except ValueError as err:
                return str(err)
        return out.permute(0, 3, 1, 2).contiguous()


def _as_is(batch: torch.Tensor | str) -> torch.Tensor | str:
    return batch


class ImageFiles:
    """``N`` image files standing for the uint8 ``(N, 3, image_size, image_size)`` tensor of
    their decoded pixels (:func:`decode_image`), decoded only when a batch is asked for.

    Args:
        files: the image files, in row order.
        image_size: the side every image decodes to, in pixels.

    Indexing with an int64 index tensor, a bool mask, a slice or a list of ints selects rows, as
    on a tensor, and gives a new :class:`ImageFiles`; nothing is decoded. ``shape`` and ``dtype``
    are those of the tensor it stands for.

    The paths are held as one byte array and their end offsets, not as Python objects: forked
    DataLoader workers that read Python objects touch their reference counts, which copies every
    page they read into each worker (pytorch/pytorch#13246). ImageNet's 1.28 million training
    paths take about 410 MiB as ``Path`` objects and 74 MiB here (measured with CPython 3.11).
    """

    dtype = torch.uint8

    def __init__(self, files: Sequence[str | os.PathLike], image_size: int) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        encoded = [os.fsencode(f) for f in files]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self._ends)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, image_size={self.image_size})"

    @property
    def shape(self) -> torch.Size:
        """``(N, 3, image_size, image_size)``."""
        return torch.Size((len(self), 3, self.image_size, self.image_size))

    @property
    def files(self) -> list[Path]:
        """The files, in row order (made on each access: a list of ``N`` paths)."""
        return [self.path(i) for i in range(len(self))]

    def path(self, row: int) -> Path:
        """The file of row ``row`` (``0 <= row < N``)."""
        begin = int(self._ends[row - 1]) if row else 0
        return Path(os.fsdecode(self._bytes[begin:int(self._ends[row])].tobytes()))

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> ImageFiles:
        n = len(self)
        if isinstance(index, slice):
            return self._rows(np.arange(n, dtype=np.int64)[index])
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (n,):
                raise IndexError(f"a bool mask over {n} files must have shape ({n},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.ndim != 1 or index.is_floating_point():
            raise IndexError(f"index files with a 1-D integer tensor, a bool mask or a slice, got {index.dtype} {tuple(index.shape)}")
        rows = index.cpu().numpy().astype(np.int64)
        if len(rows) and not -n <= rows.min() <= rows.max() < n:
            raise IndexError(f"index out of range for {n} files: {rows.min()}..{rows.max()}")
        return self._rows(rows % max(n, 1))

    def _rows(self, rows: np.ndarray) -> ImageFiles:
        """The files of ``rows`` (int64, each in ``[0, N)``)."""
        begins = np.concatenate([[0], self._ends[:-1]])[rows]
        ends = self._ends[rows]
        pieces = [self._bytes[b:e] for b, e in zip(begins.tolist(), ends.tolist())]
        return self._with(np.concatenate(pieces) if pieces else self._bytes[:0], np.cumsum(ends - begins, dtype=np.int64),
                          self.image_size)

    def _with(self, data: np.ndarray, ends: np.ndarray, image_size: int) -> ImageFiles:
        out = ImageFiles.__new__(ImageFiles)
        out._bytes, out._ends, out.image_size = data, ends, image_size
        return out

    def at_size(self, image_size: int) -> ImageFiles:
        """The same files, decoding to ``image_size`` px."""
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        return self._with(self._bytes, self._ends, int(image_size))

    @staticmethod
    def cat(parts: Sequence[ImageFiles]) -> ImageFiles:
        """The rows of ``parts``, one after the other (all must decode to the same side)."""
        sizes = {p.image_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate files decoded to different sides {sorted(sizes)}")
        offsets = np.cumsum([0] + [len(p._bytes) for p in parts[:-1]])
        ends = np.concatenate([p._ends + o for p, o in zip(parts, offsets)]).astype(np.int64)
        return parts[0]._with(np.concatenate([p._bytes for p in parts]), ends, sizes.pop())

    def batches(self, batches: int | Iterable[torch.Tensor | Sequence[int]], workers: int | None = None,
                device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """Decode batches in DataLoader worker processes; yield each as uint8 ``(B, 3, s, s)`` on
        ``device``.

        Args:
            batches: a batch size (every row in order, in batches of that many; the last may be
                smaller), or the batches themselves: row indices (int64 tensors on any device, or
                int sequences), from any iterable, which is read only as far as the workers have
                got (they may run two batches each ahead of the batch in use), so it may be lazy
                and long (all the epochs of a task).
            workers: decoding processes; ``0`` decodes in this process; ``None``: one per usable
                core, at most 8, and with a batch size, one per 256 files (none below 256).
            device: where the batches go; on a GPU through pinned memory, without waiting.

        Raises:
            ValueError: a file cannot be read (raised here, in the calling process).
        """
        if isinstance(batches, int):
            if batches < 1:
                raise ValueError(f"batch size must be >= 1, got {batches}")
            rows: Iterable = (range(i, min(i + batches, len(self))) for i in range(0, len(self), batches))
            cap = len(self) // _FILES_PER_WORKER  # a few files: decoding here beats starting workers
        else:
            rows = (torch.as_tensor(b).tolist() for b in batches)
            cap = _MAX_WORKERS
        if workers is None:
            workers = min(default_workers(), cap)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        device = torch.device(device)
        pin = device.type == "cuda"
        loader = torch.utils.data.DataLoader(_FileBatches(self), batch_sampler=rows, collate_fn=_as_is,
                                             num_workers=workers, pin_memory=pin)
        for batch in loader:
            if isinstance(batch, str):
                raise ValueError(batch)
            yield batch.to(device, non_blocking=pin)

    def decode(self, workers: int | None = None) -> torch.Tensor:
        """Every image, in row order, as one uint8 ``(N, 3, s, s)`` tensor on the CPU (``workers``
        as in :meth:`batches`, which decodes it in batches of 256)."""
        out = torch.empty(tuple(self.shape), dtype=torch.uint8)
        start = 0
        for batch in self.batches(_DECODE_BATCH, workers):
            out[start:start + len(batch)] = batch
            start += len(batch)
        return out
