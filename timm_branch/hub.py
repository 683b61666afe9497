"""Push merged models and exported task folders to the Hugging Face Hub.

What is pushed: ``model.safetensors`` (never a pickle), timm's ``config.json`` (with the
``timm_branch`` history key) and a ``README.md`` model card regenerated on every push (timm's own
``push_to_hf_hub`` keeps an existing README; a continual lineage needs the card to follow the
weights), plus ``accuracy_curves.png`` when the run folder has one. Plain timm loads the result::

    model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)

Tokens: the ``token`` argument, else huggingface_hub's usual places (``HF_TOKEN``, the login cache
written by ``hf auth login``). A token is only handed to the ``huggingface_hub`` client: it is never
logged, never written into a card or config file, and scrubbed from error messages.

Errors are :class:`HubPushError` (a ``RuntimeError``) naming the step that failed (creating the
repository, uploading, committing), the HTTP status, and what to do. Local files are only read.
Retries: creating the repository (idempotent with ``exist_ok``) is retried on connection errors,
timeouts and 502/503/504; the client itself retries the pre-upload request on transient errors.
The commit is never retried here: a retry after a lost reply could commit twice. Every request
waits at most ``timeout`` seconds (:data:`HUB_TIMEOUT`) for the Hub to answer; huggingface_hub's own
client would wait forever on a Hub that accepts the connection and never replies.

The Hub endpoint is ``HF_ENDPOINT`` (read by huggingface_hub when it is imported) unless
``endpoint=`` is given.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from torch import nn

from .card import PLOT_FILE, parse_front_matter, render_folder_card, render_model_card

log = logging.getLogger(__name__)

__all__ = ["HubPushError", "push_to_hub", "push_task_folder", "resolve_token"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
_RETRY_STATUS = (502, 503, 504)
_RETRY_WAITS = (0.5, 1.0)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
HUB_TIMEOUT = 60.0
"""Seconds a push waits for the Hub to answer one request (connect, send, or reply) before it fails."""

T = TypeVar("T")


class HubPushError(RuntimeError):
    """A push failed. ``status``: the HTTP status (None for a connection problem); ``step``: what failed."""

    def __init__(self, message: str, *, repo_id: str, step: str, status: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.step = step
        self.status = status


def resolve_token(token: str | None = None) -> str:
    """``token``, else ``HF_TOKEN`` / the login cache (via ``huggingface_hub.get_token``)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubPushError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (the token needs write access; "
            "from Python, token=... also works)", repo_id="", step="finding a token")
    return found


