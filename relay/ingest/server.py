"""SMTP ingest: accept mail from client applications and commit it to the queue.

The 250 reply to DATA is the relay's promise that the message will be delivered or
bounced. It is sent only after the message and all its recipients are committed in one
transaction; if that fails the client hears 451 and keeps its copy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.clock import utcnow
from relay.config import SmtpSettings
from relay.ids import new_queue_id
from relay.ingest.addresses import address_problem
from relay.ingest.trace import protocol_name, received_header, subject_of
from relay.logs import event
from relay.queue.model import NewMessage
from relay.queue.sql import SqlStore

log = logging.getLogger("relay.ingest")

# RFC 2034 enhanced status codes for the replies aiosmtpd writes itself; our own replies
# carry theirs already.
_ENHANCED = {
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.5.3",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.3.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")
_SHUTDOWN_REPLY = "421 4.3.2 Service shutting down, try another server"


class Gate:
    """Whether new SMTP transactions may start, and the sessions currently open."""

    def __init__(self) -> None:
        self.closed_reply: str | None = None
        self.sessions: set[RelaySMTP] = set()

    @property
    def open(self) -> bool:
        return self.closed_reply is None

    def close(self, reply: str = _SHUTDOWN_REPLY) -> None:
        self.closed_reply = reply

    def reopen(self) -> None:
        self.closed_reply = None

    def busy_sessions(self) -> int:
        return sum(1 for session in self.sessions if session.in_transaction)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the relay's replies, session registry and drain."""

    def __init__(self, handler: Any, *, gate: Gate, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gate = gate
        self._in_ehlo = False

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.gate.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if not self.gate.open:
            # A draining relay still answers, so the client tries its next server at once
            # rather than waiting for a connect timeout.
            await self.push(self.gate.closed_reply or _SHUTDOWN_REPLY)
            self.hang_up()
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        # RFC 2034: the greeting and EHLO/HELO replies carry no enhanced codes.
        if isinstance(status, str) and not self._in_ehlo and not status.startswith("220"):
            status = _with_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_ehlo = False

    def hang_up(self) -> None:
        """Close after what has been written is flushed."""
        if self.transport is not None:
            self.loop.call_soon(self.transport.close)

    def say_goodbye(self, reply: str) -> None:
        """Unsolicited 421 to an idle session (RFC 5321 section 3.8), then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            self.hang_up()


def _with_enhanced_code(status: str) -> str:
    lines = status.split("\r\n")
    fixed = []
    for line in lines:
        code = line[:3]
        if (
            code in _ENHANCED
            and len(line) > 3
            and line[3] in " -"
            and not (_HAS_ENHANCED.match(line))
        ):
            line = f"{code}{line[3]}{_ENHANCED[code]} {line[4:]}"
        fixed.append(line)
    return "\r\n".join(fixed)


class IngestHandler:
    """aiosmtpd handler hooks: envelope checks and the durable commit at DATA."""

    def __init__(
        self,
        store: SqlStore,
        settings: SmtpSettings,
        *,
        gate: Gate,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.gate = gate
        self.on_queued = on_queued

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order and answers each; advertise it.
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.gate.open:
            server.hang_up()
            return self.gate.closed_reply or _SHUTDOWN_REPLY
        # "<>" is the null reverse-path of bounces and notifications (RFC 5321 4.5.5).
        if address != "<>" and (problem := address_problem(address)):
            return f"501 5.1.7 Bad sender address syntax: {problem}"
        # Kept as "<>" while the transaction runs: aiosmtpd takes an empty sender for "no
        # MAIL yet". It is stored as the empty string.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if problem := address_problem(address):
            return f"501 5.1.3 Bad recipient address syntax: {problem}"
        if address in envelope.rcpt_tos:
            # A repeated RCPT for the same mailbox is accepted but delivered once.
            return "250 2.1.5 Recipient ok (duplicate ignored)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        queue_id = new_queue_id()
        now = utcnow()
        peer_ip = str(session.peer[0]) if isinstance(session.peer, tuple) else "unknown"
        recipients = tuple(envelope.rcpt_tos)
        original = envelope.original_content or b""
        trace = received_header(
            helo=session.host_name,
            peer_ip=peer_ip,
            hostname=self.settings.hostname,
            protocol=protocol_name(
                extended=session.extended_smtp,
                tls=session.ssl is not None,
                authenticated=bool(session.authenticated),
                utf8=envelope.smtp_utf8,
            ),
            queue_id=queue_id,
            recipients=recipients,
        )
        message = NewMessage(
            id=queue_id,
            workspace_id=self.settings.workspace,
            from_email="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            recipients=recipients,
            subject=subject_of(original),
            content=trace + original,
            queued_at=now,
            client_address=peer_ip,
            mail_options=tuple(envelope.mail_options),
        )
        try:
            await self.store.enqueue(message)
        except Exception as exc:
            event(
                log,
                "smtp.enqueue_failed",
                logging.ERROR,
                queue_id=queue_id,
                error=f"{exc.__class__.__name__}: {exc}"[:500],
            )
            return "451 4.3.0 Queue temporarily unavailable, try again later"
        self.on_queued()
        event(
            log,
            "smtp.queued",
            message_id=queue_id,
            workspace=message.workspace_id,
            recipients=len(recipients),
            size=len(message.content),
            client=peer_ip,
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"


class IngestServer:
    """The listening socket and its sessions."""

    def __init__(self, handler: IngestHandler, settings: SmtpSettings, gate: Gate) -> None:
        self.handler = handler
        self.settings = settings
        self.gate = gate
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler,
            gate=self.gate,
            data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.settings.hostname,
            ident="ESMTP smtp-relay",
            timeout=self.settings.data_timeout.total_seconds(),
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host=self.settings.host, port=self.settings.port, reuse_address=True
        )
        event(log, "smtp.listening", host=self.settings.host, port=self.port)

    async def drain(self, grace_s: float) -> None:
        """Refuse new transactions, let the ones in flight commit, then close every session."""
        self.gate.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.gate.sessions:
            for session in list(self.gate.sessions):
                if not session.in_transaction:
                    session.say_goodbye(self.gate.closed_reply or _SHUTDOWN_REPLY)
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.gate.sessions):
            # Past the grace period: a transaction cut off here was never answered 250,
            # so the client still holds the message and will retry it.
            session.say_goodbye(self.gate.closed_reply or _SHUTDOWN_REPLY)
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
