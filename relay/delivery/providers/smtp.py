"""The smarthost provider: hands mail to another MTA over SMTP (`smtpwire`, pipelining).

STARTTLS is required unless configured otherwise: a relay for health mail must not fall back
to plaintext because a man in the middle stripped the STARTTLS capability. Connections are
pooled and reused for later messages, as Postfix's connection cache does.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Sequence

from relay.config import SmtpProviderSettings
from relay.delivery.providers.base import Envelope, Outcome, ProviderError, RecipientResult
from relay.delivery.providers.smtpwire import (
    AuthRefused,
    Misconfigured,
    NotSent,
    Peer,
    PeerClosed,
    Refused,
    Reply,
    SmtpConnection,
    SmtpError,
)

# Only these MAIL parameters describe the message itself; SIZE is the peer's to check anew
# and AUTH= belongs to the client's own submission.
_FORWARDED_MAIL_OPTIONS = ("BODY=", "SMTPUTF8")


def _classify(code: int) -> Outcome:
    return Outcome.PERMANENT if 500 <= code < 600 else Outcome.TRANSIENT


class SmtpProvider:
    def __init__(self, name: str, settings: SmtpProviderSettings) -> None:
        self.name = name
        self.settings = settings
        self._idle: list[SmtpConnection] = []
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._local_hostname = settings.local_hostname
        self._tls_context: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext | None:
        # Built on first use and kept: loading the CA bundle for each new session would
        # cost more than the handshake it serves.
        s = self.settings
        if s.tls != "none" and self._tls_context is None:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if not s.verify_certificate:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context
        return self._tls_context

    async def _peer(self) -> Peer:
        s = self.settings
        if self._local_hostname is None:
            # The name resolver may block: asked once, off the event loop.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        return Peer(
            host=s.host,
            port=s.port,
            tls=s.tls,
            tls_context=self._tls(),
            local_hostname=self._local_hostname,
            timeout=s.timeout.total_seconds(),
            username=s.username,
            password=s.resolved_password(),
        )

    async def _connect(self) -> SmtpConnection:
        try:
            peer = await self._peer()
        except UnicodeError:
            detail = f"{self.name}: the password_file does not hold UTF-8 text"
            raise ProviderError(detail, transient=False, kind="config") from None
        except OSError as exc:
            # A missing or unreadable password_file or ca_file: a file's fault, not the peer's.
            reason = exc.strerror or _brief(exc)
            detail = f"{self.name}: cannot read its password_file or ca_file: {reason}"
            raise ProviderError(detail, transient=False, kind="config") from None
        try:
            return await SmtpConnection.open(peer)
        except AuthRefused as exc:
            raise _auth_error(self.name, exc.reply) from None
        except Misconfigured as exc:
            raise ProviderError(f"{self.name}: {exc}", transient=False, kind="config") from None
        except Refused as exc:
            raise ProviderError(f"{self.name}: {exc}") from None
        except (SmtpError, OSError, TimeoutError) as exc:
            raise ProviderError(f"{self.name}: cannot connect: {_brief(exc)}") from None

    def _pooled(self) -> SmtpConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        async with self._slots:
            connection = self._pooled()
            if connection is not None:
                try:
                    return await self._send_on(connection, envelope, content)
                except PeerClosed as exc:
                    if exc.after_content:
                        raise _lost(self.name, exc) from None
                    # A pooled session the peer had already closed: one fresh try.
            connection = await self._connect()
            try:
                return await self._send_on(connection, envelope, content)
            except PeerClosed as exc:
                raise _lost(self.name, exc) from None

    async def _send_on(
        self, connection: SmtpConnection, envelope: Envelope, content: bytes
    ) -> list[RecipientResult]:
        """One transaction; the session goes back to the pool only in a known state."""
        try:
            results = await self._transaction(connection, envelope, content)
        except NotSent as exc:
            # Nothing was written: the session is as it was, and the provider is not at
            # fault. The recipients are deferred: another provider may carry the message.
            self._idle.append(connection)
            return [
                RecipientResult(address, Outcome.TRANSIENT, f"not sent to {self.name}: {exc}")
                for address in envelope.rcpt_tos
            ]
        except BaseException:
            connection.close()
            raise
        if connection.usable:
            self._idle.append(connection)
        else:
            connection.close()
        return results

    async def _transaction(
        self, connection: SmtpConnection, envelope: Envelope, content: bytes
    ) -> list[RecipientResult]:
        options = [
            option
            for option in envelope.mail_options
            if option.upper().startswith(_FORWARDED_MAIL_OPTIONS)
        ]
        try:
            replies = await connection.transaction(
                envelope.mail_from, envelope.rcpt_tos, content, options
            )
        except (PeerClosed, NotSent):
            raise
        except (SmtpError, OSError, TimeoutError) as exc:
            if connection.content_written:
                raise ProviderError(
                    f"{self.name}: {_brief(exc)} after the content", maybe_delivered=True
                ) from None
            raise ProviderError(f"{self.name}: {_brief(exc)}") from None
        return [
            _result(address, reply)
            for address, reply in zip(envelope.rcpt_tos, replies, strict=True)
        ]

    async def check(self) -> None:
        connection = await self._connect()
        try:
            reply = await connection.noop()
            if reply.code != 250:
                raise ProviderError(f"{self.name}: NOOP answered {reply}")
        except (SmtpError, OSError, TimeoutError) as exc:
            raise ProviderError(f"{self.name}: {_brief(exc)}") from None
        finally:
            await connection.quit()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.quit()


def _lost(name: str, exc: PeerClosed) -> ProviderError:
    if exc.after_content:
        # The peer may have the message: it goes back to the queue, with this attempt on
        # record, rather than out again at once, here or through the next provider.
        return ProviderError(f"{name}: {exc} after the content", maybe_delivered=True)
    return ProviderError(f"{name}: {exc}")


def _auth_error(name: str, reply: Reply) -> ProviderError:
    # Only 535 says the credentials are wrong (RFC 4954 6); a person must renew them.
    if reply.code == 535:
        detail = f"{name}: authentication rejected ({reply.code})"
        return ProviderError(detail, transient=False, kind="credentials")
    # 534, 538 and the like: a mechanism or encryption the peer wants that we do not use.
    if 500 <= reply.code < 600:
        return ProviderError(f"{name}: AUTH refused: {reply}", transient=False, kind="config")
    return ProviderError(f"{name}: AUTH failed for now: {reply}")


def _result(address: str, reply: Reply) -> RecipientResult:
    if reply.ok:
        return RecipientResult(address, Outcome.DELIVERED, reply.text, _queue_id_from(reply.text))
    return RecipientResult(address, _classify(reply.code), str(reply))


def _brief(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def _queue_id_from(reply: str) -> str | None:
    """The peer's id for the message, from the forms MTAs use; None when none is known.

    Postfix and this relay: "2.0.0 Ok: queued as 4Xyz". Exim: "OK id=1abc-00". Google:
    "2.0.0 OK  1733369234 ab12-xyz.3 - gsmtp". Anything else (smtp-sink's "2.0.0 Ok")
    names no id, and its last word would be a guess.
    """
    for pattern in _QUEUE_ID_FORMS:
        if found := pattern.search(reply):
            return found[1][:255]
    return None


_QUEUE_ID_FORMS = (
    re.compile(r"queued as (\S+)", re.IGNORECASE),
    re.compile(r"\bid=(\S+)", re.IGNORECASE),
    re.compile(r"\s(\S+) - gsmtp\s*$"),
)
