"""Hub faults not covered by test_hub's client session: a Hub that accepts requests and never
answers. The push fails within its timeout, retries only what is safe to repeat, says whether a
commit may have happened, and leaves the local folder as it was."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm

from hub_server import hub_server  # noqa: F401 - fixture
from timm_branch import save_pretrained
from timm_branch.hub import HubPushError, push_task_folder

TOKEN = "hf_reliabilityDummyToken0123"
TIMEOUT = 0.5


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_pretrained(timm.create_model("test_resnet", num_classes=0), tmp_path / "task-0")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _push(folder: Path, repo_id: str, url: str) -> HubPushError:
    before = _digest(folder)
    with pytest.raises(HubPushError) as err:
        push_task_folder(folder, repo_id, token=TOKEN, endpoint=url, timeout=TIMEOUT)
    assert _digest(folder) == before  # the local artifacts are only read
    return err.value


def test_hub_that_never_answers_repo_creation_times_out_after_safe_retries(folder, hub_server):  # noqa: F811
    hub_server.stall(30, count=3, path_contains="/api/repos/create")
    err = _push(folder, "org/silent", hub_server.url)
    assert err.status is None and err.step == "creating the repository"
    assert f"did not answer within {TIMEOUT:g} s while creating the repository" in str(err)
    assert "nothing was published" in str(err)
    assert [r for r in hub_server.requests if r[1] == "/api/repos/create"] == [("POST", "/api/repos/create")] * 3
    assert "org/silent" not in hub_server.repos


def test_hub_that_never_answers_the_commit_times_out_without_a_retry(folder, hub_server):  # noqa: F811
    hub_server.stall(30, count=1, path_contains="/commit/")
    err = _push(folder, "org/slow-commit", hub_server.url)
    assert err.status is None and err.step == "uploading and committing the files"
    assert f"did not answer within {TIMEOUT:g} s while uploading and committing the files" in str(err)
    assert "the commit may or may not have been made: check the repository before pushing again" in str(err)
    assert len([r for r in hub_server.requests if "/commit/" in r[1]]) == 1  # a retry could commit twice
    assert set(hub_server.files("org/slow-commit")) == {".gitattributes"}
