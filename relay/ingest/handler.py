"""aiosmtpd handler hooks: authentication, envelope policy, limits and the durable commit.

The 250 reply to DATA is the relay's promise that the message will be delivered or
bounced. It is sent only after the message and all its recipients are committed in one
transaction; if that fails the client hears 451 and keeps its copy.
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.smtp import AuthResult, Envelope, Session

from relay import metrics
from relay.bounces import metrics as bounce_metrics
from relay.bounces.model import MessageBusy, SuppressionReason
from relay.bounces.suppression import REFUSALS, BounceProcessor
from relay.clock import utcnow
from relay.coalesce import Coalescer
from relay.config import RateLimits, Settings
from relay.ids import new_queue_id
from relay.ingest.policy import (
    AddressError,
    Authenticator,
    Identity,
    in_networks,
    normalise,
    sender_allowed,
)
from relay.ingest.protocol import SHUTDOWN_REPLY, Gate, RelaySMTP
from relay.ingest.trace import protocol_name, received_header, subject_of
from relay.limits import OverrideCache, QuotaCharge, QuotaExceeded, RateLimiter
from relay.logs import event, hash_address
from relay.queue.group import GroupCommit
from relay.queue.model import NewMessage
from relay.queue.sql import SqlStore

log = logging.getLogger("relay.ingest")


def _not_login_data_noise(record: logging.LogRecord) -> bool:
    # aiosmtpd 1.4 sets its deprecated Session.login_data itself after every successful
    # AUTH, and warns about its own use each time: a WARNING per login, nobody's to act on.
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_not_login_data_noise)

AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_REQUIRED = "530 5.7.0 Authentication required"


@dataclass(frozen=True)
class AuthenticatedUser:
    """What a successful AUTH leaves on the session: the login, never the password."""

    login: str
    workspace_id: str


class IngestHandler:
    def __init__(
        self,
        store: SqlStore,
        settings: Settings,
        *,
        gate: Gate,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.smtp = settings.smtp
        self.gate = gate
        self.on_queued = on_queued
        self.authenticator = Authenticator(settings)
        self.limiter = RateLimiter(share=settings.smtp.processes)
        self.overrides = OverrideCache()
        self.bounces = BounceProcessor(store, settings)
        self.commits = GroupCommit(store)
        # Every RCPT asks the database whether its address is suppressed: under load the
        # questions of concurrent sessions go as one query per workspace (relay.coalesce).
        self._lookups: Coalescer[tuple[str, str], SuppressionReason | None] = Coalescer(
            self._look_up
        )

    # Session

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

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default reply would quote the exception text to the client.
        log.error("smtp.exception", extra={"error": error.__class__.__name__}, exc_info=error)
        return "451 4.3.0 Internal error, try again later"

    # Authentication (RFC 4954): PLAIN and LOGIN, only over TLS unless configured otherwise.

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        blob = args[1].encode() if len(args) > 1 else await server.challenge_auth("", False)
        if not isinstance(blob, bytes):
            return AuthResult(success=False, handled=True)
        try:
            _authzid, login, password = b64decode(blob, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad PLAIN data")
        return await self._authenticate(server, login, password)

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        login = (
            _b64(args[1].encode()) if len(args) > 1 else await server.challenge_auth("Username:")
        )
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password)

    async def _authenticate(self, server: RelaySMTP, login: bytes, password: bytes) -> AuthResult:
        name = login.decode("utf-8", "replace")
        identity = await self.authenticator.verify(name, password)
        reason = None if identity else "bad credentials"
        if identity is not None:
            workspace = self.settings.workspace(identity.workspace_id)
            if workspace.client_networks and not in_networks(
                server.peer_ip, workspace.client_networks
            ):
                identity, reason = None, "client network not allowed for this workspace"
        if identity is None:
            await self._audit("smtp.auth", "failure", name, server.peer_ip, reason)
            event(log, "smtp.auth_failed", logging.WARNING, client=server.peer_ip, reason=reason)
            return AuthResult(success=False, handled=False, message=AUTH_INVALID)
        return AuthResult(success=True, auth_data=AuthenticatedUser(name, identity.workspace_id))

    # Envelope

    def identity(self, server: RelaySMTP, session: Session) -> Identity | None:
        if session.authenticated and isinstance(session.auth_data, AuthenticatedUser):
            return Identity(session.auth_data.workspace_id, session.auth_data.login)
        if in_networks(server.peer_ip, self.smtp.trusted_networks):
            return Identity(self.smtp.workspace, None)
        return None

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.gate.open:
            return self.gate.closed_reply or SHUTDOWN_REPLY
        identity = self.identity(server, session)
        if identity is None:
            if self.bounces.verp is None:
                return AUTH_REQUIRED
            # Reports on mail we sent come from any MTA: the one exception to "authenticate
            # or be trusted". RCPT then accepts only our VERP addresses (never relayed).
            return self._report_sender(envelope, address, mail_options)
        workspace = self.settings.workspace(identity.workspace_id)
        smtputf8 = "SMTPUTF8" in mail_options
        if address == "<>":
            # The null reverse-path (RFC 5321 4.5.5) is for notifications; an application
            # could use it to dodge its sender domains, so only trusted networks may.
            if identity.user is not None and workspace.sender_domains:
                return "553 5.7.1 Null sender not allowed for this workspace"
        else:
            try:
                address = normalise(address, smtputf8=smtputf8, role="sender")
            except AddressError as refused:
                return str(refused.args[0])
            if not sender_allowed(workspace, address):
                return f"553 5.7.1 Sender domain not allowed for workspace {identity.workspace_id}"

        limits = await self._limits(identity.workspace_id)
        empty = self.limiter.take(limits, identity.workspace_id, str(identity))
        if empty is not None:
            metrics.rate_limit_rejections_total.labels(identity.workspace_id, empty).inc()
            event(
                log,
                "smtp.rate_limited",
                logging.WARNING,
                workspace=identity.workspace_id,
                bucket=empty,
            )
            return (
                f"451 4.7.1 Rate limit exceeded ({empty} bucket) in workspace"
                f" {identity.workspace_id}; try again later"
            )
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
        try:
            address = normalise(address, smtputf8=envelope.smtp_utf8, role="recipient")
        except AddressError as refused:
            return str(refused.args[0])
        if address in envelope.rcpt_tos:
            # A repeated RCPT for the same mailbox is accepted but delivered once.
            return "250 2.1.5 Recipient ok (duplicate ignored)"
        if len(envelope.rcpt_tos) >= self.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        verp = self.bounces.verp
        if verp is not None and verp.owns(address):
            # The bounce domain is final here: a report is processed, never relayed, and
            # only to addresses whose tag we made (else anyone could suppress anyone).
            if verp.parse(address) is None:
                return "550 5.1.1 Unknown bounce address"
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Bounce address ok"
        identity = self.identity(server, session)
        if identity is None:
            return AUTH_REQUIRED
        suppressed = await self._suppression(identity.workspace_id, address)
        if suppressed is not None and self.settings.bounces.suppressed_action == "refuse":
            bounce_metrics.suppressed_rcpt_total.labels("refused").inc()
            return suppressed
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if suppressed is not None:
            bounce_metrics.suppressed_rcpt_total.labels("recorded").inc()
            return "250 2.1.5 Recipient suppressed: recorded as bounced, not sent"
        return "250 2.1.5 Recipient ok"

    # Commit

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        original = envelope.original_content or b""
        reports = [a for a in envelope.rcpt_tos if self.bounces.verp and self.bounces.verp.owns(a)]
        if reports:
            refused = await self._take_report(reports, original, server.peer_ip)
            if refused is not None or len(reports) == len(envelope.rcpt_tos):
                return refused or "250 2.0.0 Ok: report received"
        identity = self.identity(server, session)
        if identity is None:  # pragma: no cover - MAIL and RCPT already required it
            return AUTH_REQUIRED
        queue_id = new_queue_id()
        now = utcnow()
        recipients = tuple(a for a in envelope.rcpt_tos if a not in reports)
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        trace = received_header(
            helo=session.host_name,
            peer_ip=server.peer_ip,
            hostname=self.smtp.hostname,
            protocol=protocol_name(
                extended=session.extended_smtp,
                tls=session.ssl is not None,
                authenticated=bool(session.authenticated),
                utf8=envelope.smtp_utf8,
            ),
            queue_id=queue_id,
            recipients=recipients,
        )
        limits = await self._limits(identity.workspace_id)
        quota = None
        if limits.workspace_daily is not None or limits.per_user_daily is not None:
            quota = QuotaCharge(
                workspace_id=identity.workspace_id,
                user_key=identity.user or sender,
                day=now.date().isoformat(),
                recipients=len(recipients),
                workspace_daily=limits.workspace_daily,
                per_user_daily=limits.per_user_daily,
            )
        message = NewMessage(
            id=queue_id,
            workspace_id=identity.workspace_id,
            from_email=sender,
            recipients=recipients,
            subject=subject_of(original),
            content=trace + original,
            queued_at=now,
            client_address=server.peer_ip,
            mail_options=tuple(envelope.mail_options),
            quota=quota,
            suppressed=await self._recorded(identity.workspace_id, recipients),
        )
        try:
            await self.commits.enqueue(message)
        except QuotaExceeded as exceeded:
            metrics.rate_limit_rejections_total.labels(
                identity.workspace_id, str(exceeded.args[0])
            ).inc()
            event(
                log,
                "smtp.quota_exceeded",
                logging.WARNING,
                workspace=identity.workspace_id,
                quota=exceeded.args[0],
            )
            return (
                f"451 4.7.1 Daily quota {exceeded.args[0]} reached for workspace"
                f" {identity.workspace_id}; try again tomorrow or ask for a raise"
            )
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
        metrics.smtp_messages_accepted_total.labels(identity.workspace_id).inc()
        event(
            log,
            "smtp.queued",
            message_id=queue_id,
            workspace=identity.workspace_id,
            user=identity.user,
            sender=self._show(sender) if sender else "",
            recipients=len(recipients),
            size=len(message.content),
            client=server.peer_ip,
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"

    # Bounces (relay/bounces)

    def _report_sender(self, envelope: Envelope, address: str, mail_options: list[str]) -> str:
        if address != "<>":
            try:
                address = normalise(address, smtputf8="SMTPUTF8" in mail_options, role="sender")
            except AddressError as refused:
                return str(refused.args[0])
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def _suppression(self, workspace_id: str, address: str) -> str | None:
        """The 550 for a suppressed address, or None."""
        try:
            reason = await self._lookups.submit((workspace_id, address))
        except Exception as exc:
            # Open, not closed: without the database DATA answers 451 anyway, and a
            # suppression missed once costs one more bounce, not a lost message.
            event(log, "smtp.suppression_check_failed", logging.WARNING, error=repr(exc)[:200])
            return None
        return REFUSALS[reason] if reason is not None else None

    async def _look_up(self, questions: list[tuple[str, str]]) -> list[SuppressionReason | None]:
        by_workspace: dict[str, set[str]] = {}
        for workspace_id, address in questions:
            by_workspace.setdefault(workspace_id, set()).add(address)
        # By lower case, as the store compares: two sessions may spell one mailbox apart.
        found: dict[tuple[str, str], SuppressionReason] = {}
        for workspace_id, addresses in by_workspace.items():
            reasons = await self.bounces.suppressed(workspace_id, sorted(addresses))
            found.update({(workspace_id, a.lower()): r for a, r in reasons.items()})
        return [found.get((workspace_id, a.lower())) for workspace_id, a in questions]

    async def _recorded(
        self, workspace_id: str, recipients: tuple[str, ...]
    ) -> tuple[tuple[str, str], ...]:
        """suppressed_action record: the recipients to store as BOUNCED, with the reason."""
        if self.settings.bounces.suppressed_action != "record":
            return ()
        try:
            found = await self.bounces.suppressed(workspace_id, recipients)
        except Exception:
            return ()  # the enqueue that follows reports the outage
        return tuple(
            (a, f"suppressed ({found[a].value}), not sent") for a in recipients if a in found
        )

    async def _take_report(self, addresses: list[str], raw: bytes, peer: str) -> str | None:
        """Process a report sent to our VERP addresses; None when it is taken."""
        verp = self.bounces.verp
        assert verp is not None
        targets = [t for a in addresses if (t := verp.parse(a)) is not None]
        try:
            result = await self.bounces.process_inbound(targets, raw)
        except MessageBusy:
            return "451 4.3.0 Message being delivered right now, try again later"
        except Exception as exc:
            event(log, "bounce.report_failed", logging.ERROR, error=repr(exc)[:300])
            return "451 4.3.0 Report could not be recorded, try again later"
        event(
            log,
            "bounce.report",
            client=peer,
            format=result.format,
            applied=len(result.applied),
            duplicate=result.duplicate,
        )
        return None

    # Helpers

    def _show(self, address: str) -> str:
        """An address as logs may carry it (log.addresses): hashed unless configured plain."""
        return address if self.settings.log.addresses == "plain" else hash_address(address)

    async def _limits(self, workspace_id: str) -> RateLimits:
        now = utcnow()
        if self.overrides.stale():
            try:
                self.overrides.load(await self.store.overrides(now=now))
            except Exception as exc:
                event(
                    log,
                    "limits.override_load_failed",
                    logging.WARNING,
                    error=exc.__class__.__name__,
                )
                self.overrides.load(self.overrides.current())
        base = self.settings.workspace(workspace_id).limits
        return self.overrides.effective(workspace_id, base, now)

    async def _audit(
        self, action: str, outcome: str, user: str | None, ip: str, detail: str | None
    ) -> None:
        try:
            await self.store.audit(
                action=action, outcome=outcome, user_id=user, ip_address=ip, detail=detail
            )
        except Exception as exc:
            event(
                log,
                "audit.write_failed",
                logging.ERROR,
                action=action,
                error=exc.__class__.__name__,
            )


def _b64(blob: bytes) -> bytes | None:
    try:
        return b64decode(blob, validate=True)
    except binascii.Error:
        return None
