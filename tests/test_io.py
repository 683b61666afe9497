"""Atomic writes leave the old file or the new one, never a part, and no temporary files."""
from __future__ import annotations

import json
import os
import stat

import pytest

from timm_branch._io import atomic_write, atomic_write_json, atomic_write_text, staging_folder


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def half_then_fail(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_staged_folders_get_the_mode_the_umask_gives(tmp_path, umask):
    """A staged folder renamed into place (task-K/, a checkpoint, save_pretrained's folder) has
    mkdir's mode under the umask, not mkdtemp's 0700: others can read a finished model."""
    previous = os.umask(umask)
    try:
        with staging_folder(tmp_path / "task-0") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.rename(tmp, tmp_path / "task-0")
        (tmp_path / "made").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "task-0").stat().st_mode) == stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o777 & ~umask
