"""Applying bounces to the queue and the suppression list; the RCPT check.

`BounceProcessor` is the one object the rest of the relay talks to: ingest (the RCPT
check, reports arriving at VERP addresses), delivery (replies at send time, the VERP
return path), the HTTP webhook and the admin API and CLI. Every change it makes goes
through `SqlStore.apply_bounces`, one transaction per report or webhook call.

The lifecycle (runbook 4.3): a hard bounce makes an ACTIVE address BOUNCED; the
`hard_bounce_threshold`-th hard bounce in a row (3) makes it INACTIVE, and so does a
spam complaint or an operator. Mail to an INACTIVE address is refused at RCPT with a
550 that says why, or - `suppressed_action: record` - accepted and recorded as BOUNCED
without being sent; either way the client is told or the record shows it, never silence.
A soft bounce sends the message to that recipient again after `soft_bounce_retry` (24 h)
while the message is younger than `delivery.max_age`; after that it counts as bounced.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from relay.bounces import metrics
from relay.bounces.classify import classify, reply_class, tidy
from relay.bounces.dsn import RecipientReport, Report, parse_report
from relay.bounces.model import (
    Applied,
    ApplyResult,
    BounceEvent,
    BouncePolicy,
    BounceType,
    EventKind,
    OnceKey,
    Source,
    SuppressionReason,
)
from relay.bounces.verp import VerpCodec, VerpTarget, codec
from relay.clock import utcnow
from relay.config import Settings
from relay.logs import event, hash_address
from relay.queue.sql import SqlStore

log = logging.getLogger("relay.bounces")

REFUSALS = {
    SuppressionReason.HARD_BOUNCE: "550 5.1.1 Recipient suppressed after repeated hard bounces",
    SuppressionReason.COMPLAINT: "550 5.7.1 Recipient suppressed after a spam complaint",
    SuppressionReason.MANUAL: "550 5.7.1 Recipient suppressed by the workspace's suppression list",
}
# A report delivered twice (the sender lost our 250) is applied once.
_REPORT_MEMORY = timedelta(days=7)


def policy_of(settings: Settings) -> BouncePolicy:
    return BouncePolicy(
        hard_bounce_threshold=settings.bounces.hard_bounce_threshold,
        soft_bounce_retry_s=settings.bounces.soft_bounce_retry.total_seconds(),
        max_age_s=settings.delivery.max_age.total_seconds(),
    )


@dataclass(frozen=True)
class InboundResult:
    """What became of one message received at VERP addresses."""

    format: str  # dsn, prose, none
    applied: tuple[Applied, ...]
    duplicate: bool = False


class BounceProcessor:
    def __init__(self, store: SqlStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.policy = policy_of(settings)
        self.verp: VerpCodec | None = codec(settings.bounces)

    # Delivery

    def return_path(self, *, message_id: str, original: str, row_id: int | None = None) -> str:
        """The envelope sender for a send: the VERP address, or `original` unchanged when
        VERP is off or the original is the null sender (notifications never get one)."""
        if self.verp is None or not original or original == "<>":
            return original
        return self.verp.address(message_id, row_id)

    async def record_send_failure(
        self,
        *,
        workspace_id: str,
        address: str,
        detail: str,
        status: str | None = None,
        now: datetime | None = None,
    ) -> Applied | None:
        """Count a recipient a provider refused with a 5xx at send time.

        Only SMTP-style replies count ("550 5.1.1 ..."): an API refusing the message itself
        (HTTP 400, too big) says nothing about the address. Returns None when not counted.
        The message's own row is the delivery engine's to record (FAILED, with the reply).
        """
        verdict = classify(status, detail, failed=True)
        if reply_class(detail) != "5" and not (verdict.status or "").startswith("5"):
            return None
        bounce = BounceEvent(
            source=Source.SEND,
            kind=EventKind(verdict.bounce_type.value),
            address=address,
            workspace_id=workspace_id,
            status=verdict.status,
            reason=tidy(detail, address=address),
            touch_message=False,
        )
        result = await self.apply([bounce], now=now)
        return result.applied[0] if result.applied else None

    # Applying

    async def apply(
        self,
        events: Sequence[BounceEvent],
        *,
        once: Sequence[OnceKey] = (),
        now: datetime | None = None,
    ) -> ApplyResult:
        result = await self.store.apply_bounces(
            events, policy=self.policy, now=now or utcnow(), once=once
        )
        for applied in result.applied:
            self._observe(applied)
        return result

    def _observe(self, applied: Applied) -> None:
        bounce = applied.event
        if not applied.matched:
            event(
                log,
                "bounce.unmatched",
                logging.WARNING,
                source=bounce.source.value,
                kind=bounce.kind.value,
                message_id=bounce.message_id,
            )
            return
        metrics.bounces_total.labels(bounce.kind.value.lower(), bounce.source.value).inc()
        if applied.suppressed_now is not None:
            metrics.suppressions_total.labels(applied.suppressed_now.value).inc()
        event(
            log,
            "bounce.applied",
            source=bounce.source.value,
            kind=bounce.kind.value,
            status=bounce.status,
            workspace=applied.workspace_id,
            message_id=bounce.message_id,
            address=self._show(applied.address or ""),
            recipient_status=applied.recipient_status,
            bounce_count=applied.bounce_count,
            suppressed=applied.suppressed_now,
            row_status=applied.row_status,
            message_status=applied.message_status,
        )

    # Reports arriving by SMTP at VERP addresses

    async def process_inbound(
        self, targets: Sequence[VerpTarget], raw: bytes, *, now: datetime | None = None
    ) -> InboundResult:
        """Attribute a report to the recipients its VERP addresses name, and apply it.

        Raises StoreUnavailable or MessageBusy (answer 451: the sender tries again).
        """
        now = now or utcnow()
        events: list[BounceEvent] = []
        formats: list[str] = []
        for target in targets:
            rows = await self.store.bounce_candidates(target.message_id)
            if rows is None:
                event(log, "bounce.message_gone", logging.WARNING, message_id=target.message_id)
                continue
            if target.row_id is not None:
                rows = [row for row in rows if row[0] == target.row_id]
                if not rows:
                    continue
            try:
                report = parse_report(raw, [address for _, address in rows])
            except Exception as exc:
                # A report the parser chokes on would be sent again and again: take it,
                # say so in the log, and attribute nothing.
                event(log, "bounce.unparsable", logging.ERROR, error=repr(exc)[:300])
                report = Report("none")
            formats.append(report.format)
            events.extend(attribute(report, target, rows))
        fmt = "dsn" if "dsn" in formats else "prose" if "prose" in formats else "none"
        metrics.inbound_reports_total.labels(fmt).inc()
        if not events:
            event(log, "bounce.report_ignored", format=fmt, targets=len(targets))
            return InboundResult(fmt, ())
        key = hashlib.sha256(raw).hexdigest()
        scope = ",".join(sorted(f"{t.message_id}-{t.row_id}" for t in targets))
        once = [
            OnceKey(
                "report",
                hashlib.sha256(f"{key}|{scope}".encode()).hexdigest(),
                now + _REPORT_MEMORY,
            )
        ]
        result = await self.apply(events, once=once, now=now)
        return InboundResult(fmt, result.applied, duplicate=result.duplicate is not None)

    # Suppressions

    async def suppressed(
        self, workspace_id: str, addresses: Sequence[str]
    ) -> dict[str, SuppressionReason]:
        """Which of `addresses` are suppressed (INACTIVE) in the workspace, and why."""
        return await self.store.suppressed_among(workspace_id, addresses)

    async def observe_gauges(self) -> None:
        """Refresh the suppressed_recipients gauge from the shared database."""
        metrics.suppressed_recipients.set(await self.store.suppression_count())

    def _show(self, address: str) -> str:
        return address if self.settings.log.addresses == "plain" else hash_address(address)


def attribute(
    report: Report, target: VerpTarget, rows: Sequence[tuple[int, str]]
) -> list[BounceEvent]:
    """The events a report means for the rows a VERP address names.

    With a recipient row in the address, the report is about that recipient, whatever
    address it names (a forwarding MTA reports the final address): its own block if it
    has one, else its worst failure. With only the message in the address, each failure
    goes to the recipient it names; a prose bounce that names none of several recipients
    cannot be attributed and is left out.
    """
    failures = report.failures()
    if not failures:
        return []
    by_row: dict[int, RecipientReport] = {}
    for row_id, address in rows:
        named = [f for f in failures if f.names(address)]
        if named:
            by_row[row_id] = _worst(named)
        elif target.row_id is not None or len(rows) == 1:
            anonymous = [f for f in failures if f.address is None] or failures
            by_row[row_id] = _worst(anonymous)
    addresses = dict(rows)
    return [_event(target, row_id, addresses[row_id], f) for row_id, f in by_row.items()]


def _worst(failures: Sequence[RecipientReport]) -> RecipientReport:
    hard = [f for f in failures if f.verdict and f.verdict.bounce_type is BounceType.HARD]
    return (hard or list(failures))[0]


def _event(target: VerpTarget, row_id: int, address: str, failure: RecipientReport) -> BounceEvent:
    assert failure.verdict is not None
    status = failure.verdict.status
    reason = failure.diagnostic
    if status and status not in reason:
        reason = f"{status} {reason}".strip()
    return BounceEvent(
        source=Source.DSN,
        kind=EventKind(failure.verdict.bounce_type.value),
        address=address,
        message_id=target.message_id,
        row_id=row_id,
        status=status,
        reason=reason or "bounced (no diagnostic given)",
        retry=failure.verdict.retry,
    )
