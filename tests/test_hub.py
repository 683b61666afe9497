"""Pushing to the Hub end to end through the real huggingface_hub client, against a loopback Hub.

One client subprocess (``HF_ENDPOINT`` at the loopback server, ``HF_HUB_DISABLE_XET=1``, a dummy
token in ``HF_TOKEN``, ``HF_HOME`` in tmp, DEBUG logging on) runs every push scenario and writes
what happened to ``results.json``; a second fresh subprocess that imports only timm loads the
pushed model with ``timm.create_model("hf-hub:org/name", pretrained=True)`` and ``local-dir:`` on the
downloaded snapshot; offline mode then loads it from that cache in this process. The tests below check those records and the server's state.
(Importing torch and timm costs seconds per process, hence one process per role.)
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub_server import HubServer, client_env, hub_server, hub_url  # noqa: F401 - fixtures for other modules
from test_card import fabricate_run, merged_test_resnet

TOKEN = "hf_loopbackDummyToken4f7a9c2e1b"  # must never show up in files or logs
COMMIT_URL = re.compile(r"^http://127\.0\.0\.1:\d+/(?P<repo>[\w.-]+/[\w.-]+)/commit/(?P<sha>[0-9a-f]{40})$")

_CLIENT = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    import safetensors.torch, torch
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    sys.path.insert(0, sys.argv[2])
    from test_card import merged_test_resnet
    from timm_branch.hub import HubPushError, push_to_hub, push_task_folder

    work = Path(sys.argv[1])
    out = {}

    def attempt(name, fn):
        try:
            out[name] = {"ok": True, "url": fn()}
        except HubPushError as err:
            out[name] = {"ok": False, "type": type(err).__name__, "status": err.status, "step": err.step,
                         "message": str(err)}

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = merged_test_resnet(tasks=1, seed=1)
    attempt("first", lambda: push_to_hub(first, "org/name"))
    second = merged_test_resnet(tasks=2, seed=2)  # the lineage went on: one more merged task
    attempt("second", lambda: push_to_hub(second, "org/name", commit_message="task 1"))
    with torch.no_grad():
        safetensors.torch.save_file({"x": x, "y": second(x)}, work / "probe.safetensors")
    task = work / "run" / "task-1"
    attempt("task", lambda: push_task_folder(task, "org/task"))
    attempt("denied", lambda: push_task_folder(task, "org/denied"))
    attempt("forbidden", lambda: push_task_folder(task, "org/forbidden"))
    attempt("broken", lambda: push_task_folder(task, "org/broken"))
    attempt("flaky", lambda: push_task_folder(task, "org/flaky"))
    attempt("down", lambda: push_task_folder(task, "org/down", endpoint=sys.argv[3]))
    attempt("branch", lambda: push_task_folder(task, "org/task", revision="dev"))
    attempt("pr", lambda: push_task_folder(task, "org/task", create_pr=True))
    (work / "results.json").write_text(json.dumps(out))
    """
)

