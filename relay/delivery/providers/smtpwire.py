"""The SMTP client side of the smarthost provider, with command pipelining (RFC 2920).

A relay that drains a backlog spends most of a smarthost transaction waiting: MAIL, each
RCPT, DATA and the content are four or more round trips when each command waits for its
reply. A peer that offers PIPELINING takes MAIL, every RCPT and DATA in one write and
answers them together, so a transaction is two round trips and two writes. aiosmtplib, which
this replaced, cannot do that: it reads one reply per command it awaits and drops replies to
commands written ahead.

What the client does (RFC 5321 unless said): the greeting, EHLO with a fall back to HELO,
STARTTLS (RFC 3207) and EHLO again, AUTH PLAIN or LOGIN (RFC 4954), SIZE (RFC 1870), and a
transaction that returns one reply per recipient. Peers without PIPELINING get the same
transaction one command at a time. Left out: CHUNKING/BDAT, DSN parameters and CRAM-MD5.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

# The slowest link a content write is given time for, and the wait for the verdict after
# the content (RFC 5321 4.5.3.2.6: 10 minutes).
_SLOW_LINK_BYTES_S = 64 * 1024
_DATA_DONE_S = 600.0
# A reply line longer than this is not SMTP (RFC 5321 4.5.3.1.5 allows 512 octets).
_LINE_LIMIT = 8192
_BARE_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the lines after the code, joined with "\n"

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class SmtpError(Exception):
    """The peer could not be talked to as SMTP needs (bad reply, missing extension)."""


class PeerClosed(SmtpError):
    """The connection was closed or reset under us.

    `after_content`: the whole message had been written when the session ended, so the
    peer may have taken it; sending it again at once could deliver it twice.
    """

    after_content = False


class Misconfigured(SmtpError):
    """The peer and the settings do not fit (no STARTTLS where it is required, AUTH that
    would go in the clear): a person must change one of them."""


class Refused(SmtpError):
    """The peer refused a step of the session set-up (greeting, EHLO, STARTTLS, AUTH)."""

    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"{step} refused: {reply}")
        self.reply = reply


class AuthRefused(Refused):
    pass


class NotSent(SmtpError):
    """This message cannot be written to this peer; nothing was sent, the session is intact."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Where and how to connect. The password is never part of an error or a repr."""

    host: str
    port: int
    tls: str  # "starttls" (required), "opportunistic", "implicit" or "none"
    tls_context: ssl.SSLContext | None
    local_hostname: str
    timeout: float
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"Peer({self.host}:{self.port}, tls={self.tls})"


