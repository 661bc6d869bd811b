"""The Gmail API provider against a local server that plays Google's documented contract.

The token endpoint issues and checks tokens (refresh-token and service-account JWT grants,
the JWT's RS256 signature verified with the test's own key pair); users.messages.send takes
a media upload and answers as Gmail does, errors included. Every request is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from relay.config import GmailProviderSettings
from relay.delivery.providers import Envelope, GmailProvider, Outcome, ProviderError
from relay.delivery.providers.gmail import GMAIL_SEND_SCOPE, JWT_BEARER_GRANT, MAX_MESSAGE_BYTES
from tests.local_http import LocalApi, Reply, Request, closed_port_url, only_loopback, start_api

SENDER = "clinic@example.org"
CLIENT_ID = "1234-relay.apps.googleusercontent.com"
# Fresh per run, so that finding one in a log cannot be a coincidence of fixed strings.
CLIENT_SECRET = "GOCSPX-" + secrets.token_urlsafe(18)
REFRESH_TOKEN = "1//0g" + secrets.token_urlsafe(30)
SERVICE_EMAIL = "relay-sender@clinic-project.iam.gserviceaccount.com"
KEY_ID = secrets.token_hex(20)
SEND_PATH = f"/upload/gmail/v1/users/{SENDER}/messages/send"
PROFILE_PATH = f"/gmail/v1/users/{SENDER}/profile"


def google_error(code: int, reason: str, message: str) -> dict[str, Any]:
    """An error body as the Gmail API guide shows it."""
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }


class FakeGoogle:
    """Google's token endpoint and Gmail's send and getProfile methods, on a LocalApi."""

    def __init__(self, api: LocalApi) -> None:
        self.api = api
        self.token_uri = f"{api.url}/token"
        self.lifetime_s = 3600
        self.valid: set[str] = set()
        self.issued: list[str] = []
        self.sent: list[bytes] = []
        self.send_replies: list[Reply] = []
        self.token_replies: list[Reply] = []
        self.public_key: Any = None
        api.route("POST", "/token", self.token)
        api.route("POST", SEND_PATH, self.send)
        api.route("GET", PROFILE_PATH, self.profile)

    def token(self, request: Request) -> Reply:
        if self.token_replies:
            return self.token_replies.pop(0)
        form = request.form()
        if form.get("grant_type") == ["refresh_token"]:
            granted = form == {
                "grant_type": ["refresh_token"],
                "client_id": [CLIENT_ID],
                "client_secret": [CLIENT_SECRET],
                "refresh_token": [REFRESH_TOKEN],
            }
        else:
            granted = set(form) == {"grant_type", "assertion"} and self._assertion_ok(
                form["grant_type"], form["assertion"][0]
            )
        if not granted:
            return Reply(
                400,
                json={
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                },
            )
        token = "ya29." + secrets.token_urlsafe(32)
        self.valid.add(token)
        self.issued.append(token)
        return Reply(
            json={
                "access_token": token,
                "expires_in": self.lifetime_s,
                "scope": GMAIL_SEND_SCOPE,
                "token_type": "Bearer",
            }
        )

    def _assertion_ok(self, grant: list[str], assertion: str) -> bool:
        if grant != [JWT_BEARER_GRANT] or self.public_key is None:
            return False
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=SERVICE_EMAIL,
                options={"require": ["iss", "sub", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError:
            return False
        return (
            claims["sub"] == SENDER
            and claims.get("scope") == GMAIL_SEND_SCOPE
            and claims["exp"] - claims["iat"] == 3600
            and jwt.get_unverified_header(assertion).get("kid") == KEY_ID
        )

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme == "Bearer" and token in self.valid

    def send(self, request: Request) -> Reply:
        if not self._authorized(request):
            return Reply(401, json=google_error(401, "authError", "Invalid Credentials"))
        if request.query != {"uploadType": ["media"]}:
            return Reply(400, json=google_error(400, "badRequest", "uploadType required"))
        if request.headers.get("content-type") != "message/rfc822":
            return Reply(400, json=google_error(400, "badRequest", "Media type not supported"))
        if self.send_replies:
            return self.send_replies.pop(0)
        self.sent.append(request.body)
        number = len(self.sent)
        return Reply(
            json={
                "id": f"18f0c{number:011x}",
                "threadId": f"18f0d{number:011x}",
                "labelIds": ["SENT"],
            }
        )

    def profile(self, request: Request) -> Reply:
        if not self._authorized(request):
            return Reply(401, json=google_error(401, "authError", "Invalid Credentials"))
        return Reply(
            json={
                "emailAddress": SENDER,
                "messagesTotal": 12,
                "threadsTotal": 9,
                "historyId": "4321",
            }
        )

    def revoke_all(self) -> None:
        self.valid.clear()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return only_loopback(monkeypatch)


@pytest.fixture
def api(guard: list[str]) -> Iterator[LocalApi]:
    server = start_api()
    yield server
    server.stop()
    assert server.errors == []
    assert guard == []


@pytest.fixture
def google(api: LocalApi) -> FakeGoogle:
    return FakeGoogle(api)


def settings(google: FakeGoogle, **changes: Any) -> GmailProviderSettings:
    fields: dict[str, Any] = {
        "type": "gmail",
        "user": SENDER,
        "credentials": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "api_base": google.api.url,
        "token_uri": google.token_uri,
        **changes,
    }
    return GmailProviderSettings.model_validate(fields)


MakeProvider = Callable[..., GmailProvider]


@pytest.fixture
async def make_provider(google: FakeGoogle) -> AsyncIterator[MakeProvider]:
    made: list[GmailProvider] = []

    def make(spec: GmailProviderSettings | None = None, **options: Any) -> GmailProvider:
        provider = GmailProvider("gmail", spec or settings(google), **options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


def message(
    to: str = "p1@example.net",
    *,
    cc: str | None = None,
    bcc: str | None = None,
    body: bytes = b"Your results are ready.\r\n",
) -> bytes:
    head = [f"From: Clinic <{SENDER}>", f"To: {to}"]
    head += [f"Cc: {cc}"] if cc else []
    head += [f"Bcc: {bcc}"] if bcc else []
    head += ["Subject: Results", "Message-ID: <r1@example.org>", "MIME-Version: 1.0"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def envelope(*rcpt_tos: str) -> Envelope:
    return Envelope(message_id="Q0123456789AB", mail_from=SENDER, rcpt_tos=rcpt_tos)


# Sending


async def test_message_is_uploaded_as_media_with_a_fresh_bearer_token(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    content = message("Pat <p1@example.net>", cc="p2@example.net")

    results = await make_provider().send(envelope("p1@example.net", "p2@example.net"), content)

    token_request, send_request = api.requests
    assert (token_request.method, token_request.path, token_request.query) == ("POST", "/token", {})
    assert token_request.form() == {
        "grant_type": ["refresh_token"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
        "refresh_token": [REFRESH_TOKEN],
    }
    assert (send_request.method, send_request.path) == ("POST", SEND_PATH)
    assert send_request.query == {"uploadType": ["media"]}
    assert send_request.headers["authorization"] == f"Bearer {google.issued[0]}"
    assert send_request.headers["content-type"] == "message/rfc822"
    assert send_request.headers["content-length"] == str(len(content))
    assert send_request.body == content
    assert [(r.address, r.outcome, r.provider_message_id) for r in results] == [
        ("p1@example.net", Outcome.DELIVERED, "18f0c00000000001"),
        ("p2@example.net", Outcome.DELIVERED, "18f0c00000000001"),
    ]
    assert "18f0d00000000001" in results[0].detail  # the thread id, for the record


async def test_a_30_mb_message_arrives_byte_identical(
    make_provider: MakeProvider, google: FakeGoogle
) -> None:
    # Binary-safe base64 lines, as a large attachment travels, plus bytes the body keeps.
    attachment = base64.encodebytes(secrets.token_bytes(22 * 1024 * 1024)).replace(b"\n", b"\r\n")
    content = message(body=b"--frontier\r\n\x00\xff\r\n.\r\n" + attachment)
    assert len(content) > 30_000_000

    results = await make_provider().send(envelope("p1@example.net"), content)

    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert google.sent == [content]


async def test_a_message_over_35_mib_is_refused_naming_the_limit_without_a_request(
    make_provider: MakeProvider, api: LocalApi
) -> None:
    content = message(body=b"x" * MAX_MESSAGE_BYTES)

    [result] = await make_provider().send(envelope("p1@example.net"), content)

    assert result.outcome is Outcome.PERMANENT
    assert "35 MiB" in result.detail and str(MAX_MESSAGE_BYTES) in result.detail
    assert api.requests == []


@pytest.mark.parametrize(
    ("rcpt_tos", "content"),
    [
        # A retry for the one recipient still pending would reach both.
        (("p2@example.net",), message("p1@example.net", cc="p2@example.net")),
        # Blind copies given only in the envelope, as SMTP clients do.
        (("p1@example.net", "hidden@example.net"), message("p1@example.net")),
        # No recipient headers at all.
        (("p1@example.net",), b"From: clinic@example.org\r\nSubject: x\r\n\r\nbody\r\n"),
    ],
    ids=["partial-retry", "envelope-only-bcc", "no-headers"],
)
async def test_an_envelope_gmail_cannot_honour_is_not_sent_and_fails_over(
    make_provider: MakeProvider, api: LocalApi, rcpt_tos: tuple[str, ...], content: bytes
) -> None:
    results = await make_provider().send(envelope(*rcpt_tos), content)

    assert [(r.address, r.outcome) for r in results] == [(a, Outcome.TRANSIENT) for a in rcpt_tos]
    assert all("honours envelopes" in r.detail for r in results)
    # Nothing reached Google, not even a token request; and no address is in the detail.
    assert api.requests == []
    assert not any("@" in r.detail for r in results)


async def test_an_envelope_equal_to_the_headers_ignoring_case_and_folding_is_sent(
    make_provider: MakeProvider, google: FakeGoogle
) -> None:
    content = message(
        '"Doe, Pat" <P1@Example.NET>',
        cc="Lab <lab@example.net>,\r\n\tward@example.net",
        bcc="audit@example.net",
    )
    rcpt_tos = ("p1@example.net", "LAB@example.net", "ward@example.net", "audit@example.net")

    results = await make_provider().send(envelope(*rcpt_tos), content)

    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 4
    assert google.sent == [content]


# Tokens


async def test_a_token_is_reused_until_five_minutes_before_it_expires(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    clock = FakeClock()
    provider = make_provider(clock=clock)
    content = message()

    await provider.send(envelope("p1@example.net"), content)
    clock.now += 3600 - 300 - 1
    await provider.send(envelope("p1@example.net"), content)
    assert len(google.issued) == 1
    clock.now += 2
    await provider.send(envelope("p1@example.net"), content)

    assert len(google.issued) == 2
    bearers = [r.headers["authorization"] for r in api.to(SEND_PATH)]
    assert bearers == [
        f"Bearer {t}" for t in (google.issued[0], google.issued[0], google.issued[1])
    ]


async def test_a_short_lived_token_is_refreshed_at_half_its_life(
    make_provider: MakeProvider, google: FakeGoogle
) -> None:
    google.lifetime_s = 120
    clock = FakeClock()
    provider = make_provider(clock=clock)

    await provider.send(envelope("p1@example.net"), message())
    clock.now += 59
    await provider.send(envelope("p1@example.net"), message())
    assert len(google.issued) == 1
    clock.now += 2
    await provider.send(envelope("p1@example.net"), message())

    assert len(google.issued) == 2
    assert len(google.sent) == 3


async def test_concurrent_sends_share_one_token_request(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    provider = make_provider()

    results = await asyncio.gather(
        *(provider.send(envelope("p1@example.net"), message()) for _ in range(5))
    )

    assert [r[0].outcome for r in results] == [Outcome.DELIVERED] * 5
    assert len(api.to("/token")) == 1 and len(google.sent) == 5


async def test_a_401_refreshes_the_token_once_and_retries_once(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    provider = make_provider()
    await provider.send(envelope("p1@example.net"), message())
    google.revoke_all()  # e.g. the user changed the password: the cached token is dead
    content = message(body=b"second\r\n")

    results = await provider.send(envelope("p1@example.net"), content)

    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert [(r.method, r.path) for r in api.requests[2:]] == [
        ("POST", SEND_PATH),
        ("POST", "/token"),
        ("POST", SEND_PATH),
    ]
    refused, retried = api.to(SEND_PATH)[1:]
    assert refused.headers["authorization"] == f"Bearer {google.issued[0]}"
    assert retried.headers["authorization"] == f"Bearer {google.issued[1]}"
    assert retried.body == content


async def test_a_second_401_is_a_credentials_error_not_a_loop(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    google.send_replies = [
        Reply(401, json=google_error(401, "authError", "Invalid Credentials"))
    ] * 5
    google.valid = _AcceptsAny()

    with pytest.raises(ProviderError) as caught:
        await make_provider().send(envelope("p1@example.net"), message())

    assert (caught.value.transient, caught.value.kind) == (False, "credentials")
    assert len(api.to(SEND_PATH)) == 2
    assert len(api.to("/token")) == 2


class _AcceptsAny(set[str]):
    def __contains__(self, item: object) -> bool:
        return True


async def test_invalid_grant_means_credentials_must_be_renewed_and_nothing_is_sent(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    provider = make_provider(settings(google, refresh_token="1//revoked-long-ago"))

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    error = caught.value
    assert (error.transient, error.kind) == (False, "credentials")
    assert "must be renewed" in error.detail and "invalid_grant" in error.detail
    assert api.to(SEND_PATH) == []


@pytest.mark.parametrize(
    ("reply", "kind", "transient"),
    [
        (Reply(500, json={"error": "internal_failure"}), "unavailable", True),
        (Reply(503, body=b"<html>unavailable</html>"), "unavailable", True),
        (Reply(429, json={"error": "rate_limit_exceeded"}), "rate_limited", True),
        (Reply(401, json={"error": "invalid_client"}), "credentials", False),
        (Reply(404, body=b"not here"), "config", False),
    ],
    ids=["500", "503", "429", "invalid_client", "404"],
)
async def test_token_endpoint_failures_are_classified(
    make_provider: MakeProvider,
    google: FakeGoogle,
    api: LocalApi,
    reply: Reply,
    kind: str,
    transient: bool,
) -> None:
    google.token_replies = [reply]

    with pytest.raises(ProviderError) as caught:
        await make_provider().send(envelope("p1@example.net"), message())

    assert (caught.value.kind, caught.value.transient) == (kind, transient)
    assert api.to(SEND_PATH) == []


async def test_an_unreachable_token_endpoint_is_transient(
    make_provider: MakeProvider, google: FakeGoogle
) -> None:
    provider = make_provider(settings(google, token_uri=f"{closed_port_url()}/token"))

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    assert (caught.value.kind, caught.value.transient) == ("unavailable", True)


# Service account


@pytest.fixture
def service_key(tmp_path: Path, google: FakeGoogle) -> Path:
    """A key pair made here: Google's side gets the public half, the key file the private."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    google.public_key = private_key.public_key()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key_file = tmp_path / "service-account.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "clinic-project",
                "private_key_id": KEY_ID,
                "private_key": pem,
                "client_email": SERVICE_EMAIL,
                "client_id": "109876543210987654321",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return key_file


