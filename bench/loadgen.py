"""Load: Postfix's smtp-source for the maximum rate, a paced SMTP client for latency.

smtp-source opens a connection per message and sends as fast as its sessions are
answered, so it finds the maximum rate; it reports no latencies and its only pacing (-w,
-R) is whole seconds of sleep per session, too coarse for a target rate. The paced client
below is open-loop: transaction i is due at start + i / rate whatever happened before,
and its latency is counted from when it was due, so a server that falls behind shows its
queueing delay instead of hiding it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

SENDER = "bench@client.bench.test"
RECIPIENT = "rcpt@example.net"
HELO = "client.bench.test"


@dataclass(frozen=True)
class SourceRun:
    seconds: float
    cpu_seconds: float
    returncode: int
    errors: str


def smtp_source(
    ports: int | list[int], *, messages: int, sessions: int, size: int, timeout_s: float = 1800
) -> SourceRun:
    """Run smtp-source to completion; its wall time and its own CPU time.

    With several ports (relay replicas) the messages and sessions are split evenly and
    one smtp-source per port runs at the same time; the wall time is the slowest one's.
    """
    targets = [ports] if isinstance(ports, int) else ports
    with tempfile.TemporaryFile() as stderr:
        started = time.monotonic()
        pending = {
            subprocess.Popen(  # noqa: S603 - fixed arguments
                _source_argv(port, messages // len(targets), sessions // len(targets), size),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            ).pid
            for port in targets
        }
        cpu, worst = 0.0, 0
        while pending:
            if time.monotonic() - started > timeout_s:
                # A server that stopped answering: end the load rather than wait forever.
                for pid in pending:
                    os.kill(pid, signal.SIGKILL)
            # wait4 rather than Popen.wait: it also returns the child's CPU time.
            for pid in list(pending):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    pending.discard(pid)
                    cpu += usage.ru_utime + usage.ru_stime
                    worst = worst or os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        seconds = time.monotonic() - started
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")[-2000:]
    return SourceRun(seconds=seconds, cpu_seconds=cpu, returncode=worst, errors=errors)


def _source_argv(port: int, messages: int, sessions: int, size: int) -> list[str]:
    return [
        "/usr/sbin/smtp-source",
        "-s", str(sessions),
        "-l", str(size),
        "-m", str(messages),
        "-f", SENDER,
        "-t", RECIPIENT,
        "-M", HELO,
        f"127.0.0.1:{port}",
    ]  # fmt: skip


def message(size: int) -> bytes:
    """About size bytes of body in 80-octet CRLF lines, with headers, dot-terminated."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: appointment reminder\r\n"
        f"Message-ID: <paced@{HELO}>\r\n\r\n"
    ).encode()
    line = b"Your appointment is confirmed; reply to this message to reschedule it. 0123\r\n"
    lines = max(1, size // len(line))
    return head + line * lines + b".\r\n"


class SmtpRefused(Exception):
    pass


class SmtpSession:
    """One client connection, reused for transaction after transaction, as applications do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> SmtpSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session.expect(220)
        await session.command(b"EHLO " + HELO.encode() + b"\r\n", 250)
        return session

    async def expect(self, code: int) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpRefused("connection closed")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            raise SmtpRefused(line.decode(errors="replace").strip())

    async def command(self, line: bytes, code: int) -> None:
        self.writer.write(line)
        await self.expect(code)

    async def send(self, data: bytes) -> None:
        await self.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        await self.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        await self.command(data, 250)

    def close(self) -> None:
        self.writer.close()


@dataclass
class PacedResult:
    offered_rate: float
    connections: int
    seconds: float = 0.0
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    # From when each transaction was due, and from when its MAIL was written.
    latency_s: list[float] = field(default_factory=list)
    service_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0


async def paced_load(
    port: int,
    *,
    rate: float,
    seconds: float,
    connections: int,
    size: int,
    tick: Callable[[], Awaitable[None]] | None = None,
) -> PacedResult:
    """Offer `rate` transactions per second for `seconds` over `connections` sessions."""
    loop = asyncio.get_running_loop()
    result = PacedResult(offered_rate=rate, connections=connections)
    data = message(size)
    # None in the queue: a session was lost and could not be reopened; the run ends.
    idle: asyncio.Queue[SmtpSession | None] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await SmtpSession.open(port))

    async def one(session: SmtpSession, due: float) -> None:
        began = loop.time()
        try:
            async with asyncio.timeout(60):
                await session.send(data)
        except (SmtpRefused, OSError, TimeoutError) as exc:
            result.failed += 1
            if len(result.errors) < 10:
                result.errors.append(f"{exc.__class__.__name__}: {exc}")
            session.close()
            try:
                session = await SmtpSession.open(port)
            except (SmtpRefused, OSError) as reopen:
                result.errors.append(f"reconnect: {reopen}")
                idle.put_nowait(None)
                return
        else:
            done = loop.time()
            result.sent += 1
            result.latency_s.append(done - due)
            result.service_s.append(done - began)
        idle.put_nowait(session)

    cpu_before = _own_cpu()
    ticker = asyncio.create_task(_every_second(tick)) if tick else None
    total = int(rate * seconds)
    start = loop.time() + 0.05
    # An overloaded server runs late; one that stalls must not hold the run forever.
    deadline = start + 2 * seconds + 60
    running: set[asyncio.Task[None]] = set()
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        session = await idle.get()
        if session is None or loop.time() > deadline:
            result.errors.append(f"stopped after {i} of {total} transactions")
            break
        task = asyncio.create_task(one(session, due))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    result.seconds = loop.time() - start
    if ticker:
        ticker.cancel()
    while not idle.empty():
        if (session := idle.get_nowait()) is not None:
            session.close()
    result.client_cpu_s = _own_cpu() - cpu_before
    return result


async def _every_second(tick: Callable[[], Awaitable[None]]) -> None:
    while True:
        await tick()
        await asyncio.sleep(1.0)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
