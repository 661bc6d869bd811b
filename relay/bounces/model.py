"""Value objects of bounce processing, shared by the parsers, the store and the API."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class BounceType(enum.StrEnum):
    """recipients.bounce_type, as the runbook spells it."""

    HARD = "HARD"  # the address does not work: counts towards suppression
    SOFT = "SOFT"  # the address exists; this message did not get through (yet)


class EventKind(enum.StrEnum):
    """What one event says about one recipient (bounce_events.bounce_type)."""

    HARD = "HARD"
    SOFT = "SOFT"
    COMPLAINT = "COMPLAINT"
    DELIVERED = "DELIVERED"


class RecipientStatus(enum.StrEnum):
    """recipients.status: only INACTIVE addresses are suppressed."""

    ACTIVE = "ACTIVE"
    BOUNCED = "BOUNCED"
    INACTIVE = "INACTIVE"


class SuppressionReason(enum.StrEnum):
    """Why an address is INACTIVE (suppressions.reason, the metric's label)."""

    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


class Source(enum.StrEnum):
    """Where an event came from; a bounded metric label."""

    DSN = "dsn"  # a report that arrived by SMTP at a VERP address
    MAILGUN = "mailgun"
    SEND = "send"  # a provider's 5xx at send time (smarthost, Gmail API)


@dataclass(frozen=True)
class Verdict:
    """What a status code and its text mean for the address and for this message."""

    bounce_type: BounceType
    retry: bool  # send this message to the recipient again after the soft-bounce delay
    status: str | None  # RFC 3463 enhanced status, e.g. "5.1.1"


@dataclass(frozen=True)
class BounceEvent:
    """One statement about one recipient, from any source, ready for the store.

    Either `message_id` (with `row_id` when known, else `address` picks the row) names the
    relay's message, or `workspace_id` and `address` name the recipient directly (send time).
    """

    source: Source
    kind: EventKind
    address: str | None
    reason: str
    message_id: str | None = None
    row_id: int | None = None
    workspace_id: str | None = None
    status: str | None = None
    retry: bool = False
    # False when the provider itself keeps trying (Mailgun's temporary failures): the
    # address is marked, the message's rows are left alone.
    touch_message: bool = True


@dataclass(frozen=True)
class OnceKey:
    """An id that may be processed only once (webhook_events): replays, duplicate reports."""

    source: str
    key: str
    expires_at: datetime


@dataclass(frozen=True)
class BouncePolicy:
    hard_bounce_threshold: int
    soft_bounce_retry_s: float
    max_age_s: float  # delivery.max_age: no soft-bounce retry for mail older than this


@dataclass(frozen=True)
class Applied:
    """What the store did with one event."""

    event: BounceEvent
    matched: bool  # the message (or the workspace) was found
    workspace_id: str | None = None
    address: str | None = None
    recipient_status: RecipientStatus | None = None
    bounce_count: int = 0
    suppressed_now: SuppressionReason | None = None
    row_status: str | None = None
    message_status: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    """A batch of events applied in one transaction, or refused as already seen."""

    duplicate: str | None  # the OnceKey source that was seen before; nothing applied
    applied: tuple[Applied, ...] = ()


class MessageBusy(Exception):
    """A soft bounce for a message a worker holds right now; try again shortly."""