def service_settings(google: FakeGoogle, key_file: Path) -> GmailProviderSettings:
    return settings(
        google,
        credentials="service_account",
        client_id=None,
        client_secret=None,
        refresh_token=None,
        service_account_key_file=str(key_file),
    )


async def test_service_account_assertion_is_signed_scoped_and_delegated(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi, service_key: Path
) -> None:
    before = int(time.time())

    results = await make_provider(service_settings(google, service_key)).send(
        envelope("p1@example.net"), message()
    )

    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    [token_request] = api.to("/token")
    form = token_request.form()
    assert form["grant_type"] == [JWT_BEARER_GRANT]
    assertion = form["assertion"][0]
    claims = jwt.decode(
        assertion, google.public_key, algorithms=["RS256"], audience=google.token_uri
    )
    assert claims["iss"] == SERVICE_EMAIL
    assert claims["sub"] == SENDER
    assert claims["scope"] == GMAIL_SEND_SCOPE
    assert claims["aud"] == google.token_uri  # this setting, not the key file's token_uri
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 3600
    assert jwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    assert api.to(SEND_PATH)[0].headers["authorization"] == f"Bearer {google.issued[0]}"


async def test_an_assertion_signed_with_another_key_is_a_credentials_error(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi, service_key: Path
) -> None:
    google.public_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    with pytest.raises(ProviderError) as caught:
        await make_provider(service_settings(google, service_key)).send(
            envelope("p1@example.net"), message()
        )

    assert (caught.value.transient, caught.value.kind) == (False, "credentials")
    assert len(api.to("/token")) == 1 and api.to(SEND_PATH) == []