_LOADER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import safetensors.torch, timm, torch
    sys.stdin.readline()  # imported while the client pushes; go on once the pushes are done
    probe = safetensors.torch.load_file(sys.argv[1])
    model = timm.create_model("hf-hub:org/name", pretrained=True).eval()
    with torch.no_grad():
        err = float((model(probe["x"]) - probe["y"]).abs().max())
    result = {"hf_hub": err, "type": type(model).__module__, "timm_branch_imported": "timm_branch" in sys.modules}
    if len(sys.argv) > 2:  # the downloaded snapshot is a pushed folder: local-dir loads it too
        snapshot = next(Path(sys.argv[2]).glob("hub/models--org--name/snapshots/*/"))
        local = timm.create_model("local-dir:" + str(snapshot), pretrained=True).eval()
        with torch.no_grad():
            result["local_dir"] = float((local(probe["x"]) - probe["y"]).abs().max())
    print("RESULT " + json.dumps(result))
    """
)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_env = client_env


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Run the client and loader subprocesses once against one server; yield what they left."""
    work = tmp_path_factory.mktemp("hub")
    fabricate_run(work / "run")
    before = _tree_digest(work / "run")
    with HubServer() as hub:
        hub.fail(401, count=1000, repo_id="org/denied")
        hub.fail(403, count=1000, repo_id="org/forbidden")
        hub.fail(500, count=1000, repo_id="org/broken", path_contains="/commit/")
        hub.fail(503, count=1, repo_id="org/flaky", path_contains="/api/repos/create")
        home, url = work / "hf-home", hub.url
        # The loader starts now so that its imports overlap the client's work; it reads one line from
        # stdin before it touches the Hub.
        loader = subprocess.Popen([sys.executable, "-c", _LOADER, str(work / "probe.safetensors"), str(home)],
                                  env=_env(url, home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            client = subprocess.run(
                [sys.executable, "-c", _CLIENT, str(work), str(Path(__file__).parent), f"http://127.0.0.1:{_free_port()}"],
                env=_env(url, home, HF_TOKEN=TOKEN), capture_output=True, text=True, timeout=300,
            )
            assert client.returncode == 0, client.stdout + client.stderr[-6000:]
            loaded, loader_err = loader.communicate("go\n", timeout=300)
        finally:
            if loader.poll() is None:
                loader.kill()
                loader.communicate()
        assert loader.returncode == 0, loaded + loader_err[-6000:]
    yield {
        "hub": hub, "work": work, "results": json.loads((work / "results.json").read_text()),
        "logs": client.stdout + client.stderr, "before": before, "after": _tree_digest(work / "run"),
        "loaded": json.loads(loaded.split("RESULT ", 1)[1]),
        "home": home,
    }


def _card(hub: HubServer, repo: str, rev: str = "main") -> str:
    return hub.files(repo, rev)["README.md"].decode()


def _table_rows(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| task")]


def test_push_then_plain_timm_loads_the_same_model(session):
    first = session["results"]["first"]
    assert first["ok"] and COMMIT_URL.match(first["url"]).group("repo") == "org/name"
    files = session["hub"].files("org/name")
    assert set(files) == {".gitattributes", "model.safetensors", "config.json", "README.md"}  # no pickle
    assert json.loads(files["config.json"])["architecture"] == "test_resnet"
    loaded = session["loaded"]
    assert not loaded["timm_branch_imported"] and loaded["type"].startswith("timm.")
    assert loaded["hf_hub"] <= 1e-6, loaded
    assert loaded["local_dir"] <= 1e-6, loaded


def test_offline_load_from_the_cache(session):
    """With the server gone, ``HF_HUB_OFFLINE=1`` serves ``hf-hub:`` from the cache the loader filled."""
    script = textwrap.dedent(
        """
        import sys, safetensors.torch, timm, torch
        probe = safetensors.torch.load_file(sys.argv[1])
        model = timm.create_model("hf-hub:org/name", pretrained=True).eval()
        with torch.no_grad():
            sys.exit(0 if float((model(probe["x"]) - probe["y"]).abs().max()) <= 1e-6 else 3)
        """
    )
    env = _env(f"http://127.0.0.1:{_free_port()}", session["home"], HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script, str(session["work"] / "probe.safetensors")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


def test_second_push_makes_a_new_commit_with_a_regenerated_card(session):
    hub, results = session["hub"], session["results"]
    first, second = (COMMIT_URL.match(results[k]["url"]).group("sha") for k in ("first", "second"))
    assert first != second
    commits = hub.repos["org/name"].history()
    assert [c.sha for c in commits[:2]] == [second, first] and commits[0].message == "task 1"
    assert len(_table_rows(_card(hub, "org/name", first))) == 1
    assert len(_table_rows(_card(hub, "org/name", second))) == 2
    assert json.loads(hub.files("org/name")["config.json"])["timm_branch"]["history"][1]["shape"] == "cross"


def test_branched_model_is_refused_before_any_request(hub_server):
    import timm_branch as tb
    from timm_branch.hub import push_to_hub

    model = merged_test_resnet(tasks=0)
    tb.add_branches(model)
    with pytest.raises(ValueError, match="still has branches.*merge_branches"):
        push_to_hub(model, "org/branched", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.requests == [] and "org/branched" not in hub_server.repos


def test_push_task_folder_uploads_model_files_and_a_card_from_the_run(session):
    hub, result = session["hub"], session["results"]["task"]
    assert result["ok"] and COMMIT_URL.match(result["url"]).group("repo") == "org/task"
    files = hub.files("org/task", COMMIT_URL.match(result["url"]).group("sha"))
    assert set(files) == {".gitattributes", "model.safetensors", "config.json", "README.md", "accuracy_curves.png"}
    run_task = session["work"] / "run" / "task-1"
    assert files["model.safetensors"] == (run_task / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card != (run_task / "README.md").read_text()  # regenerated, not the export's card
    assert "![top-1 accuracy after each task](accuracy_curves.png)" in card
    rows = _table_rows(card)
    assert len(rows) == 2 and "simclr" in rows[1] and "62.50%" in rows[1] and "75.00%" in rows[1]


def test_revision_and_pull_request(session):
    hub, results = session["hub"], session["results"]
    assert results["branch"]["ok"] and results["pr"]["ok"], results
    repo = hub.repos["org/task"]
    assert repo.branches["dev"] == COMMIT_URL.match(results["branch"]["url"]).group("sha")
    assert repo.branches["refs/pr/1"] == COMMIT_URL.match(results["pr"]["url"]).group("sha")
    assert repo.branches["main"] == COMMIT_URL.match(results["task"]["url"]).group("sha")


def test_401_is_a_clear_error_and_leaves_local_files_untouched(session):
    err = session["results"]["denied"]
    assert not err["ok"] and err["status"] == 401 and err["step"] == "creating the repository"
    assert "token was rejected" in err["message"] and "hf auth login" in err["message"]
    assert "org/denied" not in session["hub"].repos
    assert session["after"] == session["before"]


def test_403_is_a_clear_error(session):
    err = session["results"]["forbidden"]
    assert not err["ok"] and err["status"] == 403
    assert "may not write to org/forbidden" in err["message"] and "write access" in err["message"]


def test_500_on_commit_is_a_clear_error_and_nothing_is_committed(session):
    err = session["results"]["broken"]
    assert not err["ok"] and err["status"] == 500 and err["step"] == "uploading and committing the files"
    assert "HTTP 500" in err["message"] and "server-side" in err["message"] and "Try again later" in err["message"]
    assert set(session["hub"].files("org/broken")) == {".gitattributes"}  # created, never committed to
    assert session["after"] == session["before"]


def test_transient_503_on_repo_creation_is_retried(session):
    assert session["results"]["flaky"]["ok"]
    assert "model.safetensors" in session["hub"].files("org/flaky")


def test_server_down_is_a_clear_error(session):
    err = session["results"]["down"]
    assert not err["ok"] and err["status"] is None
    assert "cannot reach the Hub" in err["message"] and "HF_ENDPOINT" in err["message"]


def test_token_is_sent_but_never_written_or_logged(session):
    hub = session["hub"]
    assert TOKEN in hub.tokens_seen  # the client did authenticate with it
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            for name, data in commit.files.items():
                assert TOKEN.encode() not in data, f"token in {repo.repo_id}:{name}"
    assert TOKEN not in session["logs"]
    assert all(TOKEN not in json.dumps(r) for r in session["results"].values())
    for path in session["work"].rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_token_sources(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from timm_branch.hub import HubPushError, resolve_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(HubPushError, match="HF_TOKEN.*hf auth login"):
        resolve_token()
    (tmp_path / "token").write_text("hf_fromTheLoginCache")
    assert resolve_token() == "hf_fromTheLoginCache"
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    assert resolve_token() == "hf_fromTheEnvironment"
    assert resolve_token("hf_explicit") == "hf_explicit"


def test_bad_arguments_fail_before_any_request(tmp_path, hub_server):
    from timm_branch.hub import push_task_folder, push_to_hub

    with pytest.raises(ValueError, match="org/name"):
        push_to_hub(merged_test_resnet(tasks=0), "no-namespace", token=TOKEN, endpoint=hub_server.url)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        push_task_folder(tmp_path, "org/pickle", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.requests == []
