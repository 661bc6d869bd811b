"""The Mailgun provider against a local server that plays Mailgun's documented contract.

messages.mime takes multipart/form-data with `to` fields and the MIME as a file part, under
HTTP Basic auth as user `api`; the server parses the parts byte for byte and answers as
Mailgun does, its error codes included.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from relay.config import MailgunProviderSettings, Settings
from relay.delivery.providers import (
    Envelope,
    GmailProvider,
    MailgunProvider,
    Outcome,
    ProviderError,
    build_providers,
)
from tests.local_http import LocalApi, Reply, Request, closed_port_url, only_loopback, start_api

DOMAIN = "mg.clinic.example"
API_KEY = "key-" + secrets.token_hex(16)  # fresh per run: a match in a log is no accident
SEND_PATH = f"/v3/{DOMAIN}/messages.mime"
DOMAIN_PATH = f"/v4/domains/{DOMAIN}"
QUEUE_ID = "Q7K2M9P4X1ZC"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"api:{key}".encode()).decode()


class FakeMailgun:
    """messages.mime and the v4 domain lookup, on a LocalApi."""

    def __init__(self, api: LocalApi) -> None:
        self.api = api
        self.keys = {API_KEY}
        self.replies: list[Reply] = []
        self.state = "active"
        self.queued: list[Request] = []
        api.route("POST", SEND_PATH, self.messages_mime)
        api.route("GET", DOMAIN_PATH, self.domain)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") in {basic(key) for key in self.keys}

    def messages_mime(self, request: Request) -> Reply:
        if not self._authorized(request):
            return Reply(401, body=b"Forbidden")
        names = {part.name for part in request.multipart()}
        if "to" not in names or "message" not in names:
            return Reply(400, json={"message": "to parameter is missing"})
        if self.replies:
            return self.replies.pop(0)
        self.queued.append(request)
        return Reply(
            json={
                "id": f"<20260310200000.{len(self.queued)}.relay@{DOMAIN}>",
                "message": "Queued. Thank you.",
            }
        )

    def domain(self, request: Request) -> Reply:
        if not self._authorized(request):
            return Reply(401, body=b"Forbidden")
        return Reply(
            json={
                "domain": {"name": DOMAIN, "state": self.state, "type": "custom"},
                "receiving_dns_records": [],
                "sending_dns_records": [],
            }
        )


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
def mailgun(api: LocalApi) -> FakeMailgun:
    return FakeMailgun(api)


def settings(api: LocalApi, **changes: Any) -> MailgunProviderSettings:
    fields = {"type": "mailgun", "domain": DOMAIN, "api_key": API_KEY, "base_url": api.url}
    return MailgunProviderSettings.model_validate({**fields, **changes})


MakeProvider = Callable[..., MailgunProvider]


@pytest.fixture
async def make_provider(api: LocalApi) -> AsyncIterator[MakeProvider]:
    made: list[MailgunProvider] = []

    def make(spec: MailgunProviderSettings | None = None, **options: Any) -> MailgunProvider:
        provider = MailgunProvider("mailgun", spec or settings(api), **options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


def message(body: bytes = b"Your results are ready.\r\n") -> bytes:
    return (
        b"From: Clinic <clinic@example.org>\r\nTo: p1@example.net\r\n"
        b"Subject: Results\r\nMIME-Version: 1.0\r\n\r\n" + body
    )


def envelope(*rcpt_tos: str) -> Envelope:
    return Envelope(message_id=QUEUE_ID, mail_from="clinic@example.org", rcpt_tos=rcpt_tos)


async def test_the_mime_goes_as_a_file_part_to_the_envelope_recipients(
    make_provider: MakeProvider, mailgun: FakeMailgun, api: LocalApi
) -> None:
    # Bytes a careless form encoder would damage: NUL, 8-bit, bare LF, a boundary-like line.
    content = message(b"--not-the-boundary\r\n\x00\xfe\xff\nline\r\n" + secrets.token_bytes(65536))
    # The Bcc recipient is only in the envelope: Mailgun honours envelopes, so it is sent.
    rcpt_tos = ("p1@example.net", "hidden@example.net")

    results = await make_provider().send(envelope(*rcpt_tos), content)

    [request] = api.requests
    assert (request.method, request.path, request.query) == ("POST", SEND_PATH, {})
    assert request.headers["authorization"] == basic(API_KEY)
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.headers["content-length"] == str(len(request.body))
    parts = request.multipart()
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts[:-1]] == [
        ("to", None, None, b"p1@example.net"),
        ("to", None, None, b"hidden@example.net"),
        ("v:relay-message-id", None, None, QUEUE_ID.encode()),
        ("o:tracking", None, None, b"no"),
    ]
    mime = parts[-1]
    assert (mime.name, mime.filename, mime.content_type) == (
        "message",
        "message.eml",
        "message/rfc822",
    )
    assert mime.data == content
    assert [(r.address, r.outcome, r.provider_message_id) for r in results] == [
        (address, Outcome.DELIVERED, f"<20260310200000.1.relay@{DOMAIN}>") for address in rcpt_tos
    ]
    assert "Queued. Thank you." in results[0].detail


async def test_a_message_holding_the_boundary_gets_another_one(
    make_provider: MakeProvider,
    mailgun: FakeMailgun,
    api: LocalApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The form is one buffer with a random boundary: content that happens to contain the
    one drawn must not end its part early. The draw is fixed here to force that clash."""
    from relay.delivery.providers import _http

    clash = message(b"--" + b"c" * 32 + b"\r\n")
    draws = iter(["c" * 32, "f" * 32])
    monkeypatch.setattr(_http.secrets, "token_hex", lambda _bytes: next(draws))

    await make_provider().send(envelope("p1@example.net"), clash)

    [request] = api.requests
    assert request.headers["content-type"] == "multipart/form-data; boundary=" + "f" * 32
    assert request.multipart()[-1].data == clash