async def test_a_broken_key_file_is_a_credentials_error_that_quotes_nothing(
    make_provider: MakeProvider, google: FakeGoogle, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": SERVICE_EMAIL,
                "private_key": "-----BEGIN PRIVATE KEY-----\nnot-a-key-" + CLIENT_SECRET,
            }
        )
    )

    with pytest.raises(ProviderError) as caught:
        await make_provider(service_settings(google, key_file)).send(
            envelope("p1@example.net"), message()
        )

    assert (caught.value.transient, caught.value.kind) == (False, "credentials")
    assert CLIENT_SECRET not in str(caught.value)


# Gmail API errors


def pacific_1pm() -> float:
    # 2026-03-10 13:00 PDT (UTC-7): 11 hours before the daily quota resets.
    return datetime(2026, 3, 10, 20, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("reply", "kind", "transient", "retry_after"),
    [
        (
            Reply(
                403,
                json=google_error(403, "userRateLimitExceeded", "User Rate Limit Exceeded"),
                headers={"Retry-After": "7"},
            ),
            "rate_limited",
            True,
            7.0,
        ),
        (
            Reply(403, json=google_error(403, "rateLimitExceeded", "Rate Limit Exceeded")),
            "rate_limited",
            True,
            None,
        ),
        (
            Reply(
                429,
                json=google_error(
                    429,
                    "rateLimitExceeded",
                    "User-rate limit exceeded.  Retry after 2026-03-10T20:01:30.000Z",
                ),
            ),
            "rate_limited",
            True,
            90.0,
        ),
        (
            Reply(
                429,
                json=google_error(429, "rateLimitExceeded", "Too many concurrent requests"),
                headers={"Retry-After": "Tue, 10 Mar 2026 20:00:42 GMT"},
            ),
            "rate_limited",
            True,
            42.0,
        ),
        (
            Reply(403, json=google_error(403, "dailyLimitExceeded", "Daily Limit Exceeded")),
            "quota",
            True,
            11 * 3600.0,
        ),
        (
            Reply(
                403,
                json=google_error(
                    403, "domainPolicy", "The domain administrators have disabled Gmail apps."
                ),
            ),
            "policy",
            False,
            None,
        ),
        (
            Reply(400, json=google_error(400, "failedPrecondition", "Mail service not enabled")),
            "policy",
            False,
            None,
        ),
        (
            Reply(
                403, json=google_error(403, "insufficientPermissions", "Insufficient Permission")
            ),
            "credentials",
            False,
            None,
        ),
        (
            Reply(404, json=google_error(404, "notFound", "Requested entity was not found.")),
            "config",
            False,
            None,
        ),
        (
            Reply(500, json=google_error(500, "backendError", "Backend Error")),
            "unavailable",
            True,
            None,
        ),
        (Reply(502, body=b"<html>bad gateway</html>"), "unavailable", True, None),
        (
            Reply(
                503,
                json=google_error(503, "backendError", "Service unavailable"),
                headers={"Retry-After": "30"},
            ),
            "unavailable",
            True,
            30.0,
        ),
    ],
    ids=[
        "userRateLimit",
        "rateLimit",
        "429-retry-after-text",
        "429-retry-after-date",
        "dailyLimit",
        "domainPolicy",
        "failedPrecondition",
        "insufficientPermissions",
        "404",
        "500",
        "502",
        "503",
    ],
)
async def test_provider_wide_api_errors_fail_over_with_their_kind(
    make_provider: MakeProvider,
    google: FakeGoogle,
    reply: Reply,
    kind: str,
    transient: bool,
    retry_after: float | None,
) -> None:
    google.send_replies = [reply]
    provider = make_provider(wall_clock=pacific_1pm)

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    error = caught.value
    assert (error.kind, error.transient, error.retry_after) == (kind, transient, retry_after)
    assert error.detail.startswith(f"gmail: Gmail API {reply.status}")
    assert google.send_replies == []  # the error came from the send call, once


