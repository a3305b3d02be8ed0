"""Whether a hub id may be looked up on the Hugging Face Hub, decided in seconds.

transformers and datasets retry a hub that does not answer for a minute or more before they give up,
so an offline machine would wait that long to hear that a name is not a local path. Asked first, the
answer lets a load go straight to the local Hugging Face cache (`local_files_only=True`), where an id
that was downloaded before still loads and any other fails at once.
"""

from __future__ import annotations

# Seconds the one probe request may take. A hub that needs longer to answer a HEAD request would make
# every download crawl anyway; the price of a wrong "unreachable" is a clear error, not a wrong result.
PROBE_TIMEOUT = 3.0


def offline_mode() -> bool:
    """`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`, as huggingface_hub reads them (at its import)."""
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())


def reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """One HEAD request to the hub endpoint through huggingface_hub's own HTTP session, so `HF_ENDPOINT`,
    proxies and certificates are those every later download uses; no retries. Any answer, an error
    status included, means the hub is there."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # whatever the HTTP stack raises (DNS, connect, TLS, timeout): no answer
        return False
    return True


def unavailable_reason() -> str | None:
    """Why the hub must not be asked (offline mode, or no answer to the probe), or None when it may be."""
    if offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    if not reachable():
        from huggingface_hub import constants

        return f"{constants.ENDPOINT} did not answer within {PROBE_TIMEOUT:g} s"
    return None
