"""The queue's storage seam: one interface, an embedded SQLite and a MySQL/MariaDB backend."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from relay.queue.model import AttemptResult, ClaimedMessage, NewMessage, QueueStats


class StoreUnavailable(Exception):
    """The database could not be reached or refused the operation; nothing was written."""


class StoreRefused(StoreUnavailable):
    """The database was reached and refused a statement (a key clash, a bad value)."""


class QueueStore(Protocol):
    backend: str

    async def open(self) -> None:
        """Connect (pools, files). Does not touch the schema."""

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; returns the versions applied now."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

    async def enqueue(self, message: NewMessage) -> None:
        """Commit the message, its content and all its recipients in one transaction."""

    async def claim(
        self, *, worker_id: str, limit: int, lease: timedelta, now: datetime
    ) -> list[ClaimedMessage]:
        """Lease up to `limit` due messages; safe with many workers and many replicas."""

    async def load_content(self, message_id: str) -> bytes: ...

    async def renew(self, *, worker_id: str, message_ids: Sequence[str], until: datetime) -> int:
        """Extend this worker's leases; returns how many are still held."""

    async def complete(self, *, worker_id: str, message_id: str, result: AttemptResult) -> bool:
        """Persist an attempt's outcome; False when the lease had been lost meanwhile."""

    async def complete_many(
        self, *, worker_id: str, outcomes: Sequence[tuple[str, AttemptResult]]
    ) -> list[bool]:
        """Persist several outcomes (message id, result) in one transaction, all or none;
        per outcome, in order, False when its lease had been lost (nothing of it written)."""

    async def release(self, *, worker_id: str, message_ids: Sequence[str]) -> int:
        """Hand claimed, unattempted messages back to the queue (shutdown)."""

    async def requeue_expired(self, *, now: datetime) -> int:
        """Return messages whose claim lease expired (a dead worker) to the queue."""

    async def stats(self, *, now: datetime, finished: bool = True) -> QueueStats:
        """Counts by status, the oldest waiting message, deferred and due. `finished`
        False: counts of the live statuses only (queued, processing), whose cost does
        not grow with the mail kept after delivery."""
