"""The smarthost provider's SMTP client against real peers: smtp-sink and aiosmtpd servers.

Pipelining is seen on the wire: a recording proxy on 127.0.0.1 keeps each chunk the client
wrote, and a pipelined transaction writes MAIL, the RCPTs and DATA as one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from relay.config import SmtpProviderSettings
from relay.delivery.providers.base import Envelope, Outcome, ProviderError
from relay.delivery.providers.smtp import SmtpProvider, _queue_id_from
from relay.delivery.providers.smtpwire import _data_block, _extensions
from tests.conftest import StartRelay
from tests.servers import SmtpSink, free_port
from tests.test_delivery import submit, wait_for_status

PASSWORD = "smarthost-secret-Pw-71"


def provider(port: int, **extra: Any) -> SmtpProvider:
    settings = SmtpProviderSettings.model_validate(
        {
            "type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "tls": "none",
            "timeout": timedelta(seconds=5),
            "local_hostname": "relay.test",
            **extra,
        }
    )
    return SmtpProvider("smarthost", settings)


def envelope(*rcpts: str) -> Envelope:
    return Envelope("Q1", "clinic@example.org", rcpts)


@dataclass
class Recorder:
    """A TCP proxy keeping each chunk the client wrote, in order."""

    target: int
    chunks: list[bytes] = field(default_factory=list)
    port: int = 0
    sessions: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def stop(self, server: asyncio.Server) -> None:
        server.close()
        # Sessions end when the client says QUIT; one still open is cut off here.
        for session in self.sessions:
            session.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions.append(asyncio.ensure_future(self._pipe(reader, writer)))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            while data := await src.read(65536):
                if keep:
                    self.chunks.append(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            copy(reader, upstream_writer, True),
            copy(upstream_reader, writer, False),
            return_exceptions=True,
        )

    def written_with(self, command: bytes) -> bytes:
        return next(chunk for chunk in self.chunks if command in chunk)


@pytest.fixture
async def recorder(smtp_sink: SmtpSink) -> AsyncIterator[Recorder]:
    recorder = Recorder(smtp_sink.port)
    server = await recorder.start()
    yield recorder
    await recorder.stop(server)


class Scripted:
    """An aiosmtpd handler that refuses by address and offers PIPELINING when told to."""

    def __init__(self, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.closing_seen = 0
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("blocked@"):
            return "451 4.7.1 sender held for review"
        if address.startswith("closing@"):
            self.closing_seen += 1
            return "421 4.3.2 shutting down"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("gone@"):
            return "550 5.1.1 no such user"
        if address.startswith("full@"):
            return "452 4.2.2 mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return f"250 2.0.0 Ok: queued as S{len(self.received)}"


def _authenticate(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, Controller]]:
    handler = Scripted()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller
    controller.stop()


@pytest.mark.postfix
async def test_a_pipelining_peer_gets_the_envelope_in_one_write(
    recorder: Recorder, smtp_sink: SmtpSink
) -> None:
    smarthost = provider(recorder.port)
    try:
        [result] = await smarthost.send(envelope("a@example.net"), b"Subject: x\r\n\r\nbody\r\n")
        assert result.outcome is Outcome.DELIVERED
        await smarthost.send(envelope("b@example.net", "c@example.net"), b"Subject: y\r\n\r\ny\r\n")
    finally:
        await smarthost.close()

    # smtp-sink's "250 2.0.0 Ok" names no queue id; its last word is not one.
    assert result.provider_message_id is None
    envelope_write = recorder.written_with(b"MAIL FROM:<clinic@example.org>")
    assert envelope_write.startswith(b"MAIL FROM:")
    assert envelope_write.endswith(b"RCPT TO:<a@example.net>\r\nDATA\r\n")
    assert sorted(m.rcpt_tos for m in smtp_sink.messages()) == [
        ["a@example.net"],
        ["b@example.net", "c@example.net"],
    ]
    # Both messages went over the one pooled session: one EHLO in all.
    assert sum(chunk.count(b"EHLO relay.test") for chunk in recorder.chunks) == 1


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("flag", "hello"),
    [("-p", b"EHLO relay.test\r\n"), ("-e", b"HELO relay.test\r\n")],
    ids=["no PIPELINING", "no ESMTP"],
)
async def test_a_peer_without_pipelining_gets_one_command_at_a_time(
    flag: str, hello: bytes
) -> None:
    sink = SmtpSink.start(flag)
    recorder = Recorder(sink.port)
    server = await recorder.start()
    smarthost = provider(recorder.port)
    try:
        for rcpt in ("a@example.net", "b@example.net"):
            [result] = await smarthost.send(envelope(rcpt), b"Subject: x\r\n\r\nbody\r\n")
            assert result.outcome is Outcome.DELIVERED
        assert recorder.written_with(b"MAIL FROM:") == b"MAIL FROM:<clinic@example.org>\r\n"
        envelope_at = recorder.chunks.index(b"MAIL FROM:<clinic@example.org>\r\n")
        assert recorder.chunks[envelope_at - 1] == hello
        assert sorted(m.rcpt_tos for m in sink.messages()) == [["a@example.net"], ["b@example.net"]]
    finally:
        await smarthost.close()
        await recorder.stop(server)
        sink.stop()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_each_recipient_gets_the_reply_that_decided_it(
    scripted: tuple[Scripted, Controller], pipelining: bool
) -> None:
    handler, controller = scripted
    handler.pipelining = pipelining
    smarthost = provider(controller.port)
    try:
        results = await smarthost.send(
            envelope("ok@example.net", "gone@example.net", "full@example.net"), b"x\r\n"
        )
        assert [(r.outcome, r.detail) for r in results] == [
            (Outcome.DELIVERED, "2.0.0 Ok: queued as S1"),
            (Outcome.PERMANENT, "550 5.1.1 no such user"),
            (Outcome.TRANSIENT, "452 4.2.2 mailbox full"),
        ]
        assert results[0].provider_message_id == "S1"

        # Nobody to deliver to: DATA is refused, the session is reset and kept.
        results = await smarthost.send(envelope("gone@example.net"), b"x\r\n")
        assert [r.outcome for r in results] == [Outcome.PERMANENT]

        # A refused sender decides for every recipient.
        sender_held = Envelope("Q2", "blocked@example.org", ("ok@example.net", "b@example.net"))
        results = await smarthost.send(sender_held, b"x\r\n")
        assert {r.detail for r in results} == {"451 4.7.1 sender held for review"}
        assert {r.outcome for r in results} == {Outcome.TRANSIENT}

        # The same session still delivers, with no transaction left over from the refusals.
        [result] = await smarthost.send(envelope("ok@example.net"), b"y\r\n")
        assert result.provider_message_id == "S2"
        assert len(smarthost._idle) == 1
    finally:
        await smarthost.close()
    assert handler.received == [
        ("clinic@example.org", ["ok@example.net"], b"x\r\n"),
        ("clinic@example.org", ["ok@example.net"], b"y\r\n"),
    ]


async def test_a_421_ends_the_session_not_the_message(
    scripted: tuple[Scripted, Controller],
) -> None:
    handler, controller = scripted
    smarthost = provider(controller.port)
    closing = Envelope("Q4", "closing@example.org", ("ok@example.net",))
    try:
        await smarthost.send(envelope("ok@example.net"), b"1\r\n")
        # On the pooled session first, then once on a fresh one: the attempt as a whole
        # fails (routing retries it later or elsewhere); no recipient is given a verdict.
        with pytest.raises(ProviderError, match=r"421 4\.3\.2 shutting down"):
            await smarthost.send(closing, b"x\r\n")
        assert handler.closing_seen == 2
        assert smarthost._idle == []
        [result] = await smarthost.send(envelope("ok@example.net"), b"2\r\n")
        assert result.outcome is Outcome.DELIVERED
    finally:
        await smarthost.close()
    assert [content for _, _, content in handler.received] == [b"1\r\n", b"2\r\n"]


async def test_content_reaches_the_peer_byte_for_byte_after_dot_stuffing(
    scripted: tuple[Scripted, Controller],
) -> None:
    handler, controller = scripted
    content = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast line, no end"
    smarthost = provider(controller.port)
    try:
        await smarthost.send(envelope("ok@example.net"), content)
        await smarthost.send(envelope("ok@example.net"), b"Subject: bare\n\nlf\nonly\r.\n")
    finally:
        await smarthost.close()
    assert handler.received[0][2] == content + b"\r\n"
    assert handler.received[1][2] == b"Subject: bare\r\n\r\nlf\r\nonly\r\n.\r\n"


async def test_a_pooled_session_the_peer_dropped_is_replaced_once() -> None:
    handler = Scripted()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    smarthost = provider(controller.port)
    try:
        await smarthost.send(envelope("ok@example.net"), b"1\r\n")
        # The peer restarts: the pooled session is dead, the message is not lost for it.
        controller.stop()
        controller = Controller(handler, hostname="127.0.0.1", port=controller.port)
        controller.start()
        [result] = await smarthost.send(envelope("ok@example.net"), b"2\r\n")
        assert result.outcome is Outcome.DELIVERED
    finally:
        await smarthost.close()
        controller.stop()
    assert [content for _, _, content in handler.received] == [b"1\r\n", b"2\r\n"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_plain_or_login_and_a_refusal_that_names_no_secret(
    tmp_path: Any, mechanism: str
) -> None:
    handler = Scripted()
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=_authenticate,
        auth_require_tls=False,
        auth_exclude_mechanism=[other],
    )
    controller.start()
    (tmp_path / "password").write_text(PASSWORD + "\n")
    good = provider(controller.port, username="relay-a", password_file=str(tmp_path / "password"))
    bad = provider(controller.port, username="relay-a", password="not-" + PASSWORD)
    try:
        [result] = await good.send(envelope("ok@example.net"), b"x\r\n")
        assert result.outcome is Outcome.DELIVERED
        with pytest.raises(ProviderError) as refused:
            await bad.send(envelope("ok@example.net"), b"x\r\n")
        assert refused.value.kind == "credentials" and not refused.value.transient
        assert "535" in str(refused.value) and PASSWORD not in str(refused.value)
    finally:
        await good.close()
        await bad.close()
        controller.stop()
    assert len(handler.received) == 1


@pytest.mark.parametrize("offered", [True, False])
async def test_smtputf8_is_asked_for_when_needed_and_never_dropped(offered: bool) -> None:
    handler = Scripted()
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=offered
    )
    controller.start()
    smarthost = provider(controller.port)
    by_address = envelope("jürgen@example.de")
    by_sender = Envelope("Q3", "a@example.org", ("b@example.net",), ("SMTPUTF8",))
    try:
        for needs_utf8 in (by_address, by_sender):
            [result] = await smarthost.send(needs_utf8, b"x\r\n")
            if offered:
                assert result.outcome is Outcome.DELIVERED
            else:
                # Sent without it, the peer could mangle or refuse what it cannot read. The
                # recipient waits for a provider that can; the smarthost is not at fault.
                assert result.outcome is Outcome.TRANSIENT
                assert "SMTPUTF8" in result.detail
        # Mail that does not need it goes on over the same session.
        [result] = await smarthost.send(envelope("ok@example.net"), b"y\r\n")
        assert result.outcome is Outcome.DELIVERED
        assert len(smarthost._idle) == 1
    finally:
        await smarthost.close()
        controller.stop()
    expected = [["jürgen@example.de"], ["b@example.net"]] if offered else []
    assert [rcpts for _, rcpts, _ in handler.received] == [*expected, ["ok@example.net"]]


def test_data_block_frames_content_as_data_carries_it() -> None:
    assert _data_block(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert _data_block(b".a") == b"..a\r\n.\r\n"
    assert _data_block(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert _data_block(b"") == b".\r\n"


def test_ehlo_keywords_are_read_in_both_auth_spellings() -> None:
    found = _extensions("mx.test greets you\nPIPELINING\nSIZE 1000\nAUTH=LOGIN PLAIN\n8bitmime")
    assert found == {"PIPELINING": "", "SIZE": "1000", "AUTH": "LOGIN PLAIN", "8BITMIME": ""}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A private CA, and a server context for 127.0.0.1 signed by it."""
    import ssl

    import trustme

    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    return directory / "ca.pem", server


