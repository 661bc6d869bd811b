"""The SMTP protocol object: aiosmtpd's, with the relay's wire rules.

What this layer adds to aiosmtpd (pinned to 1.4.x: a few of its private hooks are used):
- RFC 2034 enhanced status codes on every reply aiosmtpd writes itself;
- line ends: a bare CR or LF anywhere in a session, command or message, ends the session
  with 554 5.5.2. RFC 5321 section 2.3.8 forbids them, and accepting them is what SMTP
  smuggling exploits (a message whose "end of data" one MTA sees and another does not).
  Rejecting rather than normalising keeps one reading of every byte stream; nothing from
  the refused transaction is queued, so the client still owns the message;
- limits on connections in all and per client, and on error replies per session;
- source-routed addresses (`<@a,@b:user@c>`) refused before aiosmtpd's parser drops the
  route silently;
- drain: a closed gate answers new sessions 421 and lets open transactions finish.
"""

from __future__ import annotations

import asyncio
import logging
import re
import types
from collections import Counter
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP

from relay import metrics
from relay.config import SmtpSettings
from relay.ingest.policy import in_networks
from relay.ingest.tally import TOO_MANY, TOO_MANY_FROM_YOU, SessionTally

_ENHANCED = {
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.5.3",
    "454": "4.7.0",
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
# The address form nearly every client sends: <dot-atom@host-name> with ASCII atoms.
# aiosmtpd's general parser (the email package's RFC 5322 grammar) costs about a tenth of
# a message's CPU time; this path gives the same answer for this form, the rest falls back.
_PLAIN_ADDRESS = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(?: +(.*))?"
)
# Parameters real clients send that aiosmtpd would answer with 555: Outlook's AUTH=<>
# (RFC 4954 section 5) and the DSN parameters of RFC 3461. Accepted and kept with the
# message; the relay does not offer DSN itself.
_TOLERATED_PARAMETERS = ("AUTH", "ENVID", "RET", "ORCPT", "NOTIFY")

# aiosmtpd logs every command line, addresses included, at INFO ("mail.log"): for health
# mail an address is health data, so that logger only ever speaks of warnings.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# The longest content line aiosmtpd's line_length_limit (1001 with its CRLF) lets through.
_LONGEST_LINE = 999
# How far DATA's reader looks for the end of the content before taking what it has.
_STRETCH = 2**16

SHUTDOWN_REPLY = "421 4.3.2 Service shutting down, try another server"
BARE_LINE_END_REPLY = (
    "554 5.5.2 Bare CR or LF received; lines must end with CRLF (RFC 5321 section 2.3.8)"
)


class Gate:
    """Whether new SMTP transactions may start, and the sessions currently open."""

    def __init__(self, tally: SessionTally | None = None) -> None:
        self.closed_reply: str | None = None
        self.sessions: set[RelaySMTP] = set()
        # With smtp.processes above 1: the sessions of every process, for the limits.
        self.tally = tally
        self._counted: set[RelaySMTP] = set()

    @property
    def open(self) -> bool:
        return self.closed_reply is None

    def close(self, reply: str = SHUTDOWN_REPLY) -> None:
        self.closed_reply = reply

    def reopen(self) -> None:
        self.closed_reply = None

    def per_peer(self) -> Counter[str]:
        return Counter(session.peer_ip for session in self.sessions)

    def admit(self, session: RelaySMTP, settings: SmtpSettings) -> str | None:
        """None if the session may go on, else the 421 that ends it."""
        if self.tally is not None:
            refusal, counted = self.tally.admit(
                session.peer_ip, settings.max_connections, settings.max_connections_per_ip
            )
            if counted:
                self._counted.add(session)
            return refusal
        # This process's own sessions, the new one included.
        if len(self.sessions) > settings.max_connections:
            return TOO_MANY
        if self.per_peer()[session.peer_ip] > settings.max_connections_per_ip:
            return TOO_MANY_FROM_YOU
        return None

    def release(self, session: RelaySMTP) -> None:
        self.sessions.discard(session)
        if session in self._counted:
            self._counted.discard(session)
            assert self.tally is not None
            self.tally.release(session.peer_ip)


