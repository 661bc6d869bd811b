"""SMTP ingest over real sockets with real clients (smtplib, raw sockets, swaks)."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relay.clock import utcnow
from relay.config import Settings
from relay.queue import create_store
from relay.service import RelayService
from tests.conftest import StartRelay, mysql_settings, relay_settings
from tests.servers import MariaDB

QUEUED = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-Z]{26})$")
PAUSED = {"delivery": {"providers": ["outbox"], "process_interval": "1h", "worker_count": 1}}


async def smtp(port: int, fn: Any) -> Any:
    """Run a blocking smtplib conversation off the event loop the relay runs on."""

    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            return fn(client)

    return await asyncio.to_thread(run)


async def raw_session(port: int, payload: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), timeout=10)
        await asyncio.sleep(0.3)
        return await reader.read(65536)
    finally:
        writer.close()


async def paused_relay(start_relay: StartRelay) -> RelayService:
    """A relay whose workers do not deliver, so the queue can be inspected as ingest left it."""
    service = await start_relay(**PAUSED)
    await service.engine.stop()
    return service


async def test_data_is_answered_with_the_queue_id_after_commit(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)
    body = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: Appointment\r\n\r\nTomorrow.\r\n"

    def send(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("client.example")
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        client.rcpt("c@example.net")
        return client.data(body)

    code, reply = await smtp(service.smtp_port, send)
    assert code == 250
    match = QUEUED.match(reply.decode())
    assert match, reply
    queue_id = match[1]

    found = await service.store.message_status(queue_id)
    assert found is not None
    assert found["status"] == "queued"
    assert found["from_email"] == "a@example.org"
    assert [r["email_address"] for r in found["recipients"]] == ["b@example.net", "c@example.net"]
    stored = await service.store.load_content(queue_id)
    assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert f"with ESMTP id {queue_id}".encode() in stored
    assert stored.endswith(body), "the message after the trace header is stored byte for byte"
    assert stored[: len(stored) - len(body)].count(b"\r\n") == 3


async def test_ehlo_advertises_the_extensions(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)
    code, text = await smtp(service.smtp_port, lambda c: c.ehlo("client.example"))
    assert code == 250
    lines = text.decode().splitlines()
    assert f"SIZE {service.settings.smtp.max_message_size}" in lines
    for extension in ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert extension in lines


async def test_oversize_message_is_refused_with_552_and_nothing_queued(
    start_relay: StartRelay,
) -> None:
    service = await start_relay(
        smtp={"port": 0, "hostname": "relay.test", "max_message_size": 10_000}, **PAUSED
    )
    await service.engine.stop()

    def declared(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("c")
        return client.docmd("MAIL FROM:<a@example.org> SIZE=20000")

    code, text = await smtp(service.smtp_port, declared)
    assert code == 552 and text.startswith(b"5.3.4")

    def undeclared(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("c")
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        return client.data(b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 20)

    code, _ = await smtp(service.smtp_port, undeclared)
    assert code == 552
    stats = await service.store.stats(now=utcnow())
    assert stats.counts == {}


async def test_unknown_and_out_of_order_commands_get_the_right_codes(
    start_relay: StartRelay,
) -> None:
    service = await paused_relay(start_relay)
    transcript = (
        b"EHLO client.example\r\n"
        b"BOGUS\r\n"
        b"DATA\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"MAIL FROM:<not an address>\r\n"
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<no-domain>\r\n"
        b"DATA\r\n"
        b"QUIT\r\n"
    )
    replies = (await raw_session(service.smtp_port, transcript)).decode().split("\r\n")
    codes = [line[:4] for line in replies if line and line[3] == " "]
    # greeting, EHLO, BOGUS, DATA (no RCPT), RCPT (no MAIL), bad MAIL, MAIL, bad RCPT, DATA, QUIT
    assert codes == [
        "220 ",
        "250 ",
        "500 ",
        "503 ",
        "503 ",
        "501 ",
        "250 ",
        "501 ",
        "503 ",
        "221 ",
    ], replies
    # Every reply after EHLO carries an RFC 2034 enhanced status code.
    for line in replies[replies.index("250 HELP") + 1 :]:
        if line:
            assert re.match(r"^\d{3} [245]\.\d+\.\d+ ", line), line
    assert (await service.store.stats(now=utcnow())).counts == {}


async def test_connection_dropped_mid_data_queues_nothing(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)
    _reader, writer = await asyncio.open_connection("127.0.0.1", service.smtp_port)
    writer.write(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"Subject: half\r\n\r\nthe first half of a message\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await asyncio.sleep(0.3)
    assert (await service.store.stats(now=utcnow())).counts == {}
    assert not service.gate.sessions


async def test_null_sender_is_accepted_for_notifications(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)

    def send(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("c")
        client.docmd("MAIL FROM:<>")
        client.rcpt("b@example.net")
        return client.data(b"Subject: bounce\r\n\r\nx\r\n")

    code, reply = await smtp(service.smtp_port, send)
    assert code == 250
    match = QUEUED.match(reply.decode())
    assert match is not None
    found = await service.store.message_status(match[1])
    assert found is not None and found["from_email"] == ""


async def test_duplicate_recipients_are_stored_once(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)

    def send(client: smtplib.SMTP) -> tuple[int, bytes]:
        return client.sendmail(
            "a@example.org", ["b@example.net", "b@example.net"], b"Subject: x\r\n\r\nx\r\n"
        ) or (250, b"")

    await smtp(service.smtp_port, send)
    stats = await service.store.stats(now=utcnow())
    assert stats.counts == {"queued": 1}
    async with service.store.transaction() as tx:
        rows = await tx.fetchall("SELECT COUNT(*) FROM message_recipients")
    assert rows[0][0] == 1


async def test_a_failed_commit_leaves_nothing_half_written(
    request: pytest.FixtureRequest, start_relay: StartRelay, backend: str
) -> None:
    service = await paused_relay(start_relay)
    # Make the recipients insert fail after the message row went in, inside the transaction.
    async with service.store.transaction() as tx:
        if backend == "sqlite":
            await tx.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON message_recipients"
                " WHEN NEW.email_address = 'poison@example.net'"
                " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        else:
            await tx.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON message_recipients FOR EACH ROW"
                " BEGIN IF NEW.email_address = 'poison@example.net' THEN"
                " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by test'; END IF; END"
            )

    def send(client: smtplib.SMTP) -> tuple[int, bytes]:
        client.ehlo("c")
        client.mail("a@example.org")
        client.rcpt("ok@example.net")
        client.rcpt("poison@example.net")
        return client.data(b"Subject: x\r\n\r\nx\r\n")

    code, reply = await smtp(service.smtp_port, send)
    assert (code, reply[:5]) == (451, b"4.3.0")
    async with service.store.transaction() as tx:
        counts = [
            (await tx.fetchall(f"SELECT COUNT(*) FROM {table}"))[0][0]
            for table in ("messages", "message_contents", "message_recipients")
        ]
    assert counts == [0, 0, 0]


async def test_database_down_answers_451_and_recovers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A MariaDB of this test's own, so stopping it disturbs no other test.
    server = MariaDB.start(tmp_path_factory.mktemp("mariadb-down"))
    try:
        server.create_database("relay")
        settings = relay_settings(
            tmp_path,
            {
                "backend": "mysql",
                "mysql": {**mysql_settings(server, "relay"), "connect_timeout": "1s"},
            },
            **PAUSED,
        )
        service = RelayService(settings)
        await service.start()
        await service.engine.stop()
        server.stop()

        def send(client: smtplib.SMTP) -> tuple[int, bytes]:
            client.ehlo("c")
            client.mail("a@example.org")
            client.rcpt("b@example.net")
            return client.data(b"Subject: x\r\n\r\nx\r\n")

        code, reply = await smtp(service.smtp_port, send)
        assert (code, reply[:5]) == (451, b"4.3.0")
        ready = await asyncio.to_thread(_http_get, service.http_port, "/readyz")
        assert ready[0] == 503 and b"unavailable" in ready[1]
        await service.stop()
    finally:
        if server.process.poll() is None:
            server.stop()

    # Nothing was written: start the server again on the same data and look.
    restarted = MariaDB.restart(server)
    try:
        store = create_store(
            Settings(queue={"backend": "mysql", "mysql": mysql_settings(restarted, "relay")})
        )
        await store.open()
        assert (await store.stats(now=utcnow())).counts == {}
        await store.close()
    finally:
        restarted.stop()


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_swaks_submits_mail(start_relay: StartRelay) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by .ci/run"
    service = await paused_relay(start_relay)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(service.smtp_port),
            "--from",
            "swaks@example.org",
            "--to",
            "patient@example.net",
            "--helo",
            "swaks.example",
            "--header",
            "Subject: swaks test",
            "--body",
            "hello",
            "--pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    queue_id = re.search(r"<-\s+250 2\.0\.0 Ok: queued as (\w+)", result.stdout)
    assert queue_id, result.stdout
    found = await service.store.message_status(queue_id[1])
    assert found is not None and found["recipients"][0]["email_address"] == "patient@example.net"


async def test_http_probes(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)
    assert (await asyncio.to_thread(_http_get, service.http_port, "/healthz"))[0] == 200
    status, body = await asyncio.to_thread(_http_get, service.http_port, "/readyz")
    assert status == 200 and b'"database":"ok"' in body
    service.gate.close()
    status, body = await asyncio.to_thread(_http_get, service.http_port, "/readyz")
    assert status == 503 and b"not accepting" in body


async def test_draining_relay_answers_421_but_finishes_open_transactions(
    start_relay: StartRelay,
) -> None:
    service = await paused_relay(start_relay)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.smtp_port)
    await reader.readline()
    writer.write(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)

    drain = asyncio.create_task(service.ingest.drain(10))
    await asyncio.sleep(0.2)
    late = await raw_session(service.smtp_port, b"", read_until_close=True)
    assert late.startswith(b"421 4.3.2")

    writer.write(b"DATA\r\n")
    writer.write(b"Subject: in flight\r\n\r\nfinished during drain\r\n.\r\n")
    writer.write(b"MAIL FROM:<x@example.org>\r\n")
    await writer.drain()
    replies = (await asyncio.wait_for(reader.read(), timeout=10)).decode()
    assert "250 2.0.0 Ok: queued as" in replies
    assert "421 4.3.2" in replies.split("queued as")[1]
    await drain
    assert (await service.store.stats(now=utcnow())).counts == {"queued": 1}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sessions_copied_from_the_prototype_match_aiosmtpd_built_ones(
    start_relay: StartRelay,
) -> None:
    """RelaySMTP.fresh skips aiosmtpd's per-connection introspection; the result must be
    the session aiosmtpd's own __init__ would have built (checked against every attribute,
    so an aiosmtpd upgrade that adds state shows up here)."""
    import types

    service = await start_relay()
    server = service.ingest
    built, prototype = server._new_session(), server._new_session()
    copied = prototype.fresh()
    assert vars(copied).keys() == vars(built).keys()

    def same(mine: Any, theirs: Any, path: str) -> None:
        if isinstance(theirs, types.MethodType):
            assert isinstance(mine, types.MethodType), path
            assert mine.__func__ is theirs.__func__, path
            # Bound to the session itself (or to the shared handler, like aiosmtpd's).
            if theirs.__self__ is built:
                assert mine.__self__ is copied, path
            else:
                assert mine.__self__ is theirs.__self__, path
        elif isinstance(theirs, dict):
            assert mine.keys() == theirs.keys(), path
            for key in theirs:
                same(mine[key], theirs[key], f"{path}[{key}]")
        elif isinstance(theirs, tuple) and hasattr(theirs, "_fields"):
            for n, item in enumerate(theirs):
                same(mine[n], item, f"{path}.{n}")
        elif isinstance(theirs, asyncio.StreamReader | asyncio.Future):
            # Per connection: a new one each, never the prototype's.
            assert type(mine) is type(theirs), path
            assert mine is not getattr(prototype, path.split("[")[0], None), path
        elif path in ("_stream_reader_wr", "_source_traceback"):
            pass  # a weak reference to, or the traceback of, the stream above
        else:
            assert mine == theirs, path

    for name, value in vars(built).items():
        same(getattr(copied, name), value, name)
    assert copied._stream_reader_wr() is copied._stream_reader  # type: ignore[attr-defined]


def test_bare_line_end_check_agrees_with_the_definition() -> None:
    """The counting check in RelaySMTP finds a bare CR or LF exactly where one is, also when
    a CRLF is split between two chunks."""
    import itertools

    from relay.ingest.protocol import RelaySMTP

    def verdict(chunks: tuple[bytes, ...]) -> bool:
        session = object.__new__(RelaySMTP)
        session._pending_cr = False
        # A CR left pending at the very end is not yet bare: its LF may follow.
        return any(session._bare_line_end(chunk) for chunk in chunks)

    alphabet = (b"a", b"\r", b"\n")
    for length in range(1, 7):
        for letters in itertools.product(alphabet, repeat=length):
            stream = b"".join(letters)
            expected = re.search(rb"(?<!\r)\n|\r(?!\n)", stream.rstrip(b"\r")) is not None
            if stream.endswith(b"\r") and stream.rstrip(b"\r") != stream[:-1]:
                expected = True  # "\r\r" at the end: the first CR is bare
            for cut in range(len(stream) + 1):
                chunks = tuple(c for c in (stream[:cut], stream[cut:]) if c)
                assert verdict(chunks) == expected, (stream, cut)


async def test_an_address_that_is_not_utf8_is_refused_at_rcpt(start_relay: StartRelay) -> None:
    service = await paused_relay(start_relay)
    transcript = (
        b"EHLO client.example\r\n"
        b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"
        b"RCPT TO:<b\xff\xfe@example.net>\r\n"
        b"RCPT TO:<c@b\xe9d.example>\r\n"
        b"RCPT TO:<ok@example.net>\r\n"
        b"QUIT\r\n"
    )
    replies = (await raw_session(service.smtp_port, transcript)).decode("utf-8", "replace")
    lines = [line for line in replies.split("\r\n") if line[3:4] == " "]
    assert [line[:9] for line in lines[2:6]] == ["250 2.1.0", "501 5.1.3", "501 5.1.3", "250 2.1.5"]
    assert "not valid UTF-8" in lines[3] and "not valid UTF-8" in lines[4]
