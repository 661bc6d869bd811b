"""Real input: CPython's own email test corpus, sent through SMTP, arrives byte-identical.

Each message goes in over SMTP and out through the outbox and through a real smarthost
(Postfix's smtp-sink); what arrives must equal what was sent, apart from the added
Received: header. smtp-sink stores lines with LF endings, so that side is compared after
turning CRLF into LF.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import sysconfig
from pathlib import Path

import pytest

from relay.clock import utcnow
from relay.service import RelayService
from tests.conftest import StartRelay
from tests.servers import SmtpSink

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
MESSAGES = sorted(CORPUS.glob("msg_*.txt"))


def as_submitted(raw: bytes) -> bytes:
    """The bytes a real client puts on the wire: CRLF line ends, a final CRLF."""
    wire = re.sub(rb"\r?\n|\r", b"\r\n", raw)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def test_the_corpus_is_present() -> None:
    # The interpreter the tests run on ships its test package (pyenv and python.org builds
    # do; Debian splits it into libpython3.X-testsuite, which .ci/run installs).
    assert len(MESSAGES) >= 40, f"CPython email corpus not found under {CORPUS}"


async def send_corpus(service: RelayService) -> dict[str, bytes]:
    def run() -> dict[str, bytes]:
        sent: dict[str, bytes] = {}
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as client:
            for path in MESSAGES:
                wire = as_submitted(path.read_bytes())
                client.ehlo("corpus.example")
                client.mail("corpus@example.org")
                client.rcpt("inbox@example.net")
                code, reply = client.data(wire)
                assert code == 250, (path.name, reply)
                sent[reply.decode().rsplit(" ", 1)[1]] = wire
        return sent

    return await asyncio.to_thread(run)


async def wait_until_sent(service: RelayService, ids: list[str]) -> None:
    for _ in range(400):
        stats = await service.store.stats(now=utcnow())
        if stats.counts.get("sent", 0) == len(ids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not all sent: {stats.counts}")


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"], indirect=True)
async def test_corpus_arrives_byte_identical_in_the_outbox(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    service = await start_relay()
    sent = await send_corpus(service)
    await wait_until_sent(service, list(sent))

    for queue_id, wire in sent.items():
        delivered = (tmp_path / "outbox" / f"{queue_id}.eml").read_bytes()
        assert delivered.startswith(b"Received: from corpus.example ([127.0.0.1])\r\n")
        header_end = delivered.index(b"+0000\r\n") + len(b"+0000\r\n")
        assert delivered[header_end:] == wire, queue_id


async def test_corpus_arrives_byte_identical_at_the_smarthost(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    service = await start_relay(
        providers={
            "sink": {"type": "smtp", "host": "127.0.0.1", "port": smtp_sink.port, "tls": "none"}
        },
        delivery={"providers": ["sink"]},
    )
    sent = await send_corpus(service)
    await wait_until_sent(service, list(sent))

    arrived = {}
    for dumped in smtp_sink.messages():
        match = re.search(rb"smtp-relay\) with ESMTP id (\w+)", dumped.content)
        assert match, dumped.content[:300]
        arrived[match[1].decode()] = dumped.content
    assert set(arrived) == set(sent)
    for queue_id, wire in sent.items():
        content = arrived[queue_id]
        header_end = content.index(b"+0000\n") + len(b"+0000\n")
        assert content[header_end:] == wire.replace(b"\r\n", b"\n"), queue_id
