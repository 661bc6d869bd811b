"""Queue operations shared by both SQL backends.

Statements are written once with `?` placeholders; each backend supplies a transaction
object that runs them in its own dialect. Only claiming differs enough between SQLite and
MySQL to be written twice (see the backends).

Times are passed in from Python as naive UTC datetimes, never taken from the database's
NOW(), so that every replica and both dialects agree on what "due" means.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from relay.clock import utcnow
from relay.limits import Override, QuotaCharge, QuotaExceeded
from relay.queue import schema
from relay.queue.model import (
    PENDING,
    AttemptResult,
    ClaimedMessage,
    DeliveryStatus,
    MessageStatus,
    NewMessage,
    PendingRecipient,
    QueueStats,
)

Row = tuple[Any, ...]


class Tx(abc.ABC):
    """One open transaction."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the affected row count."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INT NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL,"
    " applied_at VARCHAR(32) NOT NULL)"
)


class SqlStore(abc.ABC):
    backend: str
    migrations: tuple[schema.Migration, ...]
    table_exists_sql: str
    ensure_quota_row_sql: str

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """An async context manager yielding a Tx; commits on success, rolls back on error."""

    @abc.abstractmethod
    def to_db_time(self, value: datetime) -> Any: ...

    @abc.abstractmethod
    def from_db_time(self, value: Any) -> datetime: ...

    @abc.abstractmethod
    async def _claim_rows(
        self, tx: Tx, *, worker_id: str, limit: int, until: datetime, now: datetime
    ) -> list[Row]:
        """Lease due messages inside tx; rows are the _CLAIM_COLUMNS of each."""

    @abc.abstractmethod
    def migration_lock(self) -> AbstractAsyncContextManager[None]:
        """An async context manager held while migrating, across replicas where possible."""

    _CLAIM_COLUMNS = (
        "id, workspace_id, from_email, retry_count, queued_at, size_bytes, mail_options"
    )

    # Schema

    async def migrate(self) -> list[int]:
        async with self.migration_lock():
            async with self.transaction() as tx:
                if not await tx.fetchall(self.table_exists_sql, ("schema_migrations",)):
                    await tx.execute(_MIGRATIONS_TABLE)
            done: list[int] = []
            for migration in self.migrations:
                # Checked again inside the transaction: another replica may have applied it
                # since we looked. MySQL commits DDL implicitly, so every statement is
                # idempotent (IF NOT EXISTS) and the version is recorded last: a migration
                # cut off half-way is simply run again.
                async with self.transaction() as tx:
                    rows = await tx.fetchall(
                        "SELECT version FROM schema_migrations WHERE version = ?",
                        (migration.version,),
                    )
                    if rows:
                        continue
                    for statement in migration.statements:
                        await tx.execute(statement)
                    await tx.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES (?, ?, ?)",
                        (migration.version, migration.name, self.to_db_time(utcnow())),
                    )
                done.append(migration.version)
            return done

    async def schema_version(self) -> int:
        async with self.transaction() as tx:
            rows = await tx.fetchall("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    # Ingest

    async def enqueue(self, message: NewMessage) -> None:
        queued_at = self.to_db_time(message.queued_at)
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO messages (id, workspace_id, from_email, to_emails, subject,"
                " status, retry_count, size_bytes, mail_options, client_address, queued_at,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.workspace_id,
                    message.from_email,
                    json.dumps(list(message.recipients), ensure_ascii=False),
                    message.subject,
                    MessageStatus.QUEUED.value,
                    len(message.content),
                    " ".join(message.mail_options),
                    message.client_address,
                    queued_at,
                    queued_at,
                ),
            )
            await tx.execute(
                "INSERT INTO message_contents (message_id, raw) VALUES (?, ?)",
                (message.id, message.content),
            )
            await tx.executemany(
                "INSERT INTO message_recipients (message_id, email_address, delivery_status,"
                " updated_at) VALUES (?, ?, ?, ?)",
                [
                    (message.id, address, DeliveryStatus.QUEUED.value, queued_at)
                    for address in message.recipients
                ],
            )
            if message.quota is not None:
                await self._charge(tx, message.quota)

    async def _charge(self, tx: Tx, charge: QuotaCharge) -> None:
        # The row update is conditional, so two replicas racing for the last of a quota
        # cannot both win: the second waits on the row lock, then finds no room.
        for subject, limit, name in (
            ("*", charge.workspace_daily, "workspace_daily"),
            (charge.user_key, charge.per_user_daily, "per_user_daily"),
        ):
            if limit is None:
                continue
            await tx.execute(self.ensure_quota_row_sql, (charge.workspace_id, subject, charge.day))
            charged = await tx.execute(
                "UPDATE quota_usage SET used = used + ?"
                " WHERE workspace_id = ? AND subject = ? AND day = ? AND used + ? <= ?",
                (
                    charge.recipients,
                    charge.workspace_id,
                    subject,
                    charge.day,
                    charge.recipients,
                    limit,
                ),
            )
            if not charged:
                raise QuotaExceeded(name)

    async def quota_used(self, workspace_id: str, day: str) -> dict[str, int]:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT subject, used FROM quota_usage WHERE workspace_id = ? AND day = ?",
                (workspace_id, day),
            )
        return {str(subject): int(used) for subject, used in rows}

    # Rate-limit overrides (runbook 4.7)

    async def set_override(self, override: Override) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "DELETE FROM rate_limit_overrides WHERE workspace_id = ?",
                (override.workspace_id,),
            )
            await tx.execute(
                "INSERT INTO rate_limit_overrides (workspace_id, workspace_daily,"
                " per_user_daily, rate_limit_burst, rate_limit_refill, expires_at, created_by,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    override.workspace_id,
                    override.workspace_daily,
                    override.per_user_daily,
                    override.rate_limit_burst,
                    override.rate_limit_refill,
                    self.to_db_time(override.expires_at),
                    override.created_by,
                    self.to_db_time(utcnow()),
                ),
            )

    async def clear_override(self, workspace_id: str) -> bool:
        async with self.transaction() as tx:
            return bool(
                await tx.execute(
                    "DELETE FROM rate_limit_overrides WHERE workspace_id = ?", (workspace_id,)
                )
            )

    async def overrides(self, *, now: datetime) -> list[Override]:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT workspace_id, expires_at, workspace_daily, per_user_daily,"
                " rate_limit_burst, rate_limit_refill, created_by FROM rate_limit_overrides"
                " WHERE expires_at > ?",
                (self.to_db_time(now),),
            )
        return [
            Override(
                workspace_id=row[0],
                expires_at=self.from_db_time(row[1]),
                workspace_daily=row[2],
                per_user_daily=row[3],
                rate_limit_burst=row[4],
                rate_limit_refill=row[5],
                created_by=row[6],
            )
            for row in rows
        ]

    # Audit (runbook 5.3)

    async def audit(
        self,
        *,
        action: str,
        outcome: str,
        user_id: str | None = None,
        ip_address: str | None = None,
        detail: str | None = None,
    ) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO audit_log (user_id, action, ip_address, outcome, detail,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, action, ip_address, outcome, detail, self.to_db_time(utcnow())),
            )

    async def audit_entries(self, *, limit: int = 100) -> list[dict[str, Any]]:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT user_id, action, ip_address, outcome, detail, created_at"
                " FROM audit_log ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        keys = ("user_id", "action", "ip_address", "outcome", "detail", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # Delivery

    async def claim(
        self, *, worker_id: str, limit: int, lease: timedelta, now: datetime
    ) -> list[ClaimedMessage]:
        async with self.transaction() as tx:
            rows = await self._claim_rows(
                tx, worker_id=worker_id, limit=limit, until=now + lease, now=now
            )
            if not rows:
                return []
            ids = [row[0] for row in rows]
            recipient_rows = await tx.fetchall(
                "SELECT id, message_id, email_address FROM message_recipients"
                f" WHERE message_id IN ({_placeholders(len(ids))})"
                " AND delivery_status IN (?, ?) ORDER BY id",
                (*ids, *(status.value for status in PENDING)),
            )
        pending: dict[str, list[PendingRecipient]] = {message_id: [] for message_id in ids}
        for row_id, message_id, address in recipient_rows:
            pending[message_id].append(PendingRecipient(int(row_id), address))
        return [
            ClaimedMessage(
                id=row[0],
                workspace_id=row[1],
                from_email=row[2],
                retry_count=int(row[3]),
                queued_at=self.from_db_time(row[4]),
                size_bytes=int(row[5]),
                mail_options=tuple(str(row[6]).split()),
                recipients=tuple(pending[row[0]]),
            )
            for row in rows
        ]

    async def load_content(self, message_id: str) -> bytes:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT raw FROM message_contents WHERE message_id = ?", (message_id,)
            )
        if not rows:
            raise KeyError(message_id)
        return bytes(rows[0][0])

    async def renew(self, *, worker_id: str, message_ids: Sequence[str], until: datetime) -> int:
        if not message_ids:
            return 0
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE messages SET claim_expires_at = ?"
                f" WHERE id IN ({_placeholders(len(message_ids))})"
                " AND claimed_by = ? AND status = ?",
                (
                    self.to_db_time(until),
                    *message_ids,
                    worker_id,
                    MessageStatus.PROCESSING.value,
                ),
            )

    async def complete(self, *, worker_id: str, message_id: str, result: AttemptResult) -> bool:
        finished = self.to_db_time(result.finished_at)
        next_attempt = (
            self.to_db_time(result.next_attempt_at) if result.next_attempt_at else finished
        )
        async with self.transaction() as tx:
            # Fencing: only the holder of the lease may record the outcome. If the lease
            # expired and another worker took the message, this attempt's result is dropped
            # and the other worker's stands.
            held = await tx.execute(
                "UPDATE messages SET status = ?, error = ?, retry_count = ?,"
                " next_attempt_at = ?, processed_at = ?, claimed_by = NULL,"
                " claim_expires_at = NULL WHERE id = ? AND claimed_by = ? AND status = ?",
                (
                    result.status.value,
                    result.error,
                    result.retry_count,
                    next_attempt,
                    finished,
                    message_id,
                    worker_id,
                    MessageStatus.PROCESSING.value,
                ),
            )
            if not held:
                return False
            await tx.executemany(
                "UPDATE message_recipients SET delivery_status = ?, error = ?,"
                " provider = COALESCE(?, provider),"
                " provider_message_id = COALESCE(?, provider_message_id),"
                " sent_at = COALESCE(?, sent_at), attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? AND message_id = ?",
                [
                    (
                        update.status.value,
                        update.error,
                        update.provider,
                        update.provider_message_id,
                        self.to_db_time(update.sent_at) if update.sent_at else None,
                        finished,
                        update.row_id,
                        message_id,
                    )
                    for update in result.recipients
                ],
            )
        return True

    async def release(self, *, worker_id: str, message_ids: Sequence[str]) -> int:
        if not message_ids:
            return 0
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE messages SET status = ?, claimed_by = NULL, claim_expires_at = NULL"
                f" WHERE id IN ({_placeholders(len(message_ids))})"
                " AND claimed_by = ? AND status = ?",
                (
                    MessageStatus.QUEUED.value,
                    *message_ids,
                    worker_id,
                    MessageStatus.PROCESSING.value,
                ),
            )

    async def requeue_expired(self, *, now: datetime) -> int:
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE messages SET status = ?, claimed_by = NULL, claim_expires_at = NULL"
                " WHERE status = ? AND claim_expires_at < ?",
                (
                    MessageStatus.QUEUED.value,
                    MessageStatus.PROCESSING.value,
                    self.to_db_time(now),
                ),
            )

    # Visibility

    async def stats(self, *, now: datetime) -> QueueStats:
        async with self.transaction() as tx:
            counts = await tx.fetchall("SELECT status, COUNT(*) FROM messages GROUP BY status")
            oldest = await tx.fetchall(
                "SELECT MIN(queued_at) FROM messages WHERE status IN (?, ?)",
                (MessageStatus.QUEUED.value, MessageStatus.PROCESSING.value),
            )
            waiting = await tx.fetchall(
                "SELECT SUM(CASE WHEN retry_count > 0 THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN next_attempt_at <= ? THEN 1 ELSE 0 END)"
                " FROM messages WHERE status = ?",
                (self.to_db_time(now), MessageStatus.QUEUED.value),
            )
        oldest_value = oldest[0][0] if oldest else None
        return QueueStats(
            counts={str(status): int(count) for status, count in counts},
            oldest_queued_at=self.from_db_time(oldest_value) if oldest_value else None,
            deferred=int(waiting[0][0] or 0),
            due=int(waiting[0][1] or 0),
        )

    async def message_status(self, message_id: str) -> dict[str, Any] | None:
        """One message with its per-recipient outcome (used by the CLI and tests)."""
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT id, workspace_id, from_email, status, error, retry_count, queued_at,"
                " processed_at, next_attempt_at FROM messages WHERE id = ?",
                (message_id,),
            )
            if not rows:
                return None
            recipients = await tx.fetchall(
                "SELECT email_address, delivery_status, error, provider, provider_message_id,"
                " sent_at, attempts FROM message_recipients WHERE message_id = ? ORDER BY id",
                (message_id,),
            )
        row = rows[0]
        return {
            "id": row[0],
            "workspace_id": row[1],
            "from_email": row[2],
            "status": row[3],
            "error": row[4],
            "retry_count": int(row[5]),
            "queued_at": self.from_db_time(row[6]),
            "processed_at": self.from_db_time(row[7]) if row[7] else None,
            "next_attempt_at": self.from_db_time(row[8]),
            "recipients": [
                {
                    "email_address": r[0],
                    "delivery_status": r[1],
                    "error": r[2],
                    "provider": r[3],
                    "provider_message_id": r[4],
                    "sent_at": self.from_db_time(r[5]) if r[5] else None,
                    "attempts": int(r[6]),
                }
                for r in recipients
            ],
        }

    # Operations (runbook sections 2-4): state, statistics, manual queue actions

    async def get_state(self, name: str) -> tuple[str, str | None] | None:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT value, updated_by FROM relay_state WHERE name = ?", (name,)
            )
        return (str(rows[0][0]), rows[0][1]) if rows else None

    async def set_state(self, name: str, value: str, *, updated_by: str | None) -> None:
        async with self.transaction() as tx:
            await tx.execute("DELETE FROM relay_state WHERE name = ?", (name,))
            await tx.execute(
                "INSERT INTO relay_state (name, value, updated_by, updated_at) VALUES (?, ?, ?, ?)",
                (name, value, updated_by, self.to_db_time(utcnow())),
            )

    async def outcomes_since(self, since: datetime) -> dict[str, int]:
        """Messages finished since `since`, by final status (for /api/stats rates)."""
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT status, COUNT(*) FROM messages WHERE processed_at >= ?"
                " AND status IN (?, ?, ?) GROUP BY status",
                (
                    self.to_db_time(since),
                    MessageStatus.SENT.value,
                    MessageStatus.FAILED.value,
                    MessageStatus.BOUNCED.value,
                ),
            )
        return {str(status): int(count) for status, count in rows}

    async def flush(self, *, now: datetime) -> int:
        """Make every deferred message due now (Postfix's `postqueue -f`)."""
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE messages SET next_attempt_at = ? WHERE status = ? AND next_attempt_at > ?",
                (self.to_db_time(now), MessageStatus.QUEUED.value, self.to_db_time(now)),
            )

    async def deactivate_hard_bounces(self, *, threshold: int) -> int:
        """Runbook 4.3's clean-up: addresses with `threshold` hard bounces become INACTIVE."""
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE recipients SET status = 'INACTIVE', updated_at = ?"
                " WHERE bounce_type = 'HARD' AND bounce_count >= ? AND status <> 'INACTIVE'",
                (self.to_db_time(utcnow()), threshold),
            )

    async def requeue_stuck(self, *, older_than: datetime, reset_retries: bool) -> int:
        """Runbook 4.2: return messages claimed before `older_than` to the queue.

        Leases do this by themselves when a worker dies; this is for an operator who
        knows a claim is dead before its lease says so.
        """
        reset = ", retry_count = 0" if reset_retries else ""
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE messages SET status = ?, claimed_by = NULL, claim_expires_at = NULL"
                f"{reset} WHERE status = ? AND processed_at < ?",
                (
                    MessageStatus.QUEUED.value,
                    MessageStatus.PROCESSING.value,
                    self.to_db_time(older_than),
                ),
            )


@asynccontextmanager
async def no_lock() -> AsyncIterator[None]:
    yield