@pytest.mark.parametrize(
    ("mode", "peer"),
    [
        ("implicit", {"ssl_context": True}),
        ("starttls", {"tls_context": True}),
        ("opportunistic", {"tls_context": True}),
        ("opportunistic", {}),
    ],
    ids=["implicit", "starttls", "opportunistic, offered", "opportunistic, not offered"],
)
async def test_each_tls_mode_against_a_peer_that_checks_it(
    certificates: tuple[Any, Any], mode: str, peer: dict[str, bool]
) -> None:
    ca_file, server_context = certificates
    handler = TlsWitness()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        **{key: server_context for key in peer},
        **({"server_hostname": "127.0.0.1"} if "ssl_context" in peer else {}),
    )
    controller.start()
    smarthost = provider(controller.port, tls=mode, ca_file=str(ca_file))
    try:
        [result] = await smarthost.send(envelope("ok@example.net"), b"x\r\n")
        assert result.outcome is Outcome.DELIVERED
    finally:
        await smarthost.close()
        controller.stop()
    assert handler.encrypted == [bool(peer)]


async def test_a_certificate_not_from_the_configured_ca_stops_the_session(
    certificates: tuple[Any, Any],
) -> None:
    _, server_context = certificates
    handler = TlsWitness()
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), tls_context=server_context
    )
    controller.start()
    # No ca_file: the system's CAs, which never signed the test CA's certificate.
    smarthost = provider(controller.port, tls="starttls")
    try:
        with pytest.raises(ProviderError, match=r"cannot connect: .*CERTIFICATE_VERIFY_FAILED"):
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
    finally:
        await smarthost.close()
        controller.stop()
    assert handler.encrypted == []


