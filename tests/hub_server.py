"""A loopback Hugging Face Hub for tests: enough of the HTTP API for the real ``huggingface_hub``
client to push a model repository and for ``timm.create_model("hf-hub:...")`` to download it.

Endpoints (REFERENCE.md section 7), all on 127.0.0.1:

- ``POST /api/repos/create``                      create a model repo (409 with ``url`` if it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``    repo info: ``id``, ``sha``, ``siblings``, ``private``
- ``POST /api/models/{repo}/preupload/{rev}``     every file ``uploadMode: regular`` (no LFS, no Xet)
- ``POST /api/models/{repo}/commit/{rev}``        NDJSON commit: header, ``file`` (base64) and
  ``deletedFile`` lines; ``?create_pr=1`` commits to a new ``refs/pr/N`` branch
- ``POST /api/models/{repo}/branch/{branch}``     create a branch from ``main`` (or ``startingPoint``)
- ``POST /api/validate-yaml``                      parses the card's YAML front matter for real
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``       file bytes with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``; 404 + ``X-Error-Code: EntryNotFound`` / ``RevisionNotFound`` /
  ``RepoNotFound``

Repositories live in memory: every commit gets a random 40-hex sha and a full snapshot of the
files; branches (``main``, ``refs/pr/N``, others) point at commits, and a revision may be a
branch or a commit sha. Writes need an ``Authorization: Bearer`` header; with ``valid_tokens``
set, other tokens get 401. ``fail(status, count, path_contains, method)`` makes the next
matching requests fail, ``stall(seconds, ...)`` makes them hang unanswered (fault injection). Tokens are never logged; ``requests`` records method
and path only.

Use the ``hub_server`` fixture (import it into a test module) or ``HubServer()`` as a context
manager.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        matches = [c for sha, c in self.commits.items() if sha.startswith(rev) and len(rev) >= 7]
        return matches[0] if len(matches) == 1 else None

    def history(self, rev: str = "main") -> list[Commit]:
        """Commits reachable from ``rev``, newest first."""
        commit, out = self.resolve(rev), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass
class Fault:
    status: int
    count: int
    path_contains: str | None = None
    method: str | None = None
    repo_id: str | None = None
    stall: float = 0.0  # > 0: hold the request this long without an answer, then drop the connection

    def matches(self, method: str, path: str, repo_id: str | None) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path)
                and (self.repo_id is None or self.repo_id == repo_id))


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The in-memory Hub; ``url`` is its endpoint once started."""

    def __init__(self, valid_tokens: set[str] | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.valid_tokens = valid_tokens
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.tokens_seen: set[str] = set()
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls -----------------------------------------------------------------------

    def fail(self, status: int, count: int = 1, path_contains: str | None = None, method: str | None = None,
             repo_id: str | None = None) -> None:
        """Answer the next ``count`` requests matching all of ``path_contains`` (a substring of the
        path), ``method`` and ``repo_id`` (the repository a request is about, also for
        ``/api/repos/create``) with the error ``status``."""
        with self.lock:
            self.faults.append(Fault(status, count, path_contains, method, repo_id))

    def stall(self, seconds: float, count: int = 1, path_contains: str | None = None, method: str | None = None,
              repo_id: str | None = None) -> None:
        """Leave the next ``count`` matching requests (as for :meth:`fail`) unanswered for ``seconds``,
        then drop the connection: a Hub that accepts a request and hangs."""
        with self.lock:
            self.faults.append(Fault(0, count, path_contains, method, repo_id, stall=seconds))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``rev`` (a copy)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            return dict(commit.files) if commit else {}

    def _take_fault(self, method: str, path: str, repo_id: str | None) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and fault.matches(method, path, repo_id):
                    fault.count -= 1
                    return fault
        return None

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], deleted: list[str], message: str) -> Commit:
        with self.lock:
            parent = repo.resolve(branch)
            snapshot = dict(parent.files) if parent else {}
            for path in deleted:
                snapshot = {p: d for p, d in snapshot.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            snapshot.update(files)
            commit = Commit(secrets.token_hex(20), snapshot, message, parent.sha if parent else None)
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            return commit


_STATUS_TEXT = {
    401: "Invalid credentials in Authorization header",
    403: "You don't have the rights to create a model under this namespace",
    500: "Internal Error - We're working hard to fix this as soon as possible!",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _target_repo(parts: list[str], body: bytes) -> str | None:
    """The repository a request is about (for fault matching)."""
    if parts[:3] == ["api", "repos", "create"]:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return None
        org, name = payload.get("organization"), payload.get("name")
        return f"{org}/{name}" if org else name
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        return f"{parts[2]}/{parts[3]}"
    if len(parts) >= 3 and parts[2] == "resolve":
        return f"{parts[0]}/{parts[1]}"
    return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_version = "loopback-hub/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - never print requests (or headers)
        pass

    # -- helpers -----------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _authorised(self, write: bool, head: bool = False) -> bool:
        token = self._token()
        if token:
            with self.hub.lock:
                self.hub.tokens_seen.add(token)
        if (write and not token) or (token and self.hub.valid_tokens is not None and token not in self.hub.valid_tokens):
            self._error(401, _STATUS_TEXT[401], head=head)
            return False
        return True

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        body = self._body() if method == "POST" else b""
        head = method == "HEAD"
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        fault = self.hub._take_fault(method, path, _target_repo(parts, body))
        if fault is not None and fault.stall:
            time.sleep(fault.stall)
            self.close_connection = True
            return
        if fault is not None:
            self._error(fault.status, _STATUS_TEXT.get(fault.status, f"injected error {fault.status}"), head=head)
            return
        try:
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create(json.loads(body or b"{}"))
            if parts[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._model_api(method, parts[2] + "/" + parts[3], parts[4:], body, query)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
        except (ValueError, KeyError) as err:
            return self._error(400, f"bad request: {err}", head=head)
        self._error(404, f"no such endpoint: {method} {path}", head=head)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints ---------------------------------------------------------------------------

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.hub.url}/{repo_id}"

    def _create(self, payload: dict) -> None:
        if not self._authorised(write=True):
            return
        if payload.get("type", "model") != "model":
            return self._error(400, "only model repositories are supported")
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"  # the server's idea of "the token's user"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": self._repo_url(repo_id)},
                                  {"X-Error-Message": "You already created this model repo"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            self.hub.repos[repo_id] = repo
            self.hub.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, [],
                            "initial commit")
        self._json(200, {"url": self._repo_url(repo_id), "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content") or ""
        if content.startswith("---"):  # the client sends the whole README.md
            match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
            content = match.group(1) if match else content
        try:
            meta = yaml.safe_load(content)
        except yaml.YAMLError as err:
            message = f"Invalid YAML in model card metadata: {err}"
            return self._json(400, {"error": message, "errors": [{"message": message}], "warnings": []})
        if meta is not None and not isinstance(meta, dict):
            message = "model card metadata must be a mapping"
            return self._json(400, {"error": message, "errors": [{"message": message}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _model_api(self, method: str, repo_id: str, rest: list[str], body: bytes, query: dict) -> None:
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
        write = method == "POST"
        if not self._authorised(write=write):
            return
        if repo is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        if method == "GET" and (not rest or rest[0] == "revision"):
            rev = "/".join(rest[1:]) if rest else "main"
            commit = repo.resolve(rev)
            if commit is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                                    "siblings": [{"rfilename": p} for p in sorted(commit.files)]})
        if method == "POST" and rest and rest[0] == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files], "commitOid": None})
        if method == "POST" and rest and rest[0] == "branch":
            branch = "/".join(rest[1:])
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            with self.hub.lock:
                if branch in repo.branches:
                    return self._error(409, f"Reference {branch} already exists")
                commit = repo.resolve(start)
                if commit is None:
                    return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
                repo.branches[branch] = commit.sha
            return self._json(200, {})
        if method == "POST" and rest and rest[0] == "commit":
            return self._commit(repo, "/".join(rest[1:]), body, query)
        self._error(404, f"no such endpoint: {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _commit(self, repo: Repo, rev: str, body: bytes, query: dict) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        files, deleted = {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"unsupported commit operation {key!r} (this server has no LFS)")
        with self.hub.lock:
            base = repo.resolve(rev)
            if base is None or (rev not in repo.branches and not query.get("create_pr")):
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and not query.get("create_pr") and parent != base.sha:
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            pr_url = None
            if query.get("create_pr") in (["1"], ["true"]):
                repo.prs += 1
                branch = f"refs/pr/{repo.prs}"
                repo.branches[branch] = (parent or base.sha)
                pr_url = f"{self._repo_url(repo.repo_id)}/discussions/{repo.prs}"
            else:
                branch = rev
            commit = self.hub.commit(repo, branch, files, deleted, header.get("summary") or "")
        reply = {"commitUrl": f"{self._repo_url(repo.repo_id)}/commit/{commit.sha}", "commitOid": commit.sha,
                 "success": True}
        if pr_url:
            reply["pullRequestUrl"] = pr_url
        self._json(200, reply)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        if not self._authorised(write=False, head=head):
            return
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
            commit = repo.resolve(rev) if repo else None
        if repo is None:
            return self._send(404, b"Repository not found", content_type="text/plain", head=head)
        if commit is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
        data = commit.files.get(path)
        if data is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{_git_blob_sha(data)}"'}
        self._send(200, data, headers, content_type="application/octet-stream", head=head)


@pytest.fixture
def hub_server():
    """A running loopback Hub; yields the :class:`HubServer` (its endpoint is ``.url``)."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_url(hub_server):
    """The endpoint URL of the running loopback Hub (for ``HF_ENDPOINT``)."""
    return hub_server.url


def client_env(hub_url: str, home, **extra: str) -> dict[str, str]:
    """The environment of a client subprocess that talks to the loopback Hub at ``hub_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env