def _endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _transport_error(name: str) -> tuple[type[BaseException], ...]:
    """The client's transport exception class ``name`` (none with an older huggingface_hub)."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ()
    return (getattr(httpx2, name),)


def _never_connected(err: BaseException) -> bool:
    """Whether the request failed before reaching the Hub (so nothing can have been committed)."""
    return isinstance(err, (ConnectionRefusedError, *_transport_error("ConnectError"), *_transport_error("ConnectTimeout")))


def _is_connection_error(err: BaseException) -> bool:
    try:
        import httpx2

        if isinstance(err, httpx2.TransportError):
            return True
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") or isinstance(
        err, (ConnectionError, TimeoutError))


def _explain(err: BaseException, *, repo_id: str, step: str, endpoint: str, token: str, committing: bool,
             timeout: float) -> HubPushError:
    status = _status(err)
    where = f"the Hub at {endpoint}"
    if status is None and _is_connection_error(err):
        detail = f"({type(err).__name__}: {_scrub(str(err), token)})"
        if _never_connected(err):
            return HubPushError(
                f"cannot reach {where} while {step} {detail}. "
                "Check the network connection and HF_ENDPOINT, then push again; nothing was published.",
                repo_id=repo_id, step=step)
        outcome = ("the commit may or may not have been made: check the repository before pushing again"
                   if committing else "nothing was published; push again later")
        what = (f"did not answer within {timeout:g} s" if isinstance(err, (TimeoutError, *_transport_error("TimeoutException")))
                else "dropped the connection")
        return HubPushError(f"{where} {what} while {step} {detail}; {outcome}.", repo_id=repo_id, step=step)
    if status is None:
        return HubPushError(f"pushing to {repo_id} failed while {step}: {type(err).__name__}: {_scrub(str(err), token)}",
                            repo_id=repo_id, step=step)
    detail = _scrub(str(err).splitlines()[0] if str(err) else "", token)
    if status == 401:
        advice = ("the token was rejected (HTTP 401): it is invalid or expired. Log in again with "
                  "`hf auth login` or set HF_TOKEN to a token with write access")
    elif status == 403:
        advice = (f"the token may not write to {repo_id} (HTTP 403): use a token with write access to the "
                  f"'{repo_id.split('/')[0]}' namespace, or push to a namespace you own")
    elif status == 404:
        advice = f"{repo_id} or the revision was not found (HTTP 404): check the repository id and revision"
    elif status >= 500:
        outcome = ("the commit was most likely not made (check the repository before pushing again)"
                   if committing else "nothing was published")
        advice = f"{where} failed with HTTP {status}, a server-side error; {outcome}. Try again later"
    else:
        advice = f"{where} refused the request with HTTP {status}"
    return HubPushError(f"pushing to {repo_id} failed while {step}: {advice}. [{detail}]",
                        repo_id=repo_id, step=step, status=status)


def _call(step: str, fn: Callable[[], T], *, repo_id: str, endpoint: str, token: str, timeout: float,
          retry: bool = False, committing: bool = False) -> T:
    attempts = len(_RETRY_WAITS) + 1 if retry else 1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - every failure becomes a HubPushError
            transient = _status(err) in _RETRY_STATUS or (_status(err) is None and _is_connection_error(err))
            if transient and attempt + 1 < attempts:
                log.warning("%s failed (%s); retrying", step, _status(err) or type(err).__name__)
                time.sleep(_RETRY_WAITS[attempt])
                continue
            raise _explain(err, repo_id=repo_id, step=step, endpoint=endpoint, token=token,
                           committing=committing, timeout=timeout) from None
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _request_timeout(seconds: float) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a ``seconds`` timeout for the block, then restore its own."""
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def _upload(
    files: dict[str, Path | bytes],
    repo_id: str,
    *,
    token: str | None,
    private: bool,
    revision: str | None,
    commit_message: str,
    create_pr: bool,
    endpoint: str | None,
    timeout: float,
) -> str:
    """Create the repo if needed and commit ``files`` (path in repo -> local file or bytes) in one commit."""
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    for name, content in files.items():
        if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            raise ValueError(f"refusing to upload {name}: only safetensors weights are pushed")
        if isinstance(content, Path) and not content.is_file():
            raise FileNotFoundError(f"{content} is missing")
    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, HfApi

    url = _endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    common = dict(repo_id=repo_id, endpoint=url, token=token, timeout=timeout)
    log.info("pushing %s to %s at %s", ", ".join(sorted(files)), repo_id, url)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
                  for name, content in files.items()]
    with _request_timeout(timeout):
        _call("creating the repository", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
              retry=True, **common)
        if revision and revision != "main" and not create_pr:
            _call(f"creating the branch {revision!r}",
                  lambda: api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True), retry=True, **common)
        info = _call("uploading and committing the files",
                     lambda: api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                               revision=revision, create_pr=create_pr, repo_type="model"),
                     committing=True, **common)
    log.info("pushed %s: %s", repo_id, info.commit_url)
    if create_pr and getattr(info, "pr_url", None):
        log.info("pull request: %s", info.pr_url)
    return info.commit_url


def _check_card(card: str) -> None:
    try:
        parse_front_matter(card)
    except ValueError as err:
        log.warning("the model card has no valid YAML front matter (%s); the Hub will show no metadata", err)