async def test_every_attempt_carries_the_queue_id(
    make_provider: MakeProvider, mailgun: FakeMailgun, api: LocalApi
) -> None:
    # Mailgun may answer 5xx and still send: the retry must be recognisable in its events.
    mailgun.replies = [Reply(503, json={"message": "Service Unavailable"})]
    provider = make_provider()
    with pytest.raises(ProviderError):
        await provider.send(envelope("p1@example.net"), message())
    await provider.send(envelope("p1@example.net"), message())

    ids = [
        [p.data for p in request.multipart() if p.name == "v:relay-message-id"]
        for request in api.to(SEND_PATH)
    ]
    assert ids == [[QUEUE_ID.encode()], [QUEUE_ID.encode()]]


def region_settings(**changes: Any) -> MailgunProviderSettings:
    return MailgunProviderSettings.model_validate(
        {"type": "mailgun", "domain": DOMAIN, "api_key": API_KEY, **changes}
    )


@pytest.mark.parametrize(
    ("changes", "root"),
    [
        ({}, "https://api.mailgun.net"),
        ({"region": "us"}, "https://api.mailgun.net"),
        ({"region": "eu"}, "https://api.eu.mailgun.net"),
        ({"region": "eu", "base_url": "http://127.0.0.1:9/"}, "http://127.0.0.1:9"),
    ],
)
def test_the_region_chooses_the_api_host(
    guard: list[str], changes: dict[str, Any], root: str
) -> None:
    provider = MailgunProvider("mailgun", region_settings(**changes))
    assert provider.api_root == root
    assert provider._send_url == f"{root}/v3/{DOMAIN}/messages.mime"


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (
            Reply(
                400,
                json={"message": "to parameter is not a valid address. please check documentation"},
            ),
            "400 to parameter is not a valid address",
        ),
        (Reply(413, body=b"Request Entity Too Large"), "413"),
    ],
    ids=["400", "413"],
)
async def test_a_refused_message_is_permanent_for_those_recipients(
    make_provider: MakeProvider, mailgun: FakeMailgun, reply: Reply, detail: str
) -> None:
    mailgun.replies = [reply]

    results = await make_provider().send(envelope("p1@example.net", "p2@example.net"), message())

    assert [r.outcome for r in results] == [Outcome.PERMANENT] * 2
    assert all(detail in r.detail for r in results)


