"""The listening sockets: plain SMTP with optional STARTTLS, and optionally implicit TLS."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path

from relay.config import SmtpSettings
from relay.ingest.handler import IngestHandler
from relay.ingest.protocol import SHUTDOWN_REPLY, Gate, RelaySMTP
from relay.logs import event

log = logging.getLogger("relay.ingest")


class ReloadingTlsContext:
    """One server SSLContext whose certificate follows its files.

    The files are checked (a stat each) when a session starts; when either changed, the
    chain is loaded again into the same context, so listeners already bound with it serve
    the new certificate to new handshakes (cert-manager renewals need no restart).
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[float, float] | None = None
        self.refresh()

    def refresh(self) -> None:
        stamp = (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)
        if stamp == self._stamp:
            return
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            if self._stamp is None:
                raise
            # A half-written renewal: keep serving the previous certificate.
            event(log, "tls.reload_failed", logging.WARNING, error=exc.__class__.__name__)
            return
        if self._stamp is not None:
            event(log, "tls.reloaded", cert_file=str(self.cert_file))
        self._stamp = stamp


class IngestServer:
    """The SMTP listeners of one process.

    The first process of a relay binds them; extra ingest processes (`smtp.processes`)
    are handed the same sockets (`inherited`) and accept from the same queues, so a
    connection waits for whichever process is free and none is lost when one exits.
    """

    PLAIN = "plain"
    IMPLICIT_TLS = "implicit-tls"

    def __init__(
        self,
        handler: IngestHandler,
        settings: SmtpSettings,
        gate: Gate,
        *,
        inherited: list[tuple[str, socket.socket]] | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.gate = gate
        self.inherited = inherited
        self.tls: ReloadingTlsContext | None = None
        if settings.tls.cert_file and settings.tls.key_file:
            self.tls = ReloadingTlsContext(settings.tls.cert_file, settings.tls.key_file)
        self._servers: list[asyncio.Server] = []
        # Sessions are copies of this one (RelaySMTP.fresh): made once, on first connection.
        self._prototype: RelaySMTP | None = None

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def implicit_tls_port(self) -> int:
        return int(self._servers[1].sockets[0].getsockname()[1])

    def _protocol(self) -> RelaySMTP:
        if self.tls is not None:
            self.tls.refresh()
        if self._prototype is None:
            self._prototype = self._new_session()
        return self._prototype.fresh()

    def _new_session(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler,
            gate=self.gate,
            settings=self.settings,
            data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.settings.hostname,
            ident="ESMTP smtp-relay",
            timeout=self.settings.idle_timeout.total_seconds(),
            tls_context=self.tls.context if self.tls else None,
            loop=asyncio.get_running_loop(),
        )

    def listening(self) -> list[tuple[str, int]]:
        """The bound sockets' descriptors, by kind, for extra processes to accept from."""
        kinds = (self.PLAIN, self.IMPLICIT_TLS)
        return [
            (kind, sock.fileno())
            for kind, server in zip(kinds, self._servers, strict=False)
            for sock in server.sockets
        ]

    async def start(self) -> None:
        if self.inherited is not None:
            await self._serve_inherited(self.inherited)
            return
        loop = asyncio.get_running_loop()
        host, tls = self.settings.host, self.settings.tls
        self._servers.append(
            await loop.create_server(
                self._protocol, host=host, port=self.settings.port, reuse_address=True
            )
        )
        event(log, "smtp.listening", host=host, port=self.port, starttls=self.tls is not None)
        if self.tls is not None and tls.implicit_port is not None:
            self._servers.append(
                await loop.create_server(
                    self._protocol,
                    host=host,
                    port=tls.implicit_port,
                    reuse_address=True,
                    ssl=self.tls.context,
                )
            )
            event(log, "smtp.listening", host=host, port=self.implicit_tls_port, tls="implicit")

    async def _serve_inherited(self, sockets: list[tuple[str, socket.socket]]) -> None:
        loop = asyncio.get_running_loop()
        for kind, sock in sockets:
            tls = None
            if kind == self.IMPLICIT_TLS:
                if self.tls is None:
                    raise RuntimeError("an implicit-TLS socket was passed without a certificate")
                tls = self.tls.context
            self._servers.append(await loop.create_server(self._protocol, sock=sock, ssl=tls))
            event(log, "smtp.listening", port=sock.getsockname()[1], kind=kind, inherited=True)

    async def drain(self, grace_s: float) -> None:
        """Refuse new transactions, let the ones in flight commit, then close every session."""
        self.gate.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.gate.sessions:
            for session in list(self.gate.sessions):
                if not session.in_transaction:
                    session.say_goodbye(self.gate.closed_reply or SHUTDOWN_REPLY)
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.gate.sessions):
            # Past the grace period: a transaction cut off here was never answered 250,
            # so the client still holds the message and will retry it.
            session.say_goodbye(self.gate.closed_reply or SHUTDOWN_REPLY)
        await self.stop()

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
            await server.wait_closed()