def _run_plot(run_dir: str | os.PathLike | None) -> Path | None:
    """The run's accuracy plot, if the run folder has one."""
    plot = Path(run_dir) / PLOT_FILE if run_dir is not None else None
    return plot if plot is not None and plot.is_file() else None


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    model_card: str | None = None,
    create_pr: bool = False,
    *,
    run_dir: str | os.PathLike | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    model_args: dict | None = None,
    endpoint: str | None = None,
    timeout: float = HUB_TIMEOUT,
) -> str:
    """Push a merged timm model to the Hub repository ``repo_id``; returns the commit URL.

    Args:
        model: a merged timm model (no branches left: call ``merge_branches`` first).
        repo_id: ``"org/name"``; created (public unless ``private``) if missing.
        token: a Hub token with write access; default ``HF_TOKEN`` or the login cache.
        private: create the repository as private (an existing repository keeps its visibility).
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: default ``"Upload <arch> (timm-branch, N merged tasks)"``.
        model_card: the ``README.md`` text; default a card regenerated from the model's branch
            history (and ``run_dir``'s metrics when given), replacing any card in the repository.
        create_pr: open a pull request instead of committing to the branch.
        run_dir: a run folder whose ``config.yaml``/``metrics.json``/``accuracy_curves.png`` enrich the card.
        license, datasets: card metadata (see :mod:`timm_branch.card` for the licence rule).
        model_args: extra ``timm.create_model`` keyword arguments to record in ``config.json``.
        endpoint: a Hub endpoint other than ``HF_ENDPOINT``.
        timeout: seconds to wait for the Hub to answer one request (:data:`HUB_TIMEOUT`).

    Raises:
        ValueError: the model still has branches, or ``repo_id`` is malformed.
        HubPushError: no token, or the Hub could not be reached, did not answer in time, or refused the push.
    """
    from .branch import iter_branches
    from .export import save_pretrained
    from .history import branch_history

    if next(iter_branches(model), None) is not None:
        raise ValueError(
            "refusing to push a model that still has branches: call timm_branch.merge_branches(model) first, "
            "so that the pushed weights are a stock timm model")
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    plot = _run_plot(run_dir)
    if model_card is None:
        model_card = render_model_card(model, run_dir=run_dir, license=license, datasets=datasets, repo_id=repo_id,
                                       plot_name=PLOT_FILE if plot else None)
    _check_card(model_card)
    history = branch_history(model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    message = commit_message or f"Upload {arch} (timm-branch, {len(history)} merged task{'s' * (len(history) != 1)})"
    with tempfile.TemporaryDirectory(prefix="timm-branch-push-") as tmp:
        folder = save_pretrained(model, tmp, model_card=model_card, model_args=model_args)
        files: dict[str, Path | bytes] = {name: folder / name for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)}
        if plot:
            files[PLOT_FILE] = plot
        return _upload(files, repo_id, token=token, private=private, revision=revision, commit_message=message,
                       create_pr=create_pr, endpoint=endpoint, timeout=timeout)


def push_task_folder(
    task_dir: str | os.PathLike,
    repo_id: str,
    run_dir: str | os.PathLike | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    model_card: str | None = None,
    create_pr: bool = False,
    *,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    endpoint: str | None = None,
    timeout: float = HUB_TIMEOUT,
) -> str:
    """Push an exported folder (``RUN/task-K`` or any :func:`~timm_branch.save_pretrained` output).

    Uploads ``model.safetensors``, ``config.json`` and a regenerated ``README.md`` (plus the run's
    ``accuracy_curves.png`` when present), not ``trainer_state.safetensors`` or ``task.json``.
    ``run_dir`` defaults to the folder's parent when the folder is ``task-K`` inside a run folder;
    the card then reads its ``config.yaml`` and ``metrics.json`` (tasks ``0..K``). The folder is only
    read, and checked before any request (:func:`~timm_branch.export.verify_export`: digests,
    architecture, finite values). Returns the commit URL; raises like :func:`push_to_hub`, and
    ``FileNotFoundError`` / ``ValueError`` (:class:`~timm_branch._io.CorruptFileError`) for a damaged folder.
    """
    from .export import verify_export

    folder = Path(task_dir)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder: it needs {WEIGHTS_NAME} and {CONFIG_NAME}")
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    verify_export(folder)  # a damaged model is never published
    if run_dir is None and folder.name.startswith("task-") and any(
            (folder.parent / name).is_file() for name in ("config.yaml", "metrics.json")):
        run_dir = folder.parent
    plot = _run_plot(run_dir)
    if model_card is None:
        model_card = render_folder_card(folder, run_dir, license=license, datasets=datasets, repo_id=repo_id,
                                        plot_name=PLOT_FILE if plot else None)
    _check_card(model_card)
    files: dict[str, Path | bytes] = {WEIGHTS_NAME: folder / WEIGHTS_NAME, CONFIG_NAME: folder / CONFIG_NAME,
                                      CARD_NAME: model_card.encode("utf-8")}
    if plot:
        files[PLOT_FILE] = plot
    message = commit_message or f"Upload {folder.name} (timm-branch)"
    return _upload(files, repo_id, token=token, private=private, revision=revision, commit_message=message,
                   create_pr=create_pr, endpoint=endpoint, timeout=timeout)