def at_2026_03_10() -> float:
    return datetime(2026, 3, 10, 20, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("reply", "kind", "transient", "retry_after"),
    [
        (Reply(401, body=b"Forbidden"), "credentials", False, None),
        (
            Reply(403, json={"message": "Domain mg.clinic.example is not allowed to send"}),
            "credentials",
            False,
            None,
        ),
        (Reply(404, json={"message": "Domain not found"}), "config", True, None),
        (Reply(404, body=b"404 page not found"), "config", False, None),
        (
            Reply(429, json={"message": "Too many requests"}, headers={"Retry-After": "12"}),
            "rate_limited",
            True,
            12.0,
        ),
        (
            Reply(
                429,
                json={"message": "Too many requests"},
                headers={"X-RateLimit-Reset": str(int(at_2026_03_10() * 1000) + 45_000)},
            ),
            "rate_limited",
            True,
            45.0,
        ),
        (
            Reply(
                429,
                json={"message": "Too many requests"},
                headers={"X-RateLimit-Reset": str(int(at_2026_03_10()) + 8)},
            ),
            "rate_limited",
            True,
            8.0,
        ),
        (Reply(429, json={"retry-seconds": 60}), "rate_limited", True, 60.0),
        (Reply(429, body=b"slow down"), "rate_limited", True, None),
        (Reply(500, json={"message": "Internal Server Error"}), "unavailable", True, None),
        (Reply(502, body=b"<html>Bad Gateway</html>"), "unavailable", True, None),
        (
            Reply(503, json={"message": "Service Unavailable"}, headers={"Retry-After": "20"}),
            "unavailable",
            True,
            20.0,
        ),
    ],
    ids=[
        "401",
        "403",
        "404-json",
        "404-bare",
        "429-retry-after",
        "429-reset-ms",
        "429-reset-s",
        "429-retry-seconds",
        "429-no-hint",
        "500",
        "502",
        "503",
    ],
)
async def test_provider_wide_errors_fail_over_with_their_kind(
    make_provider: MakeProvider,
    mailgun: FakeMailgun,
    reply: Reply,
    kind: str,
    transient: bool,
    retry_after: float | None,
) -> None:
    mailgun.replies = [reply]

    with pytest.raises(ProviderError) as caught:
        await make_provider(wall_clock=at_2026_03_10).send(envelope("p1@example.net"), message())

    error = caught.value
    assert (error.kind, error.transient, error.retry_after) == (kind, transient, retry_after)
    assert error.detail.startswith(f"mailgun: Mailgun {reply.status}")
    assert mailgun.replies == []


async def test_a_wrong_key_is_a_credentials_error(
    make_provider: MakeProvider, mailgun: FakeMailgun, api: LocalApi
) -> None:
    with pytest.raises(ProviderError) as caught:
        await make_provider(settings(api, api_key="key-wrong")).send(
            envelope("p1@example.net"), message()
        )
    assert (caught.value.kind, caught.value.transient) == ("credentials", False)
    assert mailgun.queued == []


async def test_an_unreachable_mailgun_is_transient(make_provider: MakeProvider) -> None:
    provider = make_provider(region_settings(base_url=closed_port_url()))

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    assert (caught.value.kind, caught.value.transient) == ("unavailable", True)
    assert "Cannot connect to host 127.0.0.1" in caught.value.detail


