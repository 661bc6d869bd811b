"""What the HTTP API providers (Gmail, Mailgun) share: the client, retry hints, error bodies.

Nothing here sees a credential: auth is passed per request by the provider that owns it.
"""

from __future__ import annotations

import email.utils
import time
from datetime import timedelta
from typing import Any

import httpx

# Provider texts end up in attempt records; keep them to a readable line.
_DETAIL_CHARS = 200


def new_client(timeout: timedelta, max_connections: int) -> httpx.AsyncClient:
    seconds = timeout.total_seconds()
    return httpx.AsyncClient(
        # Every phase bounded, the 30 MB upload's writes included (runbook: provider_timeout).
        timeout=httpx.Timeout(connect=seconds, read=seconds, write=seconds, pool=seconds),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        # A redirect would carry the Authorization header to wherever it points: never follow.
        follow_redirects=False,
    )


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def retry_after(headers: httpx.Headers, *, now: float) -> float | None:
    """Seconds from `now` (wall clock) that a Retry-After header asks for (RFC 9110 10.2.3)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def clip(text: object) -> str:
    return " ".join(str(text).split())[:_DETAIL_CHARS]


def brief(exc: BaseException) -> str:
    text = clip(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def wall_clock() -> float:
    return time.time()
