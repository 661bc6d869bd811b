"""The Gmail API provider: users.messages.send by media upload, as one Workspace mailbox.

The message goes up as it is, `message/rfc822` to the /upload endpoint: the JSON `raw` form
base64-encodes it into a request body that Google refuses (413) at a few MB, while media
upload takes up to the documented 35 MB.

Gmail has no SMTP envelope. It sends to the addresses in the message's To, Cc and Bcc
headers and to no one else, and it sends from the authenticated mailbox (envelope
mail_from is not honoured). So this provider only sends when the envelope recipients are
exactly the header recipients; otherwise (a Bcc given only in the envelope, a retry for
the one recipient still pending, ...) sending would reach the wrong set of people, and it
answers TRANSIENT without sending so that routing hands the message to a provider that
honours envelopes (Mailgun, SMTP).

Gmail has no idempotency key: an answer lost after the upload (timeout, 5xx) may hide a
sent message, and the retry then sends it twice. At-least-once, never lost.

Errors as the Gmail API guide "Resolve errors" classifies them
(developers.google.com/workspace/gmail/api/guides/handle-errors): 400 is a verdict on the
message; 401 is an expired or revoked token (refresh once, retry once); 403 carries a
reason: rate limits (userRateLimitExceeded, rateLimitExceeded) and the daily limit are
waits, domainPolicy means the domain's administrators forbid the app; 429 is a rate
limit; 5xx is Google's trouble. A 400 `failedPrecondition` ("Mail service not enabled")
is the mailbox's state, not the message's: it fails over, it does not bounce.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import jwt

from relay.config import GmailProviderSettings
from relay.delivery.providers import _http
from relay.delivery.providers.base import Envelope, Outcome, ProviderError, RecipientResult
from relay.logs import event

log = logging.getLogger("relay.delivery.gmail")

GMAIL_SEND_SCOPE = "https://www.googleapis.com/auth/gmail.send"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# messages.send reference: "Maximum file size: 35MB" for the media upload.
MAX_MESSAGE_BYTES = 35 * 1024 * 1024

# Refresh a token 5 minutes before Google says it expires, or halfway for short-lived ones.
_REFRESH_MARGIN_S = 300.0
# Google takes assertions valid for at most one hour.
_ASSERTION_LIFETIME_S = 3600
_RATE_REASONS = {"userRateLimitExceeded", "rateLimitExceeded"}
# Gmail spells its wait into the message: "User-rate limit exceeded.  Retry after <ISO time>".
_RETRY_AFTER_TEXT = re.compile(r"Retry after (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)")


def _quota_zone() -> timezone | ZoneInfo:
    try:
        return ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:
        # No tz database in the image: Pacific standard time is off by an hour at most.
        return timezone(timedelta(hours=-8))


# Google's daily quotas end at midnight Pacific time.
_QUOTA_ZONE = _quota_zone()


@dataclass(frozen=True)
class _AccessToken:
    value: str = field(repr=False)
    refresh_at: float  # on the provider's monotonic clock


@dataclass(frozen=True)
class _ServiceAccount:
    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str | None


class GmailProvider:
    def __init__(
        self,
        name: str,
        settings: GmailProviderSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = _http.wall_clock,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._token: _AccessToken | None = None
        self._token_lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        user = quote(settings.user, safe="@")
        self._send_url = f"{settings.api_base}/upload/gmail/v1/users/{user}/messages/send"
        self._profile_url = f"{settings.api_base}/gmail/v1/users/{user}/profile"

    def __repr__(self) -> str:
        return f"GmailProvider(name={self.name!r}, user={self.settings.user!r})"

    # Sending

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        # Checked first: when Gmail cannot send to these recipients, its size limit is moot.
        if not _envelope_is_headers(envelope.rcpt_tos, content):
            return _every(
                envelope,
                Outcome.TRANSIENT,
                "not sent: the Gmail API sends to the To/Cc/Bcc headers, which name other "
                "recipients than this envelope; a provider that honours envelopes must send it",
            )
        if len(content) > MAX_MESSAGE_BYTES:
            return _every(
                envelope,
                Outcome.PERMANENT,
                f"message is {len(content)} bytes; the Gmail API takes at most 35 MiB "
                f"({MAX_MESSAGE_BYTES} bytes)",
            )

        response = await self._call(
            "POST",
            self._send_url,
            params={"uploadType": "media"},
            headers={"Content-Type": "message/rfc822"},
            content=content,
        )
        if response.status_code == 200:
            return self._sent(envelope, response)
        reason, message = _google_error(response)
        if response.status_code in (400, 413) and reason != "failedPrecondition":
            detail = f"Gmail API refused the message: {response.status_code} {message}"
            return _every(envelope, Outcome.PERMANENT, detail.rstrip())
        raise self._failure(response, reason, message)

    def _sent(self, envelope: Envelope, response: httpx.Response) -> list[RecipientResult]:
        # 200 means Gmail took the message: whatever the body, sending again would duplicate.
        body = _http.json_object(response) or {}
        message_id = str(body["id"])[:255] if body.get("id") else None
        detail = f"accepted by the Gmail API: id {message_id}, thread {body.get('threadId')}"
        return _every(envelope, Outcome.DELIVERED, detail, message_id)

    def _failure(self, response: httpx.Response, reason: str, message: str) -> ProviderError:
        status = response.status_code
        said = f"{self.name}: Gmail API {status} {reason} {message}".rstrip()
        now = self._wall_clock()
        if reason == "failedPrecondition":
            return ProviderError(said, transient=False, kind="policy")
        if status == 429 or (status == 403 and reason in _RATE_REASONS):
            wait = _http.retry_after(response.headers, now=now) or _wait_in_text(message, now)
            return ProviderError(said, kind="rate_limited", retry_after=wait)
        if status == 403 and reason.startswith("dailyLimitExceeded"):
            wait = _http.retry_after(response.headers, now=now) or _until_quota_reset(now)
            return ProviderError(said, kind="quota", retry_after=wait)
        if status == 403 and reason == "domainPolicy":
            # The Workspace administrators disabled the app: no retry fixes that, and no
            # recipient is to blame. The message fails over; it is not bounced.
            return ProviderError(said, transient=False, kind="policy")
        if status == 403:
            return ProviderError(said, transient=False, kind="credentials")
        if status == 404:
            return ProviderError(said, transient=False, kind="config")
        return ProviderError(said, retry_after=_http.retry_after(response.headers, now=now))

    # Checking

    async def check(self) -> None:
        async with self._token_lock:
            self._token = None
        response = await self._call("GET", self._profile_url)
        if response.status_code != 200:
            reason, message = _google_error(response)
            raise self._failure(response, reason, message)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # HTTP with a bearer token

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = _http.new_client(self.settings.timeout, self.settings.max_connections)
        return self._client

    async def _call(self, method: str, url: str, **request: Any) -> httpx.Response:
        token = await self._access_token()
        response = await self._request(method, url, token, request)
        if response.status_code != 401:
            return response
        # Revoked or expired before its time: one fresh token, one more try, no loop.
        token = await self._access_token(stale=token)
        response = await self._request(method, url, token, request)
        if response.status_code == 401:
            raise ProviderError(
                f"{self.name}: Gmail API refused a freshly issued token (401); "
                "check the granted scopes and the delegation",
                transient=False,
                kind="credentials",
            )
        return response

    async def _request(
        self, method: str, url: str, token: _AccessToken, request: dict[str, Any]
    ) -> httpx.Response:
        headers = {**request.get("headers", {}), "Authorization": f"Bearer {token.value}"}
        try:
            return await self._http().request(method, url, **{**request, "headers": headers})
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.name}: Gmail API: {_http.brief(exc)}") from exc

    # Tokens

    async def _access_token(self, *, stale: _AccessToken | None = None) -> _AccessToken:
        async with self._token_lock:
            token = self._token
            fresh = token is not None and token is not stale and self._clock() < token.refresh_at
            if token is None or not fresh:
                token = self._token = await self._fetch_token()
            return token

    async def _fetch_token(self) -> _AccessToken:
        s = self.settings
        form = self._grant()
        try:
            response = await self._http().post(
                s.token_uri, data=form, headers={"Accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.name}: token endpoint: {_http.brief(exc)}") from exc
        body = _http.json_object(response) or {}
        if response.status_code != 200 or not body.get("access_token"):
            raise self._token_failure(response, body)
        lifetime = _seconds(body.get("expires_in"), default=3600.0)
        now = self._clock()
        refresh_at = now + max(lifetime - _REFRESH_MARGIN_S, lifetime / 2)
        event(log, "provider.token_issued", provider=self.name, expires_in=lifetime)
        return _AccessToken(str(body["access_token"]), refresh_at)

    def _grant(self) -> dict[str, str]:
        s = self.settings
        try:
            if s.credentials == "refresh_token":
                return {
                    "grant_type": "refresh_token",
                    "client_id": s.client_id or "",
                    "client_secret": s.resolved_client_secret(),
                    "refresh_token": s.resolved_refresh_token(),
                }
            return {"grant_type": JWT_BEARER_GRANT, "assertion": self._assertion()}
        except OSError as exc:
            raise ProviderError(
                f"{self.name}: cannot read credentials: {exc.strerror} ({exc.filename})",
                transient=False,
                kind="credentials",
            ) from None

    def _assertion(self) -> str:
        """A service-account JWT (RFC 7523) asking to act as `user` with the send scope."""
        account = _service_account(self.name, self.settings.resolved_service_account_key())
        issued = int(self._wall_clock())
        claims = {
            "iss": account.client_email,
            "sub": self.settings.user,
            "scope": GMAIL_SEND_SCOPE,
            "aud": self.settings.token_uri,
            "iat": issued,
            "exp": issued + _ASSERTION_LIFETIME_S,
        }
        headers = {"kid": account.private_key_id} if account.private_key_id else None
        try:
            return jwt.encode(claims, account.private_key, algorithm="RS256", headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            # The reason only: the exception may quote the key material.
            raise ProviderError(
                f"{self.name}: service-account private_key unusable ({exc.__class__.__name__})",
                transient=False,
                kind="credentials",
            ) from None

    def _token_failure(self, response: httpx.Response, body: dict[str, Any]) -> ProviderError:
        status = response.status_code
        error = _http.clip(body.get("error", ""))
        said = _http.clip(f"{error} {body.get('error_description', '')}".strip())
        if status in (400, 401):
            # invalid_grant: refresh token revoked or expired, delegation withdrawn, key
            # deleted. A person has to act; mail meanwhile goes through other providers.
            return ProviderError(
                f"{self.name}: credentials must be renewed: token endpoint {status} {said}",
                transient=False,
                kind="credentials",
            )
        if status == 429:
            wait = _http.retry_after(response.headers, now=self._wall_clock())
            return ProviderError(
                f"{self.name}: token endpoint 429 {said}".rstrip(),
                kind="rate_limited",
                retry_after=wait,
            )
        if status in (403, 404, 405):
            return ProviderError(
                f"{self.name}: token endpoint {status} (check token_uri)",
                transient=False,
                kind="config",
            )
        return ProviderError(f"{self.name}: token endpoint {status} {said}".rstrip())


def _service_account(name: str, key_json: str) -> _ServiceAccount:
    try:
        key = json.loads(key_json)
    except json.JSONDecodeError as exc:
        raise ProviderError(
            f"{name}: service-account key is not JSON ({exc.msg}, line {exc.lineno})",
            transient=False,
            kind="credentials",
        ) from None
    if not isinstance(key, dict) or key.get("type") != "service_account":
        raise ProviderError(
            f"{name}: not a service-account key (type must be service_account)",
            transient=False,
            kind="credentials",
        )
    missing = [k for k in ("client_email", "private_key") if not isinstance(key.get(k), str)]
    if missing:
        raise ProviderError(
            f"{name}: service-account key lacks {', '.join(missing)}",
            transient=False,
            kind="credentials",
        )
    key_id = key.get("private_key_id")
    return _ServiceAccount(
        key["client_email"], key["private_key"], key_id if isinstance(key_id, str) else None
    )


def _envelope_is_headers(rcpt_tos: Sequence[str], content: bytes) -> bool:
    return {a.lower() for a in rcpt_tos} == _header_recipients(content)


def _header_recipients(content: bytes) -> set[str]:
    # Parse the header block only: the body of a 30 MB message is not copied for this.
    ends = [i for i in (content.find(b"\r\n\r\n"), content.find(b"\n\n")) if i >= 0]
    headers = BytesHeaderParser(policy=compat32).parsebytes(content[: min(ends, default=None)])
    values = [
        re.sub(r"\r?\n(?=[ \t])", "", str(value))
        for name in ("to", "cc", "bcc")
        for value in headers.get_all(name, [])
    ]
    return {address.lower() for _, address in getaddresses(values) if address}


def _google_error(response: httpx.Response) -> tuple[str, str]:
    """(reason, message) from Google's error body: {"error": {"errors": [{"reason"...}]}}."""
    error = (_http.json_object(response) or {}).get("error")
    if not isinstance(error, dict):
        return "", ""
    errors = error.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else {}
    reason = first.get("reason", "") if isinstance(first, dict) else ""
    return _http.clip(reason), _http.clip(error.get("message", ""))


def _wait_in_text(message: str, now: float) -> float | None:
    match = _RETRY_AFTER_TEXT.search(message)
    if match is None:
        return None
    when = datetime.fromisoformat(match[1])
    return max(0.0, when.timestamp() - now)


def _until_quota_reset(now: float) -> float:
    local = datetime.fromtimestamp(now, _QUOTA_ZONE)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
    return midnight.replace(tzinfo=_QUOTA_ZONE).astimezone(UTC).timestamp() - now


def _seconds(value: Any, *, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if seconds > 0 else default


def _every(
    envelope: Envelope, outcome: Outcome, detail: str, message_id: str | None = None
) -> list[RecipientResult]:
    return [RecipientResult(a, outcome, detail, message_id) for a in envelope.rcpt_tos]
