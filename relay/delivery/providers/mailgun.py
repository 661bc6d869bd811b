"""The Mailgun provider: POST /v3/{domain}/messages.mime, the MIME untouched, as a file part.

Mailgun's `to` field is the envelope: Mailgun delivers to exactly those addresses, whatever
the headers say (one `to` field per recipient, so no address is split at a comma). The
envelope mail_from is not honoured: Mailgun uses its own return path and reports bounces
through its events. Open and click tracking are switched off per message (`o:tracking`,
which overrides the domain setting): a relay delivers the bytes it was given, and rewritten
links in health mail would tell a third party who read what.

Mailgun can answer 5xx, or time out, and still send. Every attempt carries the queue id as
the user variable `v:relay-message-id`, which Mailgun reports with every event of that
message, so a duplicate can be recognised there. The retry itself stays at-least-once.

Response codes (Mailgun "API Response Codes", documentation.mailgun.com): 400 is a verdict
on the request (here: on the message for these recipients); 401 and 403 a bad or
unauthorised key; 429 a rate limit to be retried as the answer says; 500 Mailgun's trouble,
retried with backoff. 404 "can be temporal" (eventual consistency) when it comes with a JSON
body, and is a wrong domain, region or URL when it comes without one: both fail over and
never bounce; the first may heal (transient), the second needs an operator.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from relay.config import MailgunProviderSettings
from relay.delivery.providers import _http
from relay.delivery.providers.base import Envelope, Outcome, ProviderError, RecipientResult

log = logging.getLogger("relay.delivery.mailgun")

# Epoch values in X-RateLimit-Reset: above these they are timestamps, not delays.
_EPOCH_MS = 1e12
_EPOCH_S = 1e9
# The upload of a large message may take longer than `timeout`: a second more per MiB.
_UPLOAD_FLOOR_BYTES_PER_S = 1024 * 1024
# Mailgun answers with a small JSON document; more than this is not read.
_ANSWER_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Answer:
    """A response, read whole before the connection goes back to the pool."""

    status_code: int
    headers: Mapping[str, str]
    body: dict[str, Any] | None  # the JSON object, when it is one


class MailgunProvider:
    def __init__(
        self,
        name: str,
        settings: MailgunProviderSettings,
        *,
        wall_clock: Callable[[], float] = _http.wall_clock,
    ) -> None:
        self.name = name
        self.settings = settings
        self.api_root = settings.api_root()
        self._wall_clock = wall_clock
        self._session: aiohttp.ClientSession | None = None
        self._send_url = f"{self.api_root}/v3/{settings.domain}/messages.mime"
        self._domain_url = f"{self.api_root}/v4/domains/{settings.domain}"

    def __repr__(self) -> str:
        return f"MailgunProvider(name={self.name!r}, domain={self.settings.domain!r})"

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        fields = [
            *(("to", address) for address in envelope.rcpt_tos),
            ("v:relay-message-id", envelope.message_id),
            ("o:tracking", "no"),
        ]
        # The MIME as a file part, as the API asks, its bytes untouched.
        content_type, form = _http.multipart(
            fields, ("message", "message.eml", "message/rfc822", content)
        )
        response = await self._request("POST", self._send_url, body=form, content_type=content_type)
        status = response.status_code
        body = response.body
        said = _http.clip((body or {}).get("message", ""))
        if status == 200:
            # Mailgun queued it: whatever the body says, sending again would duplicate.
            message_id = str((body or {}).get("id") or "")[:255] or None
            detail = f"queued by Mailgun: {message_id} {said}".rstrip()
            return _every(envelope, Outcome.DELIVERED, detail, message_id)
        if status in (400, 413):
            detail = f"Mailgun refused the message: {status} {said}".rstrip()
            return _every(envelope, Outcome.PERMANENT, detail)
        raise self._failure(response, body, said)

    def _failure(self, response: _Answer, body: dict[str, Any] | None, said: str) -> ProviderError:
        status = response.status_code
        detail = f"{self.name}: Mailgun {status} {said}".rstrip()
        if status in (401, 403):
            return ProviderError(
                f"{detail} (API key rejected or not allowed)", transient=False, kind="credentials"
            )
        if status == 404:
            return ProviderError(
                f"{detail} (check domain and region)", transient=body is not None, kind="config"
            )
        if status == 429:
            return ProviderError(detail, kind="rate_limited", retry_after=self._wait(response))
        return ProviderError(
            detail, retry_after=_http.retry_after(response.headers, now=self._wall_clock())
        )

    def _wait(self, response: _Answer) -> float | None:
        now = self._wall_clock()
        wait = _http.retry_after(response.headers, now=now)
        if wait is not None:
            return wait
        reset = _number(response.headers.get("x-ratelimit-reset"))
        if reset is not None:
            if reset > _EPOCH_MS:
                return max(0.0, reset / 1000 - now)
            if reset > _EPOCH_S:
                return max(0.0, reset - now)
            return reset
        return _number((response.body or {}).get("retry-seconds"))

    async def check(self) -> None:
        response = await self._request("GET", self._domain_url)
        body = response.body
        if response.status_code != 200:
            raise self._failure(response, body, _http.clip((body or {}).get("message", "")))
        domain = (body or {}).get("domain")
        state = domain.get("state") if isinstance(domain, dict) else None
        if state is not None and state != "active":
            raise ProviderError(
                f"{self.name}: Mailgun domain {self.settings.domain} is {_http.clip(state)}",
                transient=False,
                kind="config",
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = _http.new_session(self.settings.max_connections, self.api_root)
        return self._session

    async def _request(
        self, method: str, url: str, *, body: bytes = b"", content_type: str | None = None
    ) -> _Answer:
        try:
            key = self.settings.resolved_api_key()
        except OSError as exc:
            raise ProviderError(
                f"{self.name}: cannot read api_key_file: {exc.strerror} ({exc.filename})",
                transient=False,
                kind="credentials",
            ) from None
        headers = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
        if content_type is not None:
            headers["Content-Type"] = content_type
        # Each phase (connect, waiting for the answer) within `timeout`, the whole request
        # within `timeout` plus a second per MiB uploaded (runbook: provider_timeout).
        seconds = self.settings.timeout.total_seconds()
        timeout = aiohttp.ClientTimeout(
            total=seconds + len(body) / _UPLOAD_FLOOR_BYTES_PER_S,
            connect=seconds,
            sock_read=seconds,
        )
        try:
            async with self._http().request(
                method,
                url,
                data=body if method == "POST" else None,
                headers=headers,
                timeout=timeout,
                # A redirect would carry the Authorization header wherever it points.
                allow_redirects=False,
            ) as response:
                data = await _read_capped(response)
                return _Answer(response.status, response.headers, _http.json_object_of(data))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderError(f"{self.name}: Mailgun: {_http.brief(exc)}") from exc


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= _ANSWER_MAX_BYTES:
            break  # not JSON from Mailgun; the connection is closed rather than reused
    return b"".join(chunks)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _every(
    envelope: Envelope, outcome: Outcome, detail: str, message_id: str | None = None
) -> list[RecipientResult]:
    return [RecipientResult(a, outcome, detail, message_id) for a in envelope.rcpt_tos]
