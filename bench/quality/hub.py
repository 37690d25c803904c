"""Whether the Hugging Face hub can be reached, asked once and quickly, so that a command that would download
evaluation data fails in seconds with what to pass instead, not with a ConnectionError after a minute of retries."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 5.0
NO_HUB_HINT = (
    "pass --data-dir DATA_DIR, a folder of the tasks' files in the layout of docs/evaluation.md; make one with "
    "`python -m bench.quality.fetch_data DATA_DIR --tasks ...` on a machine that reaches the hub, and copy it here"
)


class HubUnreachable(RuntimeError):
    """The hub is needed and cannot be reached (the environment, exit 3); the message says what to pass instead."""


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` (a mirror) if set, as huggingface_hub reads it."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set: datasets come from the local cache, the hub is not asked."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers (any HTTP status will do), else why not: one HEAD request, proxies honoured."""
    request = urllib.request.Request(endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(reason).__name__


def require_hub(what: str, hint: str = NO_HUB_HINT) -> None:
    """Return when ``what`` may download from the hub (it answers, or offline mode reads the cache); else
    ``HubUnreachable`` naming the endpoint, the reason and what to do instead (``hint``)."""
    if offline_mode():
        return
    reason = unreachable_reason()
    if reason is not None:
        raise HubUnreachable(f"{what} needs the Hugging Face hub, and {endpoint()} cannot be reached ({reason}): {hint}")