async def test_a_rotated_key_file_is_read_at_the_next_request(
    make_provider: MakeProvider, mailgun: FakeMailgun, api: LocalApi, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    provider = make_provider(settings(api, api_key=None, api_key_file=str(key_file)))
    await provider.send(envelope("p1@example.net"), message())
    rotated = "key-" + secrets.token_hex(16)
    mailgun.keys = {rotated}
    key_file.write_text(rotated)

    results = await provider.send(envelope("p1@example.net"), message())

    assert results[0].outcome is Outcome.DELIVERED
    assert [r.headers["authorization"] for r in api.to(SEND_PATH)] == [
        basic(API_KEY),
        basic(rotated),
    ]


async def test_a_missing_key_file_is_a_credentials_error(
    make_provider: MakeProvider, api: LocalApi, tmp_path: Path
) -> None:
    provider = make_provider(settings(api, api_key=None, api_key_file=str(tmp_path / "gone")))

    with pytest.raises(ProviderError) as caught:
        await provider.send(envelope("p1@example.net"), message())

    assert (caught.value.kind, caught.value.transient) == ("credentials", False)
    assert api.requests == []


# check()


async def test_check_looks_up_the_domain_and_sends_nothing(
    make_provider: MakeProvider, mailgun: FakeMailgun, api: LocalApi
) -> None:
    await make_provider().check()

    [request] = api.requests
    assert (request.method, request.path, request.query) == ("GET", DOMAIN_PATH, {})
    assert request.headers["authorization"] == basic(API_KEY)
    assert request.body == b""


@pytest.mark.parametrize(
    ("state", "key", "kind"),
    [
        ("disabled", API_KEY, "config"),
        ("unverified", API_KEY, "config"),
        ("active", "key-wrong", "credentials"),
    ],
    ids=["disabled", "unverified", "wrong-key"],  # ids, or the key would print in test names
)
async def test_check_reports_an_unusable_domain_or_key(
    make_provider: MakeProvider,
    mailgun: FakeMailgun,
    api: LocalApi,
    state: str,
    key: str,
    kind: str,
) -> None:
    mailgun.state = state

    with pytest.raises(ProviderError) as caught:
        await make_provider(settings(api, api_key=key)).check()

    assert (caught.value.kind, caught.value.transient) == (kind, False)
    assert mailgun.queued == []


# Secrets


async def test_the_api_key_never_reaches_logs_errors_or_reprs(
    make_provider: MakeProvider,
    mailgun: FakeMailgun,
    api: LocalApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Even with the HTTP client at DEBUG (the relay keeps it at WARNING), nothing leaks.
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    spec = settings(api)
    provider = make_provider(spec)
    await provider.send(envelope("p1@example.net"), message())
    await provider.check()
    texts: list[str] = []
    for reply in (
        Reply(401, body=b"Forbidden"),
        Reply(500, body=b"oops"),
        Reply(429, body=b"slow"),
    ):
        mailgun.replies = [reply]
        with pytest.raises(ProviderError) as caught:
            await provider.send(envelope("p1@example.net"), message())
        texts += [str(caught.value), repr(caught.value), caught.value.detail]
    unreachable = make_provider(settings(api, base_url=closed_port_url()))
    with pytest.raises(ProviderError) as caught:
        await unreachable.send(envelope("p1@example.net"), message())
    texts += [str(caught.value), repr(caught.value.__cause__)]

    texts += [caplog.text, *(repr(vars(record)) for record in caplog.records)]
    texts += [repr(spec), str(spec), spec.model_dump_json(), repr(provider), str(provider)]
    encoded = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    assert [t for t in texts if API_KEY in t or encoded in t] == []
    assert len(mailgun.queued) == 1 and len(api.to(DOMAIN_PATH)) == 1
    # The assertion above had material: the failures' texts, and the client's own logs.
    assert len([t for t in texts if "mailgun: Mailgun" in t]) >= 3


# Settings and wiring


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"api_key": None}, "api_key_file"),
        ({"domain": "mg.clinic.example/../v4"}, "pattern"),
        ({"base_url": "http://mailgun.example.net"}, "https"),
        ({"region": "ap"}, "'us' or 'eu'"),
    ],
)
def test_settings_refuse_unsafe_or_incomplete_configuration(
    changes: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        region_settings(**changes)
    assert complaint in str(caught.value)
    assert API_KEY not in str(caught.value)


def test_defaults_follow_the_runbook(guard: list[str]) -> None:
    spec = region_settings()
    assert (spec.region, spec.timeout.total_seconds(), spec.base_url) == ("us", 30, None)


async def test_build_providers_makes_gmail_and_mailgun_from_settings(
    guard: list[str], tmp_path: Path
) -> None:
    key_file = tmp_path / "mailgun-key"
    key_file.write_text(API_KEY)
    settings_ = Settings(
        providers={
            "gmail": {
                "type": "gmail",
                "user": "clinic@example.org",
                "credentials": "refresh_token",
                "client_id": "id",
                "client_secret": "s",
                "refresh_token_file": str(key_file),
            },
            "mailgun": {
                "type": "mailgun",
                "domain": DOMAIN,
                "api_key_file": str(key_file),
                "region": "eu",
            },
        },
        delivery={"providers": ["gmail", "mailgun"]},
    )

    providers = build_providers(settings_)

    assert isinstance(providers["gmail"], GmailProvider)
    assert isinstance(providers["mailgun"], MailgunProvider)
    eu = providers["mailgun"]
    assert isinstance(eu, MailgunProvider)
    assert eu.api_root == "https://api.eu.mailgun.net"
    for provider in providers.values():
        await provider.close()


async def test_sends_reuse_a_few_kept_alive_connections(guard: list[str]) -> None:
    """A connection per message would cost a TCP handshake each (and TLS in production):
    sends share at most max_connections, kept open between messages."""
    import asyncio

    from bench.httpsink import MailgunSink

    sink = MailgunSink()
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await sink.serve(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = region_settings(base_url=f"http://127.0.0.1:{port}", max_connections=2)
    provider = MailgunProvider("mailgun", spec)
    try:
        for _ in range(3):
            results = await asyncio.gather(
                *(provider.send(envelope(f"p{n}@example.net"), message()) for n in range(10))
            )
            assert {r[0].outcome for r in results} == {Outcome.DELIVERED}
    finally:
        await provider.close()
        server.close()
        await server.wait_closed()
    assert sink.count == 30
    assert 1 <= connections <= 2
    assert guard == []


@pytest.mark.parametrize("bypassed", [False, True])
async def test_the_environments_proxy_is_honoured(
    make_provider: MakeProvider,
    mailgun: FakeMailgun,
    api: LocalApi,
    monkeypatch: pytest.MonkeyPatch,
    bypassed: bool,
) -> None:
    """HTTP(S)_PROXY and NO_PROXY apply as they did with httpx, read once per client. The
    proxy here is a second local server that answers as Mailgun would."""
    proxy = start_api()
    try:
        FakeMailgun(proxy)
        for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        if bypassed:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        provider = make_provider()

        for _ in range(2):
            results = await provider.send(envelope("p1@example.net"), message())
            assert results[0].outcome is Outcome.DELIVERED
    finally:
        proxy.stop()
    assert (len(api.to(SEND_PATH)), len(proxy.to(SEND_PATH))) == ((2, 0) if bypassed else (0, 2))
    assert proxy.errors == []
