"""Value objects that cross the queue's boundary."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from relay.limits import QuotaCharge


class MessageStatus(enum.StrEnum):
    """messages.status, as the runbook spells it."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SENT = "sent"
    FAILED = "failed"
    BOUNCED = "bounced"


class DeliveryStatus(enum.StrEnum):
    """message_recipients.delivery_status."""

    QUEUED = "QUEUED"
    DEFERRED = "DEFERRED"
    SENT = "SENT"
    FAILED = "FAILED"
    BOUNCED = "BOUNCED"


PENDING = (DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)


@dataclass(frozen=True)
class NewMessage:
    """A message accepted over SMTP, ready to be committed with all its recipients."""

    id: str
    workspace_id: str
    from_email: str
    recipients: tuple[str, ...]
    subject: str | None
    content: bytes
    queued_at: datetime
    client_address: str | None = None
    mail_options: tuple[str, ...] = ()
    quota: QuotaCharge | None = None
    # Recipients on the suppression list (bounces.suppressed_action: record): stored as
    # BOUNCED with the reason, never sent.
    suppressed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PendingRecipient:
    row_id: int
    address: str


@dataclass(frozen=True)
class ClaimedMessage:
    """A message this worker holds a lease on, with the recipients still to deliver."""

    id: str
    workspace_id: str
    from_email: str
    retry_count: int
    queued_at: datetime
    size_bytes: int
    mail_options: tuple[str, ...]
    recipients: tuple[PendingRecipient, ...]
    # The raw message when it came with the claim (small ones do); None: load_content.
    content: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RecipientUpdate:
    row_id: int
    status: DeliveryStatus
    error: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    sent_at: datetime | None = None


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt decided, persisted atomically by `QueueStore.complete`."""

    status: MessageStatus
    error: str | None
    retry_count: int
    next_attempt_at: datetime | None
    finished_at: datetime
    recipients: tuple[RecipientUpdate, ...] = ()


@dataclass(frozen=True)
class QueueStats:
    counts: dict[str, int] = field(default_factory=dict)
    oldest_queued_at: datetime | None = None
    deferred: int = 0
    due: int = 0

    def depth(self) -> int:
        return self.counts.get("queued", 0) + self.counts.get("processing", 0)
