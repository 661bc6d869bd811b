"""The SMTP edge: authentication, TLS, open-relay and smuggling defences, limits, quotas.

Every rule is exercised over a real socket with a real client: smtplib, raw sockets for the
malformed sequences, swaks for TLS and AUTH.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.clock import utcnow
from relay.ingest.policy import hash_password
from relay.service import RelayService
from tests.conftest import StartRelay

PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)
UNTRUSTED = {"trusted_networks": []}
WORKSPACES = {
    "clinic": {
        "users": {"clinic-app": {"password_hash": HASH}},
        "sender_domains": ["clinic.example", "*.hospital.example"],
    }
}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "tls.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    return {"cert_file": str(tmp_path / "tls.pem"), "key_file": str(tmp_path / "tls.key")}


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def smtp_section(**overrides: Any) -> dict[str, Any]:
    return {"port": 0, "hostname": "relay.test", **overrides}


async def converse(port: int, fn: Callable[[smtplib.SMTP], Any]) -> Any:
    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            return fn(client)

    return await asyncio.to_thread(run)


async def raw(port: int, *chunks: bytes, pause: float = 0.2) -> bytes:
    """Send chunks with pauses (so each is its own packet), return all the server said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def queued(service: RelayService) -> int:
    return sum((await service.store.stats(now=utcnow())).counts.values())


# Authentication and TLS