@pytest.mark.parametrize(
    "reply",
    [
        Reply(400, json=google_error(400, "invalidArgument", "Invalid To header")),
        Reply(413, json=google_error(413, "uploadTooLarge", "Request Entity Too Large")),
    ],
    ids=["400", "413"],
)
async def test_a_refused_message_is_permanent_for_its_recipients(
    make_provider: MakeProvider, google: FakeGoogle, reply: Reply
) -> None:
    google.send_replies = [reply]

    results = await make_provider().send(
        envelope("p1@example.net", "p2@example.net"), message("p1@example.net, p2@example.net")
    )

    assert [r.outcome for r in results] == [Outcome.PERMANENT] * 2
    assert all(str(reply.status) in r.detail for r in results)
    assert "Invalid To header" in results[0].detail or reply.status == 413


async def test_an_api_that_does_not_answer_in_time_is_transient(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    def slow(request: Request) -> Reply:
        time.sleep(1.0)
        return Reply(json={"id": "late"})

    api.route("POST", SEND_PATH, slow)
    provider = make_provider(settings(google, timeout="0.3s"))
    started = time.monotonic()

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    assert (caught.value.kind, caught.value.transient) == ("unavailable", True)
    assert "Timeout" in caught.value.detail
    assert time.monotonic() - started < 0.9


# check()


async def test_check_refreshes_a_token_and_reads_the_profile_without_sending(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    provider = make_provider()
    await provider.check()
    await provider.check()

    assert [(r.method, r.path) for r in api.requests] == [
        ("POST", "/token"),
        ("GET", PROFILE_PATH),
    ] * 2
    assert api.to(PROFILE_PATH)[1].headers["authorization"] == f"Bearer {google.issued[1]}"
    assert google.sent == []


async def test_check_reports_credentials_that_must_be_renewed(
    make_provider: MakeProvider, google: FakeGoogle, api: LocalApi
) -> None:
    provider = make_provider(settings(google, client_secret="GOCSPX-rotated-away"))

    with pytest.raises(ProviderError) as caught:
        await provider.check()

    assert (caught.value.transient, caught.value.kind) == (False, "credentials")
    assert api.to(PROFILE_PATH) == []


# Secrets


async def test_credentials_never_reach_logs_errors_or_reprs(
    make_provider: MakeProvider,
    google: FakeGoogle,
    service_key: Path,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Even with the HTTP client at DEBUG (the relay keeps it at WARNING), nothing leaks.
    for library in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=library)
    texts: list[str] = []
    spec = settings(google)
    provider = make_provider(spec)
    await provider.send(envelope("p1@example.net"), message())
    google.revoke_all()
    await provider.send(envelope("p1@example.net"), message())  # 401, refresh, retry
    await provider.check()
    service = make_provider(service_settings(google, service_key))
    await service.send(envelope("p1@example.net"), message())

    for failing in (
        make_provider(settings(google, refresh_token=REFRESH_TOKEN + "x")),
        make_provider(settings(google, client_secret=CLIENT_SECRET + "x")),
    ):
        with pytest.raises(ProviderError) as caught:
            await failing.send(envelope("p1@example.net"), message())
        texts += [str(caught.value), repr(caught.value), caught.value.detail]
    # A token in hand and the API unreachable: the error must not carry the token either.
    unreachable = make_provider(settings(google, api_base=closed_port_url()))
    with pytest.raises(ProviderError) as caught:
        await unreachable.send(envelope("p1@example.net"), message())
    texts += [str(caught.value), caught.value.detail, repr(caught.value.__cause__)]
    secret_file = tmp_path / "refresh-token"
    secret_file.write_text(REFRESH_TOKEN + "\n")
    from_file = settings(google, refresh_token=None, refresh_token_file=str(secret_file))
    await make_provider(from_file).send(envelope("p1@example.net"), message())

    texts += [caplog.text, *(r.getMessage() for r in caplog.records)]
    texts += [repr(vars(record)) for record in caplog.records]
    for shown in (spec, provider, service, from_file, service.settings):
        texts += [repr(shown), str(shown)]
    texts += [spec.model_dump_json(), from_file.model_dump_json()]
    private_key_lines = [
        line
        for line in json.loads(service_key.read_text())["private_key"].splitlines()
        if "PRIVATE KEY" not in line
    ]
    revealed = [
        secret
        for secret in (CLIENT_SECRET, REFRESH_TOKEN, *google.issued, *private_key_lines)
        if any(secret in text for text in texts)
    ]
    assert revealed == []
    assert len(google.issued) == 6  # the flows above really ran
    assert "provider.token_issued" in caplog.text


# Settings


def test_defaults_are_googles_endpoints(guard: list[str]) -> None:
    spec = GmailProviderSettings(
        type="gmail",
        user=SENDER,
        credentials="refresh_token",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
    )
    assert spec.api_base == "https://gmail.googleapis.com"
    assert spec.token_uri == "https://oauth2.googleapis.com/token"
    assert spec.timeout.total_seconds() == 30


async def test_a_provider_left_on_the_defaults_cannot_reach_google_from_a_test(
    guard: list[str],
) -> None:
    spec = GmailProviderSettings(
        type="gmail",
        user=SENDER,
        credentials="refresh_token",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
    )
    provider = GmailProvider("gmail", spec)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(envelope("p1@example.net"), message())
    finally:
        await provider.close()
    assert caught.value.transient
    assert guard == ["oauth2.googleapis.com"]


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"api_base": "http://gmail.example.com"}, "https"),
        ({"api_base": "https://relay:hunter2@gmail.example.com"}, "must not carry credentials"),
        ({"token_uri": "ftp://127.0.0.1/token"}, "https"),
        ({"client_secret": None}, "client_secret"),
        ({"client_id": None, "refresh_token": None}, "client_id, refresh_token"),
        ({"credentials": "service_account"}, "service_account_key_file"),
        ({"user": "me", "credentials": "service_account", "service_account_key": "{}"}, "'me'"),
        ({"user": "../other/users"}, "pattern"),
        ({"client_secret_path": "/x"}, "Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_unsafe_or_incomplete_configuration(
    google: FakeGoogle, changes: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(google, **changes)
    assert complaint in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value) and REFRESH_TOKEN not in str(caught.value)
