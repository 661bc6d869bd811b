"""The smoke test a new relay version passes before it gets traffic (runbook 2.2 step 3).

The operator runs it itself against the preview Service: an SMTP conversation that a
client would start with (greeting 220, EHLO 250, NOOP 250, QUIT 221), then `GET /health`,
which must answer 200 with a status other than "unhealthy". No mail is sent: a smoke test
must not put a message into the production queue.

Whatever goes wrong - a refused connection, a 421 greeting from a relay in maintenance, a
peer that never answers - becomes a failed result naming the step and the reply, never an
exception: the rollout records it and rolls back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from relay_operator.peers import reason, short

# An SMTP reply line is at most 512 octets (RFC 5321 4.5.3.1.5); allow generous slack,
# and bound the number of lines so that a babbling peer cannot hold the test.
_LINE_LIMIT = 4096
_MAX_LINES = 100


@dataclass(frozen=True)
class SmokeResult:
    """ok, and which step failed with what reply (or, on success, a summary with timings)."""

    ok: bool
    message: str


class _StepFailed(Exception):
    """A step got an answer other than the one it needs; the message says which."""


@dataclass
class _Progress:
    """The step under way and the time each finished step took, for the messages."""

    step: str = "SMTP connect"
    started: float = field(default_factory=time.monotonic)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def begin(self, step: str) -> None:
        self.step = step
        self.started = time.monotonic()

    def done(self) -> None:
        self.timings.append((self.step, time.monotonic() - self.started))

    def summary(self) -> str:
        return ", ".join(f"{step} {seconds * 1000:.0f} ms" for step, seconds in self.timings)


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply, multi-line ones included: its code and its text lines joined."""
    lines: list[str] = []
    for _ in range(_MAX_LINES):
        raw = await reader.readline()
        if not raw:
            raise _StepFailed("connection closed" + (f" after {lines[-1]!r}" if lines else ""))
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        code, separator = line[:3], line[3:4]
        if not code.isdigit() or separator not in ("", " ", "-"):
            raise _StepFailed(f"malformed reply {short(line)!r}")
        lines.append(line[4:])
        if separator != "-":
            return int(code), " ".join(text for text in lines if text)
    raise _StepFailed(f"reply longer than {_MAX_LINES} lines")


async def _expect(reader: asyncio.StreamReader, wanted: int) -> None:
    code, text = await _read_reply(reader)
    if code != wanted:
        raise _StepFailed(short(f"{code} {text}".rstrip()))


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, wanted: int
) -> None:
    writer.write(line.encode("ascii") + b"\r\n")
    await writer.drain()
    await _expect(reader, wanted)


async def _smtp(host: str, port: int, helo_name: str, progress: _Progress) -> None:
    progress.begin("SMTP connect")
    reader, writer = await asyncio.open_connection(host, port, limit=_LINE_LIMIT)
    progress.done()
    try:
        progress.begin("SMTP greeting")
        await _expect(reader, 220)
        progress.done()
        for step, line, wanted in (
            ("EHLO", f"EHLO {helo_name}", 250),
            ("NOOP", "NOOP", 250),
            ("QUIT", "QUIT", 221),
        ):
            progress.begin(step)
            await _command(reader, writer, line, wanted)
            progress.done()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the peer may reset the connection after QUIT; nothing is left to say


async def _health(host: str, port: int, progress: _Progress, *, limit_s: float) -> str:
    progress.begin("HTTP /health")
    url = httpx.URL(scheme="http", host=host, port=port, path="/health")
    # The preview Service is inside the cluster: a proxy from the environment is never
    # the way to it. Its timeout is a backstop: smoke_test bounds the whole test.
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, timeout=limit_s
    ) as client:
        response = await client.get(url)
    try:
        status = response.json().get("status")
    except (ValueError, AttributeError):
        status = None
    if response.status_code != 200:
        detail = f" ({short(status)})" if isinstance(status, str) else ""
        raise _StepFailed(f"HTTP {response.status_code}{detail}")
    if not isinstance(status, str):
        raise _StepFailed(f"HTTP 200 without the relay's health status: {short(response.text)}")
    if status == "unhealthy":
        raise _StepFailed("HTTP 200 but status unhealthy")
    progress.done()
    return status


async def smoke_test(
    host: str,
    *,
    smtp_port: int,
    http_port: int,
    timeout_s: float,
    helo_name: str = "smtp-relay-operator",
) -> SmokeResult:
    """Greeting, EHLO, NOOP, QUIT over SMTP, then GET /health, all within `timeout_s`."""
    progress = _Progress()
    try:
        async with asyncio.timeout(timeout_s):
            await _smtp(host, smtp_port, helo_name, progress)
            status = await _health(host, http_port, progress, limit_s=timeout_s)
    except _StepFailed as exc:
        return SmokeResult(False, f"{progress.step}: {exc}")
    except (TimeoutError, httpx.TimeoutException):
        return SmokeResult(False, f"{progress.step}: no answer within {timeout_s:g} s")
    except (OSError, httpx.HTTPError, ValueError) as exc:
        # Refused, reset, unknown host, a line past the limit (ValueError): the step failed.
        return SmokeResult(False, f"{progress.step}: {reason(exc)}")
    except Exception as exc:
        # Anything else (a host name httpx refuses, say) still fails the step rather than
        # the reconcile: the rollout needs an answer.
        return SmokeResult(False, f"{progress.step}: {type(exc).__name__}: {reason(exc)}")
    summary = f"SMTP 220/250/250/221 and /health 200 ({status}): {progress.summary()}"
    return SmokeResult(True, summary)
