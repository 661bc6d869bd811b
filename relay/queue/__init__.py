"""The durable queue: accepted mail lives here until every recipient has an outcome."""

from __future__ import annotations

from relay.config import Settings
from relay.queue.model import (
    AttemptResult,
    ClaimedMessage,
    DeliveryStatus,
    MessageStatus,
    NewMessage,
    PendingRecipient,
    QueueStats,
    RecipientUpdate,
)
from relay.queue.sql import SqlStore
from relay.queue.store import QueueStore, StoreUnavailable

__all__ = [
    "AttemptResult",
    "ClaimedMessage",
    "DeliveryStatus",
    "MessageStatus",
    "NewMessage",
    "PendingRecipient",
    "QueueStats",
    "QueueStore",
    "RecipientUpdate",
    "SqlStore",
    "StoreUnavailable",
    "create_store",
]


def create_store(settings: Settings) -> SqlStore:
    """The backend the configuration names, not yet opened."""
    if settings.queue.backend == "mysql":
        from relay.queue.mysql import MysqlStore

        return MysqlStore(settings.queue.mysql, max_message_size=settings.smtp.max_message_size)
    from relay.queue.sqlite import SqliteStore

    return SqliteStore(settings.queue.sqlite.path)
