"""Atomic file writes and checked reads.

Writes: a temporary file (or folder) beside the target, flushed to disk, renamed over it. A reader
(or a resumed run after a crash) sees either the old file or the new one, never a part. A failed
write raises :class:`WriteError`, which names the file and leaves no temporary file behind.

Reads: weights come from safetensors files only; optimiser states from ``torch.load(...,
weights_only=True)``, which refuses anything but tensors and plain containers. A file that does
not parse raises :class:`CorruptFileError` naming it; a missing one ``FileNotFoundError``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import safetensors.torch
import torch
from safetensors import SafetensorError


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...): nothing was replaced, and no
    temporary file is left. ``errno`` is the operating system's (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, target: str | os.PathLike, err: OSError, part: str | None = None) -> None:
        self.reason = err.reason if isinstance(err, WriteError) else (err.strerror or str(err))
        self.part = part  # the file inside ``target`` whose write failed, if ``target`` is a folder
        where = f"{target} ({part})" if part else str(target)
        message = f"cannot write {where}: {self.reason}; nothing was replaced and no temporary file is left"
        super().__init__(err.errno, message, str(target))

    def __str__(self) -> str:
        return self.strerror


class CorruptFileError(ValueError):
    """A file exists but does not hold what it should: truncated, damaged, or another kind of file."""


def write_error(target: str | os.PathLike, err: OSError) -> WriteError:
    """``err``, raised while assembling ``target`` in a staging folder, as a :class:`WriteError`
    that names ``target`` and the file that failed (in nested staging folders, the innermost)."""
    part = getattr(err, "part", None) or (Path(err.filename).name if err.filename else None)
    return WriteError(target, err, part)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it to ``path`` atomically.

    The temporary file lives in ``path``'s folder (a rename is atomic only within one file
    system) and is removed if ``write`` raises; an ``OSError`` becomes a :class:`WriteError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        # mkstemp creates the file 0600; give it the permissions of an ordinary new file.
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise
    fsync_path(path.parent)
    return path


@contextlib.contextmanager
def staging_folder(target: Path, parent: Path | None = None) -> Iterator[Path]:
    """A hidden temporary folder in ``parent`` (default: ``target``'s parent) to assemble
    ``target`` in. It is removed when the block ends (after the block renamed it into place, there
    is nothing left to remove); an ``OSError`` in the block becomes a :class:`WriteError` naming
    ``target``."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent or target.parent))
        # mkdtemp makes the folder 0700; renamed into place it must have the mode a mkdir would
        # give it, or other users could not read a finished model.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except OSError as err:
        raise write_error(target, err) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` would change global state)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _write_all(path: Path, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``path`` with ``os.write``.

    Python-level writes report a full disk as ``OSError(ENOSPC)``; the writers of safetensors and
    ``torch.save`` would report it as their own error types, without the errno.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: _write_all(tmp, data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous, CPU) as a safetensors file, atomically."""
    return atomic_write_bytes(path, safetensors.torch.save(tensors, metadata))


def write_torch_state(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save(state)`` to ``path`` atomically; for optimiser states (tensors, numbers, lists)
    that :func:`read_torch_state` reads back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU.

    Raises:
        FileNotFoundError: ``path`` is missing.
        CorruptFileError: ``path`` is not a complete safetensors file (truncated or damaged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return safetensors.torch.load_file(path)
    except SafetensorError as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({err}): it is truncated or damaged") from err


def read_torch_state(path: str | os.PathLike) -> dict:
    """A state written by :func:`write_torch_state`, read with ``weights_only=True`` onto the CPU.

    Raises:
        FileNotFoundError: ``path`` is missing.
        CorruptFileError: ``path`` is damaged, or holds objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged archive is a RuntimeError, a refused object an UnpicklingError
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        raise CorruptFileError(f"{path} cannot be read as a saved state ({reason}): it is truncated or damaged") from err


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; ``FileNotFoundError`` / :class:`CorruptFileError` name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}): it is truncated or damaged") from err
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