class RelaySMTP(SMTP):
    """One SMTP session."""

    def __init__(self, handler: Any, *, gate: Gate, settings: SmtpSettings, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gate = gate
        self.settings = settings
        self.peer_ip = ""
        self.errors = 0
        self._in_ehlo = False
        self._pending_cr = False
        self._refused = False
        self._hung_up = False

    def fresh(self) -> RelaySMTP:
        """A new session configured like this one, made without aiosmtpd's introspection.

        aiosmtpd's __init__ collects the hook methods of the session and of the handler with
        inspect.getmembers() and dir() for every connection: a sixth of the relay's CPU time
        when each message comes on its own connection (docs/benchmarks.md). The hooks are
        the same for every session of a server, so the server builds one prototype that
        never serves and copies it per connection: the copy gets its own stream, and every
        method the prototype had bound to itself is bound to the copy.
        """
        session = object.__new__(type(self))
        session.__dict__.update(
            {name: _rebind(value, self, session) for name, value in vars(self).items()}
        )
        asyncio.StreamReaderProtocol.__init__(
            session,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=session._cb_client_connected,
            loop=self.loop,
        )
        return session

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    # Connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.peer_ip:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        self.gate.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.gate.release(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        refusal = self._admission()
        if refusal is not None:
            self.say_goodbye(refusal)
            return
        # AUTH needs TLS first, except for networks explicitly trusted with plaintext.
        self._auth_require_tls = not in_networks(
            self.peer_ip, self.settings.plaintext_auth_networks
        )
        assert self.transport is not None and self.session is not None
        if self.transport.get_extra_info("ssl_object") is not None:
            # The implicit-TLS port: encrypted from the first byte, as after STARTTLS.
            self._auth_require_tls = False
            self.session.ssl = {"cipher": self.transport.get_extra_info("cipher")}
        await super()._handle_client()

    def _admission(self) -> str | None:
        if not self.gate.open:
            # A draining relay still answers, so the client tries its next server at once
            # rather than waiting for a connect timeout.
            return self.gate.closed_reply or SHUTDOWN_REPLY
        return self.gate.admit(self, self.settings)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._bare_line_end(data):
            self._refused = True
            self.say_goodbye(BARE_LINE_END_REPLY)
            return
        super().data_received(data)

    def _bare_line_end(self, data: bytes) -> bool:
        if not data:
            return False
        if self._pending_cr and data[:1] != b"\n":
            return True
        # A CR at the end of one chunk and its LF at the start of the next are one CRLF.
        start = 1 if self._pending_cr else 0
        self._pending_cr = data.endswith(b"\r")
        end = len(data) - 1 if self._pending_cr else len(data)
        # Every CR and every LF belongs to a CRLF exactly when the three counts agree;
        # bytes.count runs at memory speed, where a regular expression took 8 % of ingest.
        pairs = data.count(b"\r\n", start, end)
        return data.count(b"\r", start, end) != pairs or data.count(b"\n", start, end) != pairs

    # Replies

    async def push(self, status: Any) -> None:
        if self._hung_up:
            return
        # RFC 2034: the greeting and EHLO/HELO replies carry no enhanced codes.
        if isinstance(status, str) and not self._in_ehlo and not status.startswith("220"):
            status = with_enhanced_code(status)
        text = status if isinstance(status, str) else ""
        if text.startswith("421"):
            # 421 means the server closes the channel (RFC 5321 section 3.8).
            self._write(text)
            self.hang_up()
            return
        _count(text)
        await super().push(status)
        if text.startswith("5"):
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                await self.push("421 4.7.0 Too many errors, closing connection")

    def _write(self, reply: str) -> None:
        _count(reply)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]

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
        """Stop reading commands, write nothing more, close once what was written is sent.

        Commands the client pipelined behind the last reply are not run: a session being
        closed must not go on to commit a message nobody will hear a reply for.
        """
        if self._hung_up:
            return
        self._hung_up = True
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.loop.call_soon(self.transport.close)

    def say_goodbye(self, reply: str) -> None:
        """Unsolicited reply (421 per RFC 5321 section 3.8, or a protocol violation), close."""
        if not self._hung_up:
            self._write(reply)
            self.hang_up()

    # DATA

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the content in stretches instead of line by line.

        aiosmtpd awaits one `readuntil(b"\\r\\n")` per line and joins the lines again: a
        tenth of the relay's CPU for a 4 KiB message (docs/benchmarks.md). Here the
        content up to the terminating dot line comes in one `readuntil`, and a line that
        starts with a dot, whose dot must be removed (RFC 5321 section 4.5.2), costs one
        more. The replies and limits are aiosmtpd's: 552 past `data_size_limit`, 500 for a
        line longer than `line_length_limit`, both after the whole content has been read.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, problem = await self._read_content()
        except asyncio.CancelledError:
            self._writer.close()
            raise
        if problem is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(problem)
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_content(self) -> tuple[bytes, str | None]:
        """The content with dots unstuffed, or a reply saying why it is refused."""
        reader = self._reader
        limit = self.data_size_limit or 0
        parts: list[bytes] = []
        size = 0
        too_long = False
        # The reader's limit is one line; a stretch of lines needs more room.
        line_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(line_limit, _STRETCH)  # type: ignore[attr-defined]
        try:
            while True:
                # At the start of a line. A dot here is the end, or a stuffed dot to drop.
                first = await reader.readexactly(1)
                if first == b".":
                    line, taken = await self._read_stretch(b"\r\n", limit - size - 1)
                    if taken == 2:  # the line is CRLF alone, whether kept or not
                        break
                    size += 1 + taken
                    too_long = too_long or taken + 1 > self.line_length_limit
                    if line is not None and not too_long:
                        parts.append(line)
                    continue
                # Up to the dot line: every later line that starts with a dot is preceded
                # by CRLF, so the end is the first CRLF dot CRLF, and the CRLF before the
                # dot belongs to the content.
                stretch, taken = await self._read_stretch(b"\r\n.\r\n", limit - size + 2)
                size += 1 + taken - 3  # the dot line is not content
                if stretch is not None:
                    stretch = first + stretch
                    # Splitting is a twentieth of a regular expression's time here (a
                    # search without anchors was a third of ingest's CPU).
                    too_long = too_long or (
                        len(stretch) > _LONGEST_LINE
                        and max(map(len, stretch.split(b"\r\n"))) > _LONGEST_LINE
                    )
                    parts.append(stretch[:-3].replace(b"\r\n.", b"\r\n"))
                break
        except asyncio.IncompleteReadError:
            # The client hung up mid-content: nothing was accepted, nothing to answer.
            self._writer.close()
            raise asyncio.CancelledError from None
        finally:
            reader._limit = line_limit  # type: ignore[attr-defined]
        if limit and size > limit:
            return b"", "552 Error: Too much mail data"
        if too_long:
            return b"", "500 Line too long (see RFC5321 4.5.3.1.6)"
        return b"".join(parts), None

    async def _read_stretch(self, end: bytes, room: int) -> tuple[bytes | None, int]:
        """Bytes up to and including `end`, and their count; None once past `room`.

        Past the reader's limit the bytes come in pieces. Once they exceed `room` (the
        message's size limit) they are counted and dropped, so an oversized message
        never sits in memory whole; its 552 comes after the terminating dot.
        """
        pieces: list[bytes] = []
        taken = 0
        keep = True
        while True:
            try:
                piece = await self._reader.readuntil(end)
            except asyncio.LimitOverrunError as overrun:
                # No `end` within the limit: what cannot be part of it is taken now.
                piece = await self._reader.readexactly(overrun.consumed)
                done = False
            else:
                done = True
            taken += len(piece)
            if keep and self.data_size_limit and taken > room:
                keep = False
                pieces.clear()
            if keep:
                pieces.append(piece)
            if done:
                return (b"".join(pieces) if keep else None), taken

    # Parsing

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parser accepts a source route and returns only the final mailbox;
        # refuse it instead (RFC 5321 section 4.1.2: routes are to be ignored, and a relay
        # that honours them is open).
        if arg and arg.lstrip().startswith("<@"):
            return None, None
        if arg and (plain := _PLAIN_ADDRESS.fullmatch(arg)):
            return plain[1], plain[2] or ""
        return super()._getaddr(arg)

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        result: dict[str, str | bool] | None = super()._getparams(params)
        if result is None:
            return None
        for name in _TOLERATED_PARAMETERS:
            result.pop(name, None)
        return result


def _rebind(value: Any, old: object, new: object) -> Any:
    """value, with methods bound to `old` bound to `new`, in dicts and named tuples too."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, dict):
        return {key: _rebind(item, old, new) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_rebind(item, old, new) for item in value))
    if isinstance(value, list | set):
        return type(value)(_rebind(item, old, new) for item in value)
    return value


def _count(reply: str) -> None:
    if reply[:1] in ("2", "4", "5"):
        metrics.smtp_replies_total.labels(reply[0] + "xx").inc()


def with_enhanced_code(status: str) -> str:
    lines = status.split("\r\n")
    fixed = []
    for line in lines:
        code = line[:3]
        if (
            code in _ENHANCED
            and len(line) > 3
            and line[3] in " -"
            and not _HAS_ENHANCED.match(line)
        ):
            line = f"{code}{line[3]}{_ENHANCED[code]} {line[4:]}"
        fixed.append(line)
    return "\r\n".join(fixed)
