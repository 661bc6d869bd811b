"""What the HTTP API providers (Gmail, Mailgun) share: the clients, retry hints, error bodies.

Nothing here sees a credential: auth is passed per request by the provider that owns it.
"""

from __future__ import annotations

import email.utils
import json
import secrets
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import aiohttp
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


def new_session(max_connections: int, api_root: str) -> aiohttp.ClientSession:
    """A keep-alive pool for one API host, lighter per request than httpx (Mailgun).

    Measured against the drain benchmark's sink: about 0.2 ms of CPU per request where
    httpx took 1.5-2.8 ms (docs/benchmarks.md). Timeouts are set per request.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
        proxy=environment_proxy(api_root),
        # An API client has no use for cookies, and a jar would keep what one answer set.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def environment_proxy(url: str) -> str | None:
    """The proxy that HTTPS_PROXY/HTTP_PROXY and NO_PROXY name for `url`, read once.

    As httpx did, the environment's proxy is honoured; aiohttp's own trust_env would read
    it again, and ~/.netrc, in a thread for every request (half the drain's CPU time).
    """
    split = urllib.parse.urlsplit(url)
    if not split.hostname or urllib.request.proxy_bypass(split.hostname):
        return None
    return urllib.request.getproxies().get(split.scheme)


def multipart(
    fields: Sequence[tuple[str, str]], file: tuple[str, str, str, bytes]
) -> tuple[str, bytes]:
    """multipart/form-data (RFC 7578): the Content-Type and the body, as one buffer.

    One buffer, so that the request goes out in one write: a write per part (as httpx's
    encoder does) made socket writes the largest cost of delivering through an HTTP API.
    The price is a transient copy of the message while it is sent.
    """
    name, filename, content_type, data = file
    values = [value.encode() for _, value in fields]
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in value for value in (data, *values)):
        boundary = secrets.token_hex(16)  # about 2**-128 per try: never in practice
    delimiter = f"--{boundary}\r\n".encode()
    parts = [
        delimiter + _disposition(field) + b"\r\n" + value + b"\r\n"
        for (field, _), value in zip(fields, values, strict=True)
    ]
    head = _disposition(name, filename) + f"Content-Type: {content_type}\r\n".encode()
    parts.append(delimiter + head + b"\r\n" + data + f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _disposition(name: str, filename: str | None = None) -> bytes:
    # RFC 7578 section 4.2 leaves quoting to the HTML rule: " CR LF percent-encoded.
    def quoted(text: str) -> str:
        return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")

    line = f'Content-Disposition: form-data; name="{quoted(name)}"'
    if filename is not None:
        line += f'; filename="{quoted(filename)}"'
    return (line + "\r\n").encode()


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def json_object_of(data: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(data)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
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
