"""The rollout smoke test against a real relay, and against peers that misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from relay_operator.smoke import smoke_test

from relay.clock import utcnow
from tests.conftest import StartRelay
from tests.servers import free_port

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@SQLITE
async def test_a_healthy_relay_passes_and_no_mail_is_queued(start_relay: StartRelay) -> None:
    service = await start_relay()
    found = await smoke_test(
        "127.0.0.1", smtp_port=service.smtp_port, http_port=service.http_port, timeout_s=10
    )
    assert found.ok, found.message
    assert "SMTP 220/250/250/221" in found.message and "/health 200 (healthy)" in found.message
    # The smoke test must not put anything into the production queue.
    stats = await service.store.stats(now=utcnow())
    assert sum(stats.counts.values()) == 0


@SQLITE
async def test_a_relay_in_maintenance_fails_at_the_greeting(start_relay: StartRelay) -> None:
    service = await start_relay()
    await service.set_maintenance(True, "draining for the rollout", "test")
    found = await smoke_test(
        "127.0.0.1", smtp_port=service.smtp_port, http_port=service.http_port, timeout_s=10
    )
    assert not found.ok
    assert found.message.startswith("SMTP greeting: 421"), found.message


async def test_nothing_listening_fails_at_connect() -> None:
    found = await smoke_test("127.0.0.1", smtp_port=free_port(), http_port=free_port(), timeout_s=5)
    assert not found.ok
    assert found.message == "SMTP connect: connection refused"


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def peer(script: Script) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that runs `script` for each connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_peer_times_out_naming_the_step() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with peer(silent) as port:
        found = await smoke_test("127.0.0.1", smtp_port=port, http_port=free_port(), timeout_s=0.5)
    assert not found.ok
    assert found.message == "SMTP greeting: no answer within 0.5 s"


async def test_ehlo_refused_is_reported_with_the_reply() -> None:
    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer ESMTP\r\n")
        await reader.readline()
        writer.write(b"554-5.7.1 not you\r\n554 5.7.1 go away\r\n")
        await writer.drain()
        await reader.readline()

    async with peer(refusing) as port:
        found = await smoke_test("127.0.0.1", smtp_port=port, http_port=free_port(), timeout_s=5)
    assert not found.ok
    assert found.message == "EHLO: 554 5.7.1 not you 5.7.1 go away"


async def test_smtp_fine_but_health_unhealthy_fails() -> None:
    async def smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer ESMTP\r\n")
        for reply in (b"250 peer\r\n", b"250 2.0.0 OK\r\n", b"221 2.0.0 Bye\r\n"):
            await reader.readline()
            writer.write(reply)
            await writer.drain()

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        body = b'{"status": "unhealthy", "checks": {}}'
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()

    async with peer(smtp) as smtp_port, peer(health) as http_port:
        found = await smoke_test("127.0.0.1", smtp_port=smtp_port, http_port=http_port, timeout_s=5)
    assert not found.ok
    assert found.message == "HTTP /health: HTTP 503 (unhealthy)"