class TlsWitness(Scripted):
    def __init__(self) -> None:
        super().__init__(pipelining=True)
        self.encrypted: list[bool] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # aiosmtpd sets session.ssl after STARTTLS only; the transport knows either way.
        self.encrypted.append(server.transport.get_extra_info("ssl_object") is not None)
        return await super().handle_DATA(server, session, envelope)


# Peers no honest MTA would be: each speaks a dialogue written out by the test, to show what
# the client does when replies and commands fall out of step.

Dialogue = Any  # async (reader, writer) -> None


class RawPeer:
    def __init__(self, *dialogues: Dialogue) -> None:
        self.dialogues = list(dialogues)
        self.heard: list[bytes] = []
        self.sessions = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialogue = self.dialogues[min(self.sessions, len(self.dialogues) - 1)]
        self.sessions += 1
        try:
            await dialogue(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def expect(self, reader: asyncio.StreamReader, count: int = 1) -> None:
        for _ in range(count):
            self.heard.append(await reader.readuntil(b"\r\n"))

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def _hello(peer: RawPeer, r: Any, w: Any, *extensions: bytes) -> None:
    w.write(b"220 raw.test ESMTP\r\n")
    await peer.expect(r)
    w.write(b"250-raw.test\r\n" + b"".join(b"250-" + e + b"\r\n" for e in extensions))
    w.write(b"250 HELP\r\n")


async def _deliver_one(peer: RawPeer, r: Any, w: Any) -> None:
    await peer.expect(r, 3)  # MAIL, RCPT, DATA
    w.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
    while (line := await r.readuntil(b"\r\n")) != b".\r\n":
        peer.heard.append(line)
    w.write(b"250 2.0.0 queued as R1\r\n")


@contextlib.asynccontextmanager
async def talking_to(peer: RawPeer, **settings: Any) -> AsyncIterator[SmtpProvider]:
    """A smarthost provider pointed at `peer`; both closed at the end."""
    smarthost = provider(await peer.start(), **settings)
    try:
        yield smarthost
    finally:
        await smarthost.close()
        await peer.stop()


async def test_plaintext_slipped_in_after_the_starttls_reply_stops_the_session() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"STARTTLS", b"PIPELINING")
        await peer.expect(r)
        # Someone on the path appends a reply, to be read as if it came from inside TLS.
        w.write(b"220 go ahead\r\n250 injected\r\n")
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(peer, tls="starttls") as smarthost:
        with pytest.raises(ProviderError, match="plaintext followed the STARTTLS reply"):
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
    assert peer.heard[-1] == b"STARTTLS\r\n"