async def test_untrusted_clients_must_authenticate(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=smtp_section(**UNTRUSTED), workspaces=WORKSPACES)

    def attempt(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("app")
        return client.docmd("MAIL FROM:<a@clinic.example>")

    code, text = await converse(service.smtp_port, attempt)
    assert code == 530 and text.startswith(b"5.7.0")
    assert await queued(service) == 0


async def test_auth_is_not_offered_before_starttls(
    start_relay: StartRelay, tls_files: dict[str, str]
) -> None:
    service = await start_relay(
        smtp=smtp_section(tls=tls_files, **UNTRUSTED), workspaces=WORKSPACES
    )

    def attempt(client: smtplib.SMTP) -> tuple[bool, bool, tuple[int, bytes]]:
        client.ehlo("app")
        offered = client.has_extn("auth")
        starttls = client.has_extn("starttls")
        token = base64.b64encode(f"\0clinic-app\0{PASSWORD}".encode()).decode()
        return offered, starttls, client.docmd("AUTH PLAIN " + token)

    offered, starttls, (code, text) = await converse(service.smtp_port, attempt)
    assert not offered and starttls
    assert code == 538 and text.startswith(b"5.7.11")


async def test_starttls_then_auth_plain_relays_for_the_workspace(
    start_relay: StartRelay,
    tls_files: dict[str, str],
    client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = await start_relay(
        smtp=smtp_section(tls=tls_files, **UNTRUSTED), workspaces=WORKSPACES
    )
    await service.engine.stop()

    def send(client: smtplib.SMTP) -> list[tuple[int, bytes]]:
        client.starttls(context=client_tls)
        client.ehlo("app")
        assert client.has_extn("auth")
        client.login("clinic-app", PASSWORD)
        replies = [client.docmd("MAIL FROM:<results@lab.hospital.example>")]
        client.rset()
        replies.append(client.docmd("MAIL FROM:<someone@elsewhere.example>"))
        client.rset()
        replies.append(client.docmd("MAIL FROM:<>"))
        client.rset()
        client.mail("reminders@clinic.example")
        client.rcpt("patient@example.net")
        replies.append(client.data(b"Subject: hi\r\n\r\nx\r\n"))
        return replies

    within, outside, null, data = await converse(service.smtp_port, send)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a login warns"
    assert within[0] == 250
    assert outside[0] == 553 and b"5.7.1" in outside[1]
    assert null[0] == 553
    assert data[0] == 250
    queue_id = data[1].decode().rsplit(" ", 1)[1]
    found = await service.store.message_status(queue_id)
    assert found is not None and found["workspace_id"] == "clinic"
    content = await service.store.load_content(queue_id)
    assert b"with ESMTPSA id" in content


async def test_bad_password_is_refused_and_audited_without_the_password(
    start_relay: StartRelay,
    tls_files: dict[str, str],
    client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = await start_relay(
        smtp=smtp_section(tls=tls_files, **UNTRUSTED), workspaces=WORKSPACES
    )

    def attempt(client: smtplib.SMTP) -> Any:
        client.starttls(context=client_tls)
        client.ehlo("app")
        try:
            client.login("clinic-app", "wrong-password-guess")
        except smtplib.SMTPAuthenticationError as refused:
            return refused.smtp_code, refused.smtp_error
        raise AssertionError("login succeeded")

    code, text = await converse(service.smtp_port, attempt)
    assert code == 535 and text.startswith(b"5.7.8")
    # smtplib tries each offered mechanism (PLAIN, then LOGIN): one entry per attempt.
    entries = await service.store.audit_entries()
    assert len(entries) == 2
    for entry in entries:
        assert entry["action"] == "smtp.auth" and entry["outcome"] == "failure"
        assert entry["user_id"] == "clinic-app" and entry["ip_address"] == "127.0.0.1"
    assert "wrong-password-guess" not in repr(entries) + caplog.text


async def test_plaintext_auth_only_on_networks_configured_for_it(start_relay: StartRelay) -> None:
    service = await start_relay(
        smtp=smtp_section(trusted_networks=[], plaintext_auth_networks=["127.0.0.0/8"]),
        workspaces=WORKSPACES,
    )

    def send(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("app")
        client.user, client.password = "clinic-app", PASSWORD
        code, text = client.auth("LOGIN", client.auth_login)
        assert code == 235, text
        return client.docmd("MAIL FROM:<a@clinic.example>")

    assert (await converse(service.smtp_port, send))[0] == 250


async def test_implicit_tls_port(
    start_relay: StartRelay, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    service = await start_relay(
        smtp=smtp_section(tls={**tls_files, "implicit_port": 0}, **UNTRUSTED),
        workspaces=WORKSPACES,
    )

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP_SSL(
            "127.0.0.1", service.ingest.implicit_tls_port, context=client_tls, timeout=10
        ) as client:
            client.login("clinic-app", PASSWORD)
            return client.docmd("MAIL FROM:<a@clinic.example>")

    assert (await asyncio.to_thread(send))[0] == 250


async def test_certificate_files_are_reloaded_when_they_change(
    start_relay: StartRelay, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    service = await start_relay(smtp=smtp_section(tls=tls_files), workspaces=WORKSPACES)

    def presented_names() -> str:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
            client.starttls(context=context)
            cert = client.sock.getpeercert()  # type: ignore[union-attr]
        return str(cert["subjectAltName"])

    assert "relay.test" in await asyncio.to_thread(presented_names)
    renewed = ca.issue_cert("renewed.relay.test")
    renewed.private_key_and_cert_chain_pem.write_to_path(tls_files["cert_file"])
    renewed.private_key_pem.write_to_path(tls_files["key_file"])
    assert "renewed.relay.test" in await asyncio.to_thread(presented_names)


async def test_swaks_starttls_and_auth(
    start_relay: StartRelay, tls_files: dict[str, str], ca: trustme.CA, tmp_path: Path
) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by .ci/run"
    service = await start_relay(
        smtp=smtp_section(tls=tls_files, **UNTRUSTED), workspaces=WORKSPACES
    )
    await service.engine.stop()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    result = await asyncio.to_thread(
        subprocess.run,
        [
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(service.smtp_port),
            "--tls",
            "--tls-ca-path",
            str(tmp_path / "ca.pem"),
            "--tls-verify",
            "--auth",
            "PLAIN",
            "--auth-user",
            "clinic-app",
            "--auth-password",
            PASSWORD,
            "--from",
            "reminders@clinic.example",
            "--to",
            "patient@example.net",
            "--helo",
            "swaks.example",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert await queued(service) == 1


# Never an open relay


@pytest.mark.parametrize(
    "address",
    [
        "<@attacker.example,@relay.test:victim@target.example>",
        "<@relay.test:victim@target.example>",
        "<victim%target.example@relay.test>",
        "<target.example!victim@relay.test>",
        '<"victim@target.example"@relay.test>',
        '<"victim%target.example"@relay.test>',
    ],
)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_routing_addresses_are_refused(start_relay: StartRelay, address: str) -> None:
    service = await start_relay()

    def attempt(client: smtplib.SMTP) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        client.ehlo("app")
        as_sender = client.docmd(f"MAIL FROM:{address}")
        client.rset()
        client.docmd("MAIL FROM:<a@example.org>")
        return as_sender, client.docmd(f"RCPT TO:{address}")

    as_sender, as_recipient = await converse(service.smtp_port, attempt)
    assert as_sender[0] == 553, as_sender
    assert as_recipient[0] == 553, as_recipient


# Never smuggled


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: a\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.org>\r\n",
        b"Subject: a\r\n\r\nfirst\r\n.\nMAIL FROM:<evil@example.org>\r\n",
        b"Subject: a\r\n\r\nfirst\n.\r\nMAIL FROM:<evil@example.org>\r\n",
        b"Subject: a\r\n\r\nfirst\r.\r\nMAIL FROM:<evil@example.org>\r\n",
        b"Subject: a\r\n\r\nfirst\r\n.\rMAIL FROM:<evil@example.org>\r\n",
        b"Subject: a\r\n\r\nbare lf in a body line\nsecond\r\n",
    ],
)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_bare_line_ends_in_data_end_the_session_and_queue_nothing(
    start_relay: StartRelay, data: bytes
) -> None:
    service = await start_relay()
    transcript = await raw(
        service.smtp_port,
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        data,
        b"RCPT TO:<c@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n",
    )
    assert b"554 5.5.2 Bare CR or LF" in transcript
    assert b"queued as" not in transcript
    assert await queued(service) == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_bare_lf_in_a_command_ends_the_session(start_relay: StartRelay) -> None:
    service = await start_relay()
    transcript = await raw(service.smtp_port, b"EHLO c\nMAIL FROM:<a@example.org>\r\n")
    assert transcript.endswith(
        b"554 5.5.2 Bare CR or LF received; lines must end with CRLF (RFC 5321 section 2.3.8)\r\n"
    )
    assert b"250" not in transcript


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_only_crlf_dot_crlf_ends_data(start_relay: StartRelay) -> None:
    service = await start_relay()
    await service.engine.stop()
    body = b"Subject: dots\r\n\r\n..leading dot\r\n. \r\nnot the end\r\n"
    transcript = await raw(
        service.smtp_port,
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        body + b".\r\nQUIT\r\n",
    )
    assert transcript.count(b"queued as") == 1
    queue_id = transcript.split(b"queued as ")[1].split(b"\r\n")[0].decode()
    stored = await service.store.load_content(queue_id)
    # RFC 5321 4.5.2: a leading dot is removed when other characters follow it.
    assert stored.endswith(b"\r\n\r\n.leading dot\r\n \r\nnot the end\r\n")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_commands_pipelined_behind_starttls_are_discarded(
    start_relay: StartRelay, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    service = await start_relay(smtp=smtp_section(tls=tls_files))

    def attack() -> list[bytes]:
        sock = socket.create_connection(("127.0.0.1", service.smtp_port), timeout=10)
        plain = sock.makefile("rb")
        plain.readline()
        sock.sendall(b"EHLO c\r\n")
        while not plain.readline().startswith(b"250 "):
            pass
        # One packet: STARTTLS and a command the attacker wants run inside the TLS session.
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert plain.readline().startswith(b"220")
        tls = client_tls.wrap_socket(sock, server_hostname="relay.test")
        secure = tls.makefile("rb")
        tls.sendall(b"EHLO c\r\n")
        while not secure.readline().startswith(b"250 "):
            pass
        tls.sendall(b"RCPT TO:<b@example.net>\r\n")
        reply = secure.readline()
        tls.close()
        return [reply]

    [reply] = await asyncio.to_thread(attack)
    assert reply.startswith(b"503"), "the injected MAIL must not have been run"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_over_long_lines_are_refused(start_relay: StartRelay) -> None:
    service = await start_relay()
    long_command = b"MAIL FROM:<" + b"a" * 1100 + b"@example.org>\r\n"
    long_line = b"Subject: long\r\n\r\n" + b"x" * 1001 + b"\r\n.\r\n"
    transcript = await raw(
        service.smtp_port,
        b"EHLO c\r\n" + long_command,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        long_line + b"QUIT\r\n",
    )
    lines = transcript.split(b"\r\n")
    assert any(line.startswith(b"500 5.5.2 Command line too long") for line in lines)
    assert any(line.startswith(b"500 5.5.2 Line too long") for line in lines)
    assert await queued(service) == 0


# Real clients' parameters, international addresses


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_outlook_and_dsn_parameters_are_accepted(start_relay: StartRelay) -> None:
    service = await start_relay()

    def send(client: smtplib.SMTP) -> list[tuple[int, bytes]]:
        client.ehlo("outlook.example")
        return [
            client.docmd("MAIL FROM:<a@example.org> AUTH=<> SIZE=100 BODY=8BITMIME"),
            client.docmd("RCPT TO:<b@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.net"),
            client.docmd("RSET"),
            client.docmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ314159"),
        ]

    replies = await converse(service.smtp_port, send)
    assert [code for code, _ in replies] == [250, 250, 250, 250], replies


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_idn_domains_use_idna2008(start_relay: StartRelay) -> None:
    service = await start_relay()
    await service.engine.stop()

    def send(client: smtplib.SMTP) -> list[tuple[int, bytes]]:
        client.ehlo("app")
        client.command_encoding = "utf-8"
        mail = client.docmd("MAIL FROM:<a@example.org> SMTPUTF8")
        rcpt = client.docmd("RCPT TO:<kontakt@straße.de>")
        rcpt_utf8_local = client.docmd("RCPT TO:<jürgen@example.de>")
        data = client.data(b"Subject: idn\r\n\r\nx\r\n")
        return [mail, rcpt, rcpt_utf8_local, data]

    mail, rcpt, local, data = await converse(service.smtp_port, send)
    assert (mail[0], rcpt[0], local[0], data[0]) == (250, 250, 250, 250)
    found = await service.store.message_status(data[1].decode().rsplit(" ", 1)[1])
    assert found is not None
    addresses = [r["email_address"] for r in found["recipients"]]
    # IDNA2008, not Python's IDNA2003 codec (which would give strasse.de).
    assert addresses == ["kontakt@xn--strae-oqa.de", "jürgen@example.de"]

    def without_smtputf8(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("app")
        client.command_encoding = "utf-8"
        client.docmd("MAIL FROM:<a@example.org>")
        return client.docmd("RCPT TO:<jürgen@example.de>")

    code, text = await converse(service.smtp_port, without_smtputf8)
    assert code == 553 and text.startswith(b"5.6.7")


# Limits


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_recipient_limit(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=smtp_section(max_recipients=3))

    def send(client: smtplib.SMTP) -> list[int]:
        client.ehlo("app")
        client.mail("a@example.org")
        return [client.rcpt(f"r{n}@example.net")[0] for n in range(4)]

    assert await converse(service.smtp_port, send) == [250, 250, 250, 452]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_connection_limit_per_client(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=smtp_section(max_connections_per_ip=2))
    held = [await asyncio.open_connection("127.0.0.1", service.smtp_port) for _ in range(2)]
    try:
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        third = await raw(service.smtp_port)
        assert third == b"421 4.7.0 Too many connections from your address, try again later\r\n"
    finally:
        for _, writer in held:
            writer.close()
    # A slot freed is a slot available again.
    await asyncio.sleep(0.2)
    assert (await raw(service.smtp_port, b"QUIT\r\n")).startswith(b"220")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_error_limit_disconnects(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=smtp_section(max_errors=3))
    transcript = await raw(
        service.smtp_port,
        b"EHLO c\r\nMAIL FROM:<bad address>\r\nRCPT TO:<b@example.net>\r\n"
        b"MAIL FROM:<also bad>\r\nNOOP\r\n",
    )
    assert transcript.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert transcript.count(b"\r\n5") == 3


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_idle_sessions_are_closed(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=smtp_section(idle_timeout="0.5s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", service.smtp_port)
    await reader.readline()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_token_bucket_answers_451_when_empty(start_relay: StartRelay) -> None:
    service = await start_relay(
        workspaces={"default": {"limits": {"rate_limit_burst": 2, "rate_limit_refill": 0.001}}}
    )

    def send(client: smtplib.SMTP) -> list[tuple[int, bytes]]:
        client.ehlo("app")
        replies = []
        for _ in range(3):
            replies.append(client.docmd("MAIL FROM:<a@example.org>"))
            client.rset()
        return replies

    replies = await converse(service.smtp_port, send)
    assert [code for code, _ in replies] == [250, 250, 451]
    assert replies[2][1].startswith(b"4.7.1 Rate limit exceeded")


async def test_daily_quota_is_exact_and_overrides_raise_it(start_relay: StartRelay) -> None:
    service = await start_relay(workspaces={"default": {"limits": {"workspace_daily": 3}}})
    await service.engine.stop()

    def send_one(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("app")
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        return client.data(b"Subject: q\r\n\r\nx\r\n")

    codes = [(await converse(service.smtp_port, send_one))[0] for _ in range(4)]
    assert codes == [250, 250, 250, 451]
    assert await queued(service) == 3

    from datetime import timedelta

    from relay.limits import Override

    await service.store.set_override(
        Override("default", utcnow() + timedelta(hours=1), workspace_daily=5)
    )
    service.handler.overrides.invalidate()  # as the 5 s cache lifetime would
    codes = [(await converse(service.smtp_port, send_one))[0] for _ in range(3)]
    assert codes == [250, 250, 451]
    assert await queued(service) == 5


@pytest.mark.parametrize(
    "arg",
    [
        "<a@example.org>",
        "<a.b+tag@mail.example.org> SIZE=100 BODY=8BITMIME",
        "<a@example.org>  SIZE=100",
        "<first.last@sub-domain.example.co.uk>",
        "<odd!chars#$%&'*+/=?^_`{|}~-@example.org>",
        "<a@example.org> AUTH=<>",
        '<"quoted local"@example.org>',
        "<a..b@example.org>",
        "<a@-example.org>",
        "<a@example.org",
        "a@example.org",
        "<>",
        "<jürgen@example.de>",
    ],
)
def test_fast_address_path_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from relay.ingest.protocol import _PLAIN_ADDRESS

    class Bare(SMTP):
        def __init__(self) -> None:  # only the parser is used
            self.local_part_limit = 0

    reference = Bare()._getaddr(arg)
    plain = _PLAIN_ADDRESS.fullmatch(arg)
    if plain:
        assert (plain[1], plain[2] or "") == reference
    # The everyday forms must take the fast path; unusual ones must not.
    assert bool(plain) == (
        arg.startswith("<")
        and "@" in arg
        and arg.isascii()
        and '"' not in arg
        and ".." not in arg
        and "@-" not in arg
        and ">" in arg
    )
