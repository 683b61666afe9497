"""Fetching timm weights without the Hub: one clear line at once, not a minute of retries.

huggingface_hub retries a request that cannot connect five times with growing waits, and timm
asks for two files in turn (``model.safetensors``, then ``pytorch_model.bin``), so a machine
without a network waits about a minute before a ``LocalEntryNotFoundError``. :func:`check_hub_reachable`
asks the Hub once, before anything is fetched; :func:`explain_missing_weights` turns the error of
offline mode (``HF_HUB_OFFLINE=1``) and an empty cache into one line that says what to do.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

_PROBE_TIMEOUT = 10.0
"""Seconds the reachability check waits for the Hub to answer."""
_FIX = ("run once with a network to fill the Hugging Face cache (then HF_HUB_OFFLINE=1 uses it), or start from "
        "weights on disk with --pretrained local-dir:PATH")


def check_hub_reachable(name: str) -> None:
    """Before weights named ``name`` (a timm name or ``hf-hub:org/name``, not a ``local-dir:``
    folder) are fetched: nothing to do in offline mode (the cache answers); otherwise one request
    to the Hub's endpoint, and a connection failure raises at once.

    Raises:
        ConnectionError: the Hub cannot be reached (names the endpoint and the fix).
    """
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.utils import get_session

    from .hub import _is_connection_error

    if is_offline_mode():
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - re-raised unless a transport failure
        if not _is_connection_error(err):
            raise
        raise ConnectionError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch the weights of "
                              f"{name} ({type(err).__name__}); set HF_HUB_OFFLINE=1 if they are in the cache, "
                              f"or {_FIX}") from None


@contextlib.contextmanager
def explain_missing_weights(name: str) -> Iterator[None]:
    """Within: huggingface_hub's error for files that are neither in the cache nor fetchable
    (offline mode, or no network) becomes one ``FileNotFoundError`` line naming ``name`` and the fix."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        from huggingface_hub import is_offline_mode

        why = "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache" if is_offline_mode() else (
            "the Hub could not be reached and they are not in the Hugging Face cache")
        raise FileNotFoundError(f"cannot load the weights of {name}: {why}; {_FIX}") from err