@pytest.mark.parametrize(
    ("group_reply", "refusal"),
    [
        # A success to DATA: taken as the final reply, it would call unsent mail sent.
        (b"250 ok\r\n250 ok\r\n250 out of step\r\n", "DATA answered 250"),
        (b"250-ok\r\n550 not ok\r\n250 ok\r\n354 go\r\n", "changed its code"),
    ],
    ids=["250 to DATA", "multi-line reply changing its code"],
)
async def test_replies_out_of_step_stop_the_session(group_reply: bytes, refusal: str) -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await peer.expect(r, 3)
        w.write(group_reply)
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(peer) as smarthost:
        with pytest.raises(ProviderError, match=refusal):
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
        assert smarthost._idle == []


async def test_a_pooled_session_holding_unread_bytes_is_not_reused() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await _deliver_one(peer, r, w)
        # A stray reply while idle: read as the next MAIL's reply, it would put every reply
        # after it one command late, and the DATA reply would pass for the final one.
        w.write(b"250 2.0.0 stray\r\n")
        await _deliver_one(peer, r, w)
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(peer) as smarthost:
        for _ in range(2):
            [result] = await smarthost.send(envelope("ok@example.net"), b"x\r\n")
            assert result.detail == "2.0.0 queued as R1"
            await asyncio.sleep(0.05)  # the stray reply arrives while the session is idle
    assert peer.sessions == 2


