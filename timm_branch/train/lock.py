"""An exclusive lock on a run folder, so that two processes never write one run.

The lock is the file ``RUN/run.lock`` holding the owner's process id and host name (JSON). It is
created complete in one step (a hard link of a filled temporary file, which fails if the lock
exists), removed when the owner leaves :func:`run_folder_lock`, and left behind only by a process
that was killed. A lock whose process no longer runs on this host is stale: it is taken over with
a warning. A lock held by a running process, or by a process on another host (which this host
cannot check), makes :func:`run_folder_lock` fail at once with :class:`RunFolderLockedError`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunFolderLockedError(RuntimeError):
    """Another process holds the run folder."""


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _try_create(lock: Path) -> bool:
    """Create ``lock`` holding this process as owner; ``False`` if it exists already."""
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", suffix=".tmp", dir=lock.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(_owner(), file)
        os.link(tmp, lock)  # atomic, and never replaces: a lock is complete or absent
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _holder(lock: Path) -> dict | None:
    """The owner recorded in ``lock``; ``None`` if it vanished meanwhile."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderLockedError(
            f"{lock} is not a lock written by timm-branch ({err}); if no timm-branch process uses "
            f"{lock.parent}, delete {lock} and start again") from err
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        raise RunFolderLockedError(f"{lock} names no process id; if no timm-branch process uses {lock.parent}, "
                                   f"delete {lock} and start again")
    return holder


@contextlib.contextmanager
def run_folder_lock(run: Path) -> Iterator[None]:
    """Hold ``run`` (created if missing) exclusively for the block.

    If ``run`` was created here and is still empty when the block ends, it is removed again, so
    that a run refused before it wrote anything leaves no folder behind.

    Raises:
        RunFolderLockedError: a running process (or one on another host) holds ``run``.
    """
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    me = _owner()
    while not _try_create(lock):
        holder = _holder(lock)
        if holder is None:
            continue  # released between our attempt and our read: try again
        if holder.get("host") != me["host"] or _alive(holder["pid"]):
            where = "this host" if holder.get("host") == me["host"] else f"host {holder.get('host')!r}"
            raise RunFolderLockedError(
                f"{run} is in use by another timm-branch process (pid {holder['pid']} on {where}): wait for it to "
                f"finish or choose another --output. If that process no longer runs, delete {lock}")
        log.warning("%s: taking over a stale lock of pid %d, which no longer runs (killed?)", run, holder["pid"])
        lock.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                run.rmdir()  # only succeeds if the run wrote nothing