class SmtpConnection:
    """One session with a peer, reused for transaction after transaction."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self.extensions: dict[str, str] = {}
        self._broken = False
        # Whether the current transaction's content went out: after that, the peer may
        # have the message whatever goes wrong, and sending it again could deliver it twice.
        self.content_written = False

    @classmethod
    async def open(cls, peer: Peer) -> SmtpConnection:
        implicit = peer.tls == "implicit"
        async with asyncio.timeout(peer.timeout):
            reader, writer = await asyncio.open_connection(
                peer.host,
                peer.port,
                ssl=peer.tls_context if implicit else None,
                server_hostname=peer.host if implicit else None,
                limit=_LINE_LIMIT,
            )
        connection = cls(reader, writer, peer.timeout)
        try:
            await connection._set_up(peer)
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def usable(self) -> bool:
        """False once the session is in a state a next transaction must not inherit."""
        return not (
            self._broken or self._reader.at_eof() or self._writer.is_closing() or self._unread()
        )

    def _unread(self) -> bool:
        # Bytes nobody asked for (a 421 written while the session was idle, or text a man in
        # the middle put ahead of TLS) would be read as the next command's reply, and every
        # reply after it would answer the command before. asyncio has no public way to ask.
        return bool(self._reader._buffer)  # type: ignore[attr-defined]

    async def _set_up(self, peer: Peer) -> None:
        async with asyncio.timeout(peer.timeout):
            greeting = await self._reply()
        if greeting.code != 220:
            raise Refused("greeting", greeting)
        await self._hello(peer.local_hostname)

        # A required STARTTLS that is not offered stops here: falling back to plaintext
        # because a man in the middle stripped the capability is what "required" forbids.
        if peer.tls in ("starttls", "opportunistic"):
            if "STARTTLS" in self.extensions:
                reply = await self.command("STARTTLS")
                if reply.code != 220:
                    raise Refused("STARTTLS", reply)
                if self._unread():
                    # RFC 3207 4.2: nothing may follow the 220 in plaintext. What did was
                    # put there by someone else, to be taken as a reply from inside TLS.
                    raise SmtpError("plaintext followed the STARTTLS reply")
                context = peer.tls_context or ssl.create_default_context()
                async with asyncio.timeout(peer.timeout):
                    await self._writer.start_tls(context, server_hostname=peer.host)
                await self._hello(peer.local_hostname)
            elif peer.tls == "starttls":
                raise Misconfigured("the peer does not offer STARTTLS, which is required")

        if peer.username is not None:
            if peer.tls != "none" and self._writer.get_extra_info("ssl_object") is None:
                # "opportunistic" met a peer without STARTTLS (or an attacker who removed
                # it): the credentials are not sent in the clear. Only tls "none" does that.
                raise Misconfigured("the session is not encrypted; credentials are not sent")
            await self._authenticate(peer.username, peer.password or "")

    async def _hello(self, name: str) -> None:
        reply = await self.command(f"EHLO {name}")
        if reply.ok:
            self.extensions = _extensions(reply.text)
            return
        if not 500 <= reply.code < 600:
            raise Refused("EHLO", reply)
        # A peer that does not know EHLO: plain SMTP, no extensions.
        reply = await self.command(f"HELO {name}")
        if not reply.ok:
            raise Refused("HELO", reply)
        self.extensions = {}

    async def _authenticate(self, username: str, password: str) -> None:
        if "AUTH" not in self.extensions:
            raise SmtpError("the peer offers no AUTH, and credentials are configured")
        mechanisms = self.extensions["AUTH"].upper().split()
        if "PLAIN" in mechanisms:
            token = _b64(f"\0{username}\0{password}")
            reply = await self.command(f"AUTH PLAIN {token}", secret=True)
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command(_b64(username), secret=True)
            if reply.code == 334:
                reply = await self.command(_b64(password), secret=True)
        else:
            offered = " ".join(mechanisms) or "none"
            raise SmtpError(f"no AUTH mechanism in common (the peer offers {offered})")
        if reply.code != 235:
            raise AuthRefused("AUTH", reply)

    async def command(self, line: str, *, secret: bool = False) -> Reply:
        if not secret and _CONTROL.search(line):
            raise SmtpError("a command may not hold control characters")
        self._write(line.encode("utf-8") + b"\r\n")
        async with asyncio.timeout(self._timeout):
            return await self._reply()

    async def transaction(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        content: bytes,
        mail_options: Sequence[str] = (),
    ) -> list[Reply]:
        """Send one message; return, per recipient in order, the reply that decided it.

        A recipient's reply is the final reply after the content when it was accepted, and
        otherwise whatever refused it: its RCPT reply, or the MAIL or DATA reply.
        """
        self.content_written = False
        # A recipient no SMTP command can hold fails alone; the others are sent to.
        writable = [_writable(f"RCPT TO:<{address}>") for address in rcpt_tos]
        sendable = [address for address, ok in zip(rcpt_tos, writable, strict=True) if ok]
        if not sendable:
            return [_UNWRITABLE] * len(rcpt_tos)
        data = _data_block(content)
        mail = self._mail_command(mail_from, sendable, mail_options, len(data) - 3)
        if not _writable(mail):
            # No peer could take this sender. A verdict on the recipients would count against
            # them as hard bounces; the message waits instead, and fails at its max age.
            raise NotSent("the sender address cannot be written in an SMTP command")
        decided = iter(await self._send(mail, sendable, data))
        return [next(decided) if ok else _UNWRITABLE for ok in writable]

    async def _send(self, mail: str, rcpt_tos: list[str], data: bytes) -> list[Reply]:
        rcpts = [f"RCPT TO:<{address}>" for address in rcpt_tos]
        if self._unread():
            self._broken = True
            raise PeerClosed("the peer wrote while the session was idle")

        data_reply: Reply | None
        if "PIPELINING" in self.extensions:
            replies = await self._pipelined(mail, rcpts)
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply, rcpt_replies, data_reply = await self._one_by_one(mail, rcpts)

        accepted = mail_reply.ok and any(reply.ok for reply in rcpt_replies)
        if data_reply is not None and data_reply.code != 354 and data_reply.code < 400:
            # Only a 354 opens the content; a success here means the replies and commands
            # are out of step, and taking it as the final reply would call unsent mail sent.
            self._broken = True
            raise SmtpError(f"DATA answered {data_reply}, not 354")
        if data_reply is not None and data_reply.code == 354:
            if self._unread():
                # A reply already waiting would be taken as the verdict on the content.
                self._broken = True
                raise SmtpError("the peer wrote ahead of the content")
            if not accepted:
                # A peer that opened DATA with nothing to deliver to (RFC 2920 3.1): end the
                # message empty and let RSET drop it.
                final = await self._send_content(b".\r\n")
                await self._reset()
                return _verdicts(mail_reply, rcpt_replies, final)
            self.content_written = True
            try:
                final = await self._send_content(data)
            except PeerClosed as exc:
                exc.after_content = True
                raise
            if not 200 <= final.code < 600:
                self._broken = True  # a final reply that is no verdict: the session is lost
            return _verdicts(mail_reply, rcpt_replies, final)

        await self._reset()
        return _verdicts(mail_reply, rcpt_replies, data_reply)

    def _mail_command(
        self, mail_from: str, rcpt_tos: Sequence[str], options: Sequence[str], size: int
    ) -> str:
        wanted = [option.upper() for option in options]
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        # Without 8BITMIME the body goes as it is, as most MTAs send it: refusing it would
        # strand mail that the peer would have taken.
        if "8BITMIME" in self.extensions:
            params.extend(option for option in wanted if option.startswith("BODY="))
        # SMTPUTF8 asked for by the sender (its headers may need it) or by the addresses is
        # never dropped: the attempt fails, and routing may find a provider that offers it.
        needs_utf8 = not all(address.isascii() for address in (mail_from, *rcpt_tos))
        if needs_utf8 or "SMTPUTF8" in wanted:
            if "SMTPUTF8" not in self.extensions:
                raise NotSent("the message needs SMTPUTF8, which the peer does not offer")
            params.append("SMTPUTF8")
        return " ".join([f"MAIL FROM:<{mail_from}>", *params])

    async def _pipelined(self, mail: str, rcpts: list[str]) -> list[Reply]:
        lines = [mail, *rcpts, "DATA"]
        self._write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
        replies: list[Reply] = []
        loop = asyncio.get_running_loop()
        try:
            # Each reply within the timeout of its own, as if each command were sent alone.
            async with asyncio.timeout(None) as deadline:
                for _ in lines:
                    deadline.reschedule(loop.time() + self._timeout)
                    replies.append(await self._reply())
        except PeerClosed:
            # A peer that refuses and hangs up (a policy 554 to MAIL, say) has still given
            # its verdict: keep it, rather than retrying a refusal as a lost connection.
            decided = bool(replies) and not replies[0].ok
            all_refused = len(replies) > len(rcpts) and not any(r.ok for r in replies[1:])
            if not (decided or all_refused):
                raise
            mail_reply = replies[0]
            refusals = replies[1:] if all_refused else [mail_reply] * len(rcpts)
            return [mail_reply, *refusals[: len(rcpts)], Reply(554, "no DATA reply")]
        return replies

    async def _one_by_one(
        self, mail: str, rcpts: list[str]
    ) -> tuple[Reply, list[Reply], Reply | None]:
        mail_reply = await self.command(mail)
        if not mail_reply.ok:
            return mail_reply, [mail_reply] * len(rcpts), None
        rcpt_replies = [await self.command(line) for line in rcpts]
        if not any(reply.ok for reply in rcpt_replies):
            return mail_reply, rcpt_replies, None
        return mail_reply, rcpt_replies, await self.command("DATA")

    async def _send_content(self, block: bytes) -> Reply:
        self._write(block)
        # The write may take as long as the timeout plus the content at a slow link's rate,
        # and the verdict after it as long as RFC 5321 4.5.3.2 allows the peer (10 minutes,
        # within the router's attempt_timeout): a large message must not time out while the
        # peer is still reading or scanning it.
        async with asyncio.timeout(self._timeout + len(block) / _SLOW_LINK_BYTES_S):
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                self._broken = True
                raise PeerClosed(f"connection lost: {exc.__class__.__name__}") from None
        async with asyncio.timeout(max(self._timeout, _DATA_DONE_S)):
            return await self._reply()

    async def _reset(self) -> None:
        # A session whose RSET fails is not reused: the next message must not inherit a
        # half-open transaction.
        if self._broken:
            return
        try:
            reply = await self.command("RSET")
        except (SmtpError, OSError, TimeoutError):
            self._broken = True
            return
        if not reply.ok:
            self._broken = True

    async def noop(self) -> Reply:
        return await self.command("NOOP")

    async def quit(self) -> None:
        """Say goodbye if the peer still listens, then close; never raises."""
        try:
            if self.usable:
                self._write(b"QUIT\r\n")
                async with asyncio.timeout(min(self._timeout, 2.0)):
                    await self._reply()
        except (SmtpError, OSError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._broken = True
        self._writer.close()

    def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise PeerClosed("connection closed")
        self._writer.write(data)

    async def _reply(self) -> Reply:
        lines: list[str] = []
        code = b""
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                self._broken = True
                raise PeerClosed("connection closed by the peer") from None
            except asyncio.LimitOverrunError:
                self._broken = True
                raise SmtpError("a reply line longer than SMTP allows") from None
            except ConnectionError as exc:
                self._broken = True
                raise PeerClosed(f"connection lost: {exc.__class__.__name__}") from exc
            if not (line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n")):
                self._broken = True
                shown = line[:80].decode("ascii", "replace").rstrip()
                raise SmtpError(f"not an SMTP reply: {shown!r}")
            if lines and line[:3] != code:
                self._broken = True
                raise SmtpError("a multi-line reply changed its code")
            code = line[:3]
            lines.append(line[4:].strip().decode("utf-8", "replace"))
            if line[3:4] != b"-":
                break
        reply = Reply(int(code), "\n".join(lines))
        if reply.code == 421:
            # The peer is closing the session (RFC 5321 3.8), whatever the command was: the
            # message is not refused, the session is over.
            self._broken = True
            raise PeerClosed(f"the peer closed the session: {reply}")
        return reply


def _extensions(ehlo_text: str) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the first line is the greeting."""
    found = {}
    for line in ehlo_text.split("\n")[1:]:
        # Old peers write "AUTH=LOGIN PLAIN" beside or instead of "AUTH LOGIN PLAIN".
        keyword, _, params = re.sub(r"^AUTH=", "AUTH ", line, flags=re.I).partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


def _verdicts(mail: Reply, rcpts: list[Reply], after: Reply | None) -> list[Reply]:
    if not mail.ok:
        return [mail] * len(rcpts)
    return [after if rcpt.ok and after is not None else rcpt for rcpt in rcpts]


def _data_block(content: bytes) -> bytes:
    """The content as DATA carries it: CRLF line ends, leading dots doubled, ending '.'."""
    # Stored mail is already CRLF; only a bare CR or LF costs the regular expression.
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        content = _BARE_LINE_ENDS.sub(b"\r\n", content)
    if content.startswith(b"."):
        content = b"." + content
    content = content.replace(b"\r\n.", b"\r\n..")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


def _writable(line: str) -> bool:
    """Whether a command line can go on the wire: no control characters, and no undecodable
    bytes (kept as surrogates when they came in)."""
    if _CONTROL.search(line):
        return False
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_UNWRITABLE = Reply(553, "5.1.3 the address cannot be written in an SMTP command (not sent)")


def _b64(text: str) -> str:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        # The error would carry the text, credentials and all: say only what is wrong.
        raise SmtpError("the credentials are not valid text") from None
    return base64.b64encode(raw).decode("ascii")