async def test_a_refusal_followed_by_a_hang_up_is_still_a_verdict() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await peer.expect(r, 3)
        w.write(b"554 5.7.1 sender policy\r\n")  # and hangs up

    peer = RawPeer(dialogue)
    async with talking_to(peer) as smarthost:
        results = await smarthost.send(envelope("a@example.net", "b@example.net"), b"x\r\n")
    assert [(r.outcome, r.detail) for r in results] == [
        (Outcome.PERMANENT, "554 5.7.1 sender policy")
    ] * 2
    assert peer.sessions == 1, "a verdict is not retried"


async def test_a_peer_that_stops_answering_times_out_and_is_not_pooled() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await peer.expect(r, 3)
        w.write(b"250 ok\r\n")  # then nothing
        await asyncio.sleep(30)

    peer = RawPeer(dialogue)
    async with talking_to(peer, timeout=timedelta(seconds=0.3)) as smarthost:
        with pytest.raises(ProviderError, match="TimeoutError"):
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
        assert smarthost._idle == []


@pytest.mark.parametrize(
    ("reply", "kind", "transient"),
    [
        (b"535 5.7.8 bad credentials", "credentials", False),
        (b"538 5.7.11 encryption required", "config", False),
        (b"454 4.7.0 try later", "unavailable", True),
    ],
)
async def test_only_a_535_blames_the_credentials(reply: bytes, kind: str, transient: bool) -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"AUTH PLAIN LOGIN")
        await peer.expect(r)
        w.write(reply + b"\r\n")
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(peer, username="relay-a", password=PASSWORD) as smarthost:
        with pytest.raises(ProviderError) as refused:
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
    assert (refused.value.kind, refused.value.transient) == (kind, transient)
    assert PASSWORD not in str(refused.value)


async def test_credentials_never_cross_an_unencrypted_opportunistic_session() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"AUTH PLAIN LOGIN")  # no STARTTLS on offer
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(
        peer, tls="opportunistic", username="relay-a", password=PASSWORD
    ) as smarthost:
        with pytest.raises(ProviderError, match="not encrypted"):
            await smarthost.send(envelope("ok@example.net"), b"x\r\n")
    assert not any(b"AUTH" in line for line in peer.heard)


