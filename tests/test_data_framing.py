"""DATA's content framing: what ends it, which dots are removed, when it is refused.

The relay reads DATA in stretches (relay.ingest.protocol.RelaySMTP.smtp_DATA), not line by
line as aiosmtpd does. Each case below is checked against a reading written straight from
RFC 5321 section 4.5.2 (`by_the_rfc`), whatever the way the bytes are cut into packets:
whole, one byte per packet, and cut right inside the end sequence.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from relay.clock import utcnow
from relay.service import RelayService
from tests.conftest import StartRelay

ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as (\S+)\r\n")

CONTENTS = {
    "empty": b"",
    "one line": b"a\r\n",
    "dot first": b"..starts with a dot\r\nthen\r\n",
    "lone dot stuffed": b"a\r\n..\r\nb\r\n",
    "dot last": b"a\r\n..\r\n",
    "dots everywhere": b"..\r\n...\r\n. \r\n.x\r\n..y\r\n",
    "dot-like text": b"a.\r\n\r\n.\t\r\nCRLF . CRLF\r\n",
    "blank lines": b"\r\n\r\n\r\n",
    # Longer than the reader's stretch (64 KiB), with stuffed dots on either side of it.
    "long": b"".join(b"..%05d " % n + b"x" * 90 + b"\r\n" for n in range(1500)),
    "line of 999": b"y" * 999 + b"\r\n",
}


def stuffed(content: bytes) -> bytes:
    """What a client sends: a dot added to every line that starts with one."""
    lines = content.split(b"\r\n")[:-1] if content else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def by_the_rfc(sent: bytes) -> bytes:
    """The content a receiver takes from DATA's bytes, line by line as RFC 5321 says."""
    content = []
    for line in sent.split(b"\r\n"):
        if line == b".":
            break
        content.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in content)


async def send(port: int, packets: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for packet in packets:
            writer.write(packet)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


def cut(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    # Inside the end sequence: CRLF . | CRLF (or . | CRLF when the content is empty)
    at = len(data) - 2
    return [data[:at], data[at:]]


async def stored(service: RelayService, transcript: bytes) -> list[bytes]:
    return [await service.store.load_content(m.decode()) for m in QUEUED.findall(transcript)]


# 150 KB one byte per packet would take minutes; the other two cuts cover the long case.
CASES = [
    (name, how)
    for name in sorted(CONTENTS)
    for how in ("whole", "bytewise", "split end")
    if (name, how) != ("long", "bytewise")
]


@pytest.mark.parametrize(("name", "how"), CASES)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_content_is_what_the_rfc_reads(start_relay: StartRelay, name: str, how: str) -> None:
    service = await start_relay(delivery={"enabled": False})
    content = CONTENTS[name]
    sent = stuffed(content) + b".\r\n"
    assert by_the_rfc(sent) == content  # the reference agrees with the case

    transcript = await send(service.smtp_port, [ENVELOPE, *cut(sent, how), b"QUIT\r\n"])

    [queued] = await stored(service, transcript)
    # The relay puts its Received: header first; the client's content follows unchanged.
    assert queued.startswith(b"Received: ")
    assert queued.endswith(content)
    assert transcript.endswith(b"221 2.0.0 Bye\r\n")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_oversized_message_is_read_to_its_end_then_refused(
    start_relay: StartRelay,
) -> None:
    service = await start_relay(
        smtp={"port": 0, "hostname": "relay.test", "max_message_size": 20_000},
        delivery={"enabled": False},
    )
    oversized = stuffed(b"".join(b".%06d\r\n" % n for n in range(30_000))) + b".\r\n"
    fits = b"Subject: next\r\n\r\nsmall\r\n.\r\n"

    transcript = await send(
        service.smtp_port,
        [
            ENVELOPE,
            *cut(oversized, "split end"),
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
            fits,
            b"QUIT\r\n",
        ],
    )

    assert b"552 5.3.4 Error: Too much mail data\r\n" in transcript
    # The session goes on exactly after the refused content's end: the next one fits.
    assert len(QUEUED.findall(transcript)) == 1, transcript[-600:]
    [queued] = await stored(service, transcript)
    assert queued.endswith(b"Subject: next\r\n\r\nsmall\r\n")


@pytest.mark.parametrize(
    "line", [b"z" * 1000, b"." + b"z" * 1000, b"." * 1001], ids=["plain", "stuffed", "dots"]
)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_line_of_1000_is_refused_after_the_content(
    start_relay: StartRelay, line: bytes
) -> None:
    service = await start_relay(delivery={"enabled": False})
    transcript = await send(
        service.smtp_port,
        [ENVELOPE, b"Subject: long\r\n\r\n" + line + b"\r\nafter\r\n.\r\n", b"NOOP\r\nQUIT\r\n"],
    )
    assert b"500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)\r\n250 2.0.0 OK\r\n" in transcript
    assert not QUEUED.search(transcript)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_client_gone_mid_content_leaves_nothing(start_relay: StartRelay) -> None:
    service = await start_relay(delivery={"enabled": False})
    _, writer = await asyncio.open_connection("127.0.0.1", service.smtp_port)
    writer.write(ENVELOPE + b"Subject: cut\r\n\r\nhalf a mess")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    assert not service.gate.sessions
    stats = await service.store.stats(now=utcnow())
    assert sum(stats.counts.values()) == 0