async def test_an_address_that_cannot_be_written_fails_alone() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING", b"SMTPUTF8")
        for _ in range(2):
            await _deliver_one(peer, r, w)
        await peer.expect(r)

    peer = RawPeer(dialogue)
    async with talking_to(peer) as smarthost:
        # Undecodable bytes, kept as surrogates: no SMTP command can hold them.
        bad, good = "bad\udcff@example.net", "ok@example.net"
        results = await smarthost.send(envelope(bad, good), b"x\r\n")
        assert [(r.outcome, r.detail[:9]) for r in results] == [
            (Outcome.PERMANENT, "553 5.1.3"),
            (Outcome.DELIVERED, "2.0.0 que"),
        ]
        # A sender like that is no verdict on the recipients (it would count as their hard
        # bounce): they wait, and nothing is written.
        unsendable = Envelope("Q5", bad, (good,))
        [waiting] = await smarthost.send(unsendable, b"x\r\n")
        assert waiting.outcome is Outcome.TRANSIENT
        [result] = await smarthost.send(envelope(good), b"x\r\n")
        assert result.outcome is Outcome.DELIVERED
    assert peer.sessions == 1
    rcpts = [line for line in peer.heard if line.startswith(b"RCPT")]
    assert rcpts == [b"RCPT TO:<ok@example.net>\r\n"] * 2


async def test_a_session_lost_after_the_content_is_not_sent_again_at_once() -> None:
    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await _deliver_one(peer, r, w)
        await peer.expect(r, 3)
        w.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while await r.readuntil(b"\r\n") != b".\r\n":
            pass
        peer.heard.append(b"whole second message")  # and hangs up before the final reply

    peer = RawPeer(dialogue)
    async with talking_to(peer) as smarthost:
        await smarthost.send(envelope("ok@example.net"), b"1\r\n")
        # The peer may have taken it: resent now, on a fresh session, it could arrive twice
        # with no trace of the first try. It goes back to the queue instead, on record.
        with pytest.raises(ProviderError, match="after the content") as lost:
            await smarthost.send(envelope("ok@example.net"), b"2\r\n")
        assert lost.value.maybe_delivered
    assert peer.sessions == 1


@pytest.mark.parametrize(
    ("reply", "queue_id"),
    [
        ("2.0.0 Ok: queued as 4XyZ1", "4XyZ1"),
        ("OK id=1tAbCd-000123-4x", "1tAbCd-000123-4x"),
        ("2.0.0 OK  1733369234 ab12-20020a17.3 - gsmtp", "ab12-20020a17.3"),
        ("2.0.0 Ok", None),
        ("Message accepted", None),
    ],
)
def test_a_queue_id_is_read_only_from_forms_that_name_one(reply: str, queue_id: str | None) -> None:
    assert _queue_id_from(reply) == queue_id


async def test_after_a_loss_past_the_content_no_other_provider_sends_it_at_once(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    """The first smarthost takes the whole message and hangs up: it may have it. The second
    provider in the order must not send a copy in the same attempt."""

    async def dialogue(peer: RawPeer, r: Any, w: Any) -> None:
        await _hello(peer, r, w, b"PIPELINING")
        await peer.expect(r, 3)
        w.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while await r.readuntil(b"\r\n") != b".\r\n":
            pass

    peer = RawPeer(dialogue)
    first = await peer.start()
    try:
        service = await start_relay(
            providers={
                "first": {"type": "smtp", "host": "127.0.0.1", "port": first, "tls": "none"},
                "second": {
                    "type": "smtp",
                    "host": "127.0.0.1",
                    "port": smtp_sink.port,
                    "tls": "none",
                },
            },
            delivery={"providers": ["first", "second"], "min_backoff": "1h", "max_backoff": "2h"},
        )
        queue_id = await submit(service.smtp_port, "a@example.org", ["b@example.net"], b"x\r\n")
        found = await wait_for_status(service, queue_id, {"queued", "sent", "failed"})
        while found["retry_count"] == 0 and found["status"] == "queued":
            await asyncio.sleep(0.05)
            found = await wait_for_status(service, queue_id, {"queued", "sent", "failed"})
    finally:
        await peer.stop()
    assert found["status"] == "queued" and "after the content" in found["error"]
    assert peer.sessions == 1
    assert smtp_sink.messages() == []
