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

from relay.bounces.model import (
    Applied,
    ApplyResult,
    BounceEvent,
    BouncePolicy,
    EventKind,
    MessageBusy,
    OnceKey,
    RecipientStatus,
    SuppressionReason,
)
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
# One statement and its parameters.
Statement = tuple[str, Sequence[Any]]
# Contents up to this size come with the claim (one query per batch instead of one per
# message); bigger ones are read when their turn comes, so a claimed batch of large
# messages never sits in memory at once.
PRELOAD_MAX_BYTES = 256 * 1024
# Recipients' updates in one group of outcomes (complete_many), unless one message alone
# has more: a bound on the size of one query, and on MySQL on the rows one UPDATE picks
# its values for by CASE.
MAX_GROUP_RECIPIENTS = 200
# Recipient rows per multi-row INSERT: 5 parameters each, and SQLite allows 32,766 bound
# parameters in one statement, while smtp.max_recipients has no upper bound.
_RECIPIENTS_PER_INSERT = 1000


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
    async def _claim_batch(
        self, *, worker_id: str, limit: int, until: datetime, now: datetime
    ) -> tuple[list[Row], list[Row], list[Row]]:
        """Lease up to `limit` due messages in one transaction: the _CLAIM_COLUMNS of each,
        then the rows of the two _claimed_reads (no contents' rows when it has none)."""

    @abc.abstractmethod
    def migration_lock(self) -> AbstractAsyncContextManager[None]:
        """An async context manager held while migrating, across replicas where possible."""

    async def write_all(self, statements: Sequence[Statement]) -> None:
        """Run the statements in one transaction and commit; all of them or none.

        Backends with a network round trip per statement send them all at once (MySQL).
        """
        async with self.transaction() as tx:
            for sql, params in statements:
                await tx.execute(sql, params)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """The rows of one query, run on its own (MySQL: with its commit, one round trip)."""
        async with self.transaction() as tx:
            return await tx.fetchall(sql, params)

    # message_recipients, read by message id: the dialect may pin the index (see
    # _claimed_reads).
    _RECIPIENTS_BY_MESSAGE = "message_recipients"
    # messages, read by status: the dialect may pin the index (see stats).
    _MESSAGES_BY_STATUS = "messages"

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
        statements = self._enqueue_statements([message])
        if message.quota is None:
            # The common case: the whole commit in one round trip (docs/benchmarks.md).
            await self.write_all(statements)
            return
        await self._enqueue_charged(statements, message.quota)

    async def _enqueue_charged(self, statements: list[Statement], charge: QuotaCharge) -> None:
        """The message's statements and its quota charge, committed only if every daily
        quota it is charged to has room (else QuotaExceeded, and nothing is written).
        Here statement by statement; a dialect may do it in fewer round trips."""
        async with self.transaction() as tx:
            for sql, params in statements:
                await tx.execute(sql, params)
            for name, ensure, update in self._charge_statements(charge):
                await tx.execute(*ensure)
                if not await tx.execute(*update):
                    raise QuotaExceeded(name)

    async def enqueue_group(self, messages: Sequence[NewMessage]) -> None:
        """Several messages in one transaction: all of them are queued, or none.

        Three multi-row INSERTs and one COMMIT, in one round trip where the backend can
        (relay.queue.group). Messages with a quota charge go one by one (`enqueue`).
        """
        if any(message.quota is not None for message in messages):
            raise ValueError("a message with a quota charge is enqueued on its own")
        await self.write_all(self._enqueue_statements(messages))

    def _enqueue_statements(self, messages: Sequence[NewMessage]) -> list[Statement]:
        rows: list[Any] = []
        contents: list[Any] = []
        recipient_rows: list[tuple[Any, ...]] = []
        for message in messages:
            queued_at = self.to_db_time(message.queued_at)
            suppressed = dict(message.suppressed)
            status = MessageStatus.QUEUED
            if suppressed and all(address in suppressed for address in message.recipients):
                status = MessageStatus.BOUNCED  # nothing to send: never claimed
            rows += (
                message.id,
                message.workspace_id,
                message.from_email,
                json.dumps(list(message.recipients), ensure_ascii=False),
                message.subject,
                status.value,
                len(message.content),
                " ".join(message.mail_options),
                message.client_address,
                queued_at,
                queued_at,
            )
            contents += (message.id, message.content)
            for address in message.recipients:
                delivery = (
                    DeliveryStatus.BOUNCED if address in suppressed else DeliveryStatus.QUEUED
                )
                recipient_rows.append(
                    (message.id, address, delivery.value, suppressed.get(address), queued_at)
                )
        statements: list[Statement] = [
            (
                "INSERT INTO messages (id, workspace_id, from_email, to_emails, subject,"
                " status, retry_count, size_bytes, mail_options, client_address, queued_at,"
                " next_attempt_at) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)"] * len(messages)),
                rows,
            ),
            (
                "INSERT INTO message_contents (message_id, raw) VALUES "
                + ", ".join(["(?, ?)"] * len(messages)),
                contents,
            ),
        ]
        for first in range(0, len(recipient_rows), _RECIPIENTS_PER_INSERT):
            chunk = recipient_rows[first : first + _RECIPIENTS_PER_INSERT]
            statements.append(
                (
                    "INSERT INTO message_recipients (message_id, email_address,"
                    " delivery_status, bounce_reason, updated_at) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)),
                    [value for row in chunk for value in row],
                )
            )
        return statements

    def _charge_statements(self, charge: QuotaCharge) -> list[tuple[str, Statement, Statement]]:
        """Per daily quota the message is charged to: its name, the statement that makes
        sure the day's row exists, and the charge, which changes one row if there is room.

        The charge is conditional, so two replicas racing for the last of a quota cannot
        both win: the second waits on the row lock, then finds no room.
        """
        found: list[tuple[str, Statement, Statement]] = []
        for subject, limit, name in (
            ("*", charge.workspace_daily, "workspace_daily"),
            (charge.user_key, charge.per_user_daily, "per_user_daily"),
        ):
            if limit is None:
                continue
            row = (charge.workspace_id, subject, charge.day)
            update = (
                "UPDATE quota_usage SET used = used + ?"
                " WHERE workspace_id = ? AND subject = ? AND day = ? AND used + ? <= ?",
                (charge.recipients, *row, charge.recipients, limit),
            )
            found.append((name, (self.ensure_quota_row_sql, row), update))
        return found

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
        rows, recipient_rows, content_rows = await self._claim_batch(
            worker_id=worker_id, limit=limit, until=now + lease, now=now
        )
        contents = {message_id: bytes(raw) for message_id, raw in content_rows}
        pending: dict[str, list[PendingRecipient]] = {row[0]: [] for row in rows}
        # In the order they were queued (see _claimed_reads for why the database does not
        # sort them).
        for row_id, message_id, address in sorted(recipient_rows, key=lambda r: int(r[0])):
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
                content=contents.get(row[0]),
            )
            for row in rows
        ]

    def _claimed_reads(self, rows: Sequence[Row]) -> tuple[Statement, Statement | None]:
        """What a claim reads of the messages it leased: their pending recipients (row id,
        message id, address), and the contents (message id, raw) of the small ones."""
        ids = [row[0] for row in rows]
        # No ORDER BY id: with one, MariaDB's optimizer would at times walk the whole table
        # in primary-key order to spare a sort of ten rows (a claim examined 10,000 rows of
        # a 10,000-message backlog, and the cost grew with the backlog). The caller sorts.
        recipients = (
            f"SELECT id, message_id, email_address FROM {self._RECIPIENTS_BY_MESSAGE}"
            f" WHERE message_id IN ({_placeholders(len(ids))})"
            " AND delivery_status IN (?, ?)",
            (*ids, *(status.value for status in PENDING)),
        )
        small = [row[0] for row in rows if int(row[5]) <= PRELOAD_MAX_BYTES]
        if not small:
            return recipients, None
        contents = (
            "SELECT message_id, raw FROM message_contents"
            f" WHERE message_id IN ({_placeholders(len(small))})",
            small,
        )
        return recipients, contents

    async def load_content(self, message_id: str) -> bytes:
        rows = await self.read(
            "SELECT raw FROM message_contents WHERE message_id = ?", (message_id,)
        )
        if not rows:
            raise KeyError(message_id)
        return bytes(rows[0][0])

    async def renew(self, *, worker_id: str, message_ids: Sequence[str], until: datetime) -> int:
        if not message_ids:
            return 0
        async with self.transaction() as tx:
            return await tx.execute(*self._renew_statement(worker_id, message_ids, until))

    def _renew_statement(
        self, worker_id: str, message_ids: Sequence[str], until: datetime
    ) -> Statement:
        return (
            "UPDATE messages SET claim_expires_at = ?"
            f" WHERE id IN ({_placeholders(len(message_ids))})"
            " AND claimed_by = ? AND status = ?",
            (self.to_db_time(until), *message_ids, worker_id, MessageStatus.PROCESSING.value),
        )

    async def complete(self, *, worker_id: str, message_id: str, result: AttemptResult) -> bool:
        [held] = await self.complete_many(worker_id=worker_id, outcomes=[(message_id, result)])
        return held

    async def complete_many(
        self, *, worker_id: str, outcomes: Sequence[tuple[str, AttemptResult]]
    ) -> list[bool]:
        """Persist several attempts' outcomes in one transaction: all of them or none.

        One entry per outcome, in order: False where the lease had been lost, and then
        nothing of that outcome was written while the others were.
        """
        held: list[bool] = []
        async with self.transaction() as tx:
            for message_id, result in outcomes:
                fence, updates = self._outcome_statements(worker_id, message_id, result)
                # Fencing: only the holder of the lease may record the outcome. If the lease
                # expired and another worker took the message, this attempt's result is
                # dropped and the other worker's stands.
                if not await tx.execute(*fence):
                    held.append(False)
                    continue
                for sql, params in updates:
                    await tx.execute(sql, params)
                held.append(True)
        return held

    def _outcome_statements(
        self, worker_id: str, message_id: str, result: AttemptResult
    ) -> tuple[Statement, list[Statement]]:
        """The fenced update of the message, and one update per recipient."""
        message, recipients = self._outcome_values(result)
        fence = (
            "UPDATE messages SET status = ?, error = ?, retry_count = ?,"
            " next_attempt_at = ?, processed_at = ?, claimed_by = NULL,"
            " claim_expires_at = NULL WHERE id = ? AND claimed_by = ? AND status = ?",
            (*message, message_id, worker_id, MessageStatus.PROCESSING.value),
        )
        updates: list[Statement] = [
            (
                "UPDATE message_recipients SET delivery_status = ?, error = ?,"
                " provider = COALESCE(?, provider),"
                " provider_message_id = COALESCE(?, provider_message_id),"
                " sent_at = COALESCE(?, sent_at), attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? AND message_id = ?",
                (*values, row_id, message_id),
            )
            for row_id, values in recipients
        ]
        return fence, updates

    def _outcome_values(
        self, result: AttemptResult
    ) -> tuple[tuple[Any, ...], list[tuple[int, tuple[Any, ...]]]]:
        """What an outcome writes, in the database's terms: the message's status, error,
        retry_count, next_attempt_at and processed_at; per recipient row id, its
        delivery_status, error, provider, provider_message_id, sent_at and updated_at (the
        provider's fields and sent_at only replace NULL where given)."""
        finished = self.to_db_time(result.finished_at)
        next_attempt = (
            self.to_db_time(result.next_attempt_at) if result.next_attempt_at else finished
        )
        message = (result.status.value, result.error, result.retry_count, next_attempt, finished)
        recipients = [
            (
                update.row_id,
                (
                    update.status.value,
                    update.error,
                    update.provider,
                    update.provider_message_id,
                    self.to_db_time(update.sent_at) if update.sent_at else None,
                    finished,
                ),
            )
            for update in result.recipients
        ]
        return message, recipients

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

    async def stats(self, *, now: datetime, finished: bool = True) -> QueueStats:
        # Without finished, every read is an index range of the live statuses only: the
        # finished rows are kept for the retention period (90 days in the runbook),
        # millions of them. The index is pinned where the dialect allows, since statistics
        # taken during a large backlog would have the optimizer scan the table instead.
        live = (MessageStatus.QUEUED.value, MessageStatus.PROCESSING.value)
        table = self._MESSAGES_BY_STATUS
        async with self.transaction() as tx:
            if finished:
                counts = await tx.fetchall("SELECT status, COUNT(*) FROM messages GROUP BY status")
            else:
                counts = await tx.fetchall(
                    f"SELECT status, COUNT(*) FROM {table} WHERE status IN (?, ?) GROUP BY status",
                    live,
                )
            oldest = await tx.fetchall(
                f"SELECT MIN(queued_at) FROM {table} WHERE status IN (?, ?)", live
            )
            waiting = await tx.fetchall(
                "SELECT SUM(CASE WHEN retry_count > 0 THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN next_attempt_at <= ? THEN 1 ELSE 0 END)"
                f" FROM {table} WHERE status = ?",
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

    # Bounces and suppressions (relay/bounces, runbook 4.3) ---------------------------
    #
    # recipients holds one row per address that ever bounced or was suppressed, keyed by
    # the address in lower case (local parts are case-insensitive in practice, and one
    # spelling keeps SQLite's exact comparison and MySQL's collation in agreement).
    # bounce_count counts bounces in a row of the kind in bounce_type; a bounce of the
    # other kind, or a delivery, starts the count again. status is ACTIVE, BOUNCED (it
    # bounced lately) or INACTIVE (suppressed: RCPT refuses it).

    async def apply_bounces(
        self,
        events: Sequence[BounceEvent],
        *,
        policy: BouncePolicy,
        now: datetime,
        once: Sequence[OnceKey] = (),
    ) -> ApplyResult:
        """Apply events in one transaction; nothing at all if any `once` key was seen."""
        async with self.transaction() as tx:
            # Expired ids first: one seen long ago is no longer a replay.
            await tx.execute(
                "DELETE FROM webhook_events WHERE expires_at < ?", (self.to_db_time(now),)
            )
            for key in once:
                seen = await tx.fetchall(
                    "SELECT 1 FROM webhook_events WHERE source = ? AND event_key = ?",
                    (key.source, key.key),
                )
                if seen:
                    return ApplyResult(duplicate=key.source)
            # A racing replica inserting the same key fails on the primary key: the
            # transaction rolls back and the caller asks the sender to try again.
            await tx.executemany(
                "INSERT INTO webhook_events (source, event_key, received_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                [
                    (k.source, k.key, self.to_db_time(now), self.to_db_time(k.expires_at))
                    for k in once
                ],
            )
            applied = [await self._apply_bounce(tx, e, policy, now) for e in events]
        return ApplyResult(duplicate=None, applied=tuple(applied))

    async def _apply_bounce(
        self, tx: Tx, event: BounceEvent, policy: BouncePolicy, now: datetime
    ) -> Applied:
        target = await self._bounce_target(tx, event)
        if target is not None:
            workspace_id, address = str(target[3]), str(target[1])
        elif event.message_id is None and event.workspace_id and event.address:
            workspace_id, address = event.workspace_id, event.address
        else:
            return Applied(event, matched=False)
        address = address.lower()

        status, count, suppressed = await self._mark_recipient(
            tx, workspace_id, address, event, policy, now
        )
        row_status = message_status = None
        if target is not None and event.touch_message:
            row_status, message_status = await self._mark_row(tx, target, event, policy, now)
        await tx.execute(
            "INSERT INTO bounce_events (workspace_id, email_address, message_id,"
            " recipient_row_id, source, bounce_type, status, reason, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                workspace_id,
                address,
                event.message_id if target is not None else None,
                int(target[0]) if target is not None else None,
                event.source.value,
                event.kind.value,
                event.status,
                event.reason[:2000] or None,
                self.to_db_time(now),
            ),
        )
        return Applied(
            event,
            matched=True,
            workspace_id=workspace_id,
            address=address,
            recipient_status=status,
            bounce_count=count,
            suppressed_now=suppressed,
            row_status=row_status,
            message_status=message_status,
        )

    async def _bounce_target(self, tx: Tx, event: BounceEvent) -> Row | None:
        """(row id, address, delivery_status, workspace, message status, queued_at,
        next_attempt_at) of the recipient row the event is about, if it still exists."""
        if event.message_id is None:
            return None
        select = (
            "SELECT mr.id, mr.email_address, mr.delivery_status, m.workspace_id, m.status,"
            " m.queued_at, m.next_attempt_at FROM message_recipients mr"
            " JOIN messages m ON m.id = mr.message_id WHERE mr.message_id = ?"
        )
        if event.row_id is not None:
            rows = await tx.fetchall(select + " AND mr.id = ?", (event.message_id, event.row_id))
        elif event.address:
            rows = await tx.fetchall(
                select + " AND LOWER(mr.email_address) = ? ORDER BY mr.id",
                (event.message_id, event.address.lower()),
            )
        else:
            return None
        return rows[0] if rows else None

    async def _ensure_recipient(self, tx: Tx, workspace_id: str, address: str, now: Any) -> None:
        skip = (
            " ON CONFLICT DO NOTHING"
            if self.backend == "sqlite"
            else " ON DUPLICATE KEY UPDATE id = id"
        )
        await tx.execute(
            "INSERT INTO recipients (workspace_id, email_address, status, bounce_count,"
            " created_at, updated_at) VALUES (?, ?, ?, 0, ?, ?)" + skip,
            (workspace_id, address, RecipientStatus.ACTIVE.value, now, now),
        )

    async def _mark_recipient(
        self,
        tx: Tx,
        workspace_id: str,
        address: str,
        event: BounceEvent,
        policy: BouncePolicy,
        now: datetime,
    ) -> tuple[RecipientStatus | None, int, SuppressionReason | None]:
        at = self.to_db_time(now)
        key = (address, workspace_id)
        where = " WHERE email_address = ? AND workspace_id = ?"
        if event.kind is EventKind.DELIVERED:
            # The address took mail: it is not "bouncing repeatedly" any more. A
            # suppression stays until someone lifts it.
            await tx.execute(
                "UPDATE recipients SET status = ?, bounce_count = 0, updated_at = ?"
                + where
                + " AND status = ?",
                (RecipientStatus.ACTIVE.value, at, *key, RecipientStatus.BOUNCED.value),
            )
            rows = await tx.fetchall("SELECT status FROM recipients" + where, key)
            return (RecipientStatus(rows[0][0]) if rows else None), 0, None

        await self._ensure_recipient(tx, workspace_id, address, at)
        if event.kind is not EventKind.COMPLAINT:
            # Two statements, not one: MySQL evaluates SET left to right with the new
            # values, SQLite with the old ones. The first UPDATE also takes the row lock,
            # so a concurrent bounce for the same address waits for this one.
            await tx.execute(
                "UPDATE recipients SET bounce_count = CASE WHEN bounce_type = ?"
                " THEN bounce_count + 1 ELSE 1 END, updated_at = ?" + where,
                (event.kind.value, at, *key),
            )
            await tx.execute(
                "UPDATE recipients SET bounce_type = ?, last_bounce_date = ?" + where,
                (event.kind.value, at, *key),
            )
        rows = await tx.fetchall("SELECT status, bounce_count FROM recipients" + where, key)
        status, count = RecipientStatus(rows[0][0]), int(rows[0][1])
        if status is RecipientStatus.INACTIVE:
            return status, count, None
        reason: SuppressionReason | None = None
        if event.kind is EventKind.COMPLAINT:
            reason = SuppressionReason.COMPLAINT
        elif event.kind is EventKind.HARD and count >= policy.hard_bounce_threshold:
            reason = SuppressionReason.HARD_BOUNCE
        new = RecipientStatus.INACTIVE if reason else RecipientStatus.BOUNCED
        await tx.execute(
            "UPDATE recipients SET status = ?, updated_at = ?" + where, (new.value, at, *key)
        )
        if reason is not None:
            detail = event.reason
            if reason is SuppressionReason.HARD_BOUNCE:
                detail = f"{count} hard bounces in a row; last: {event.reason}"
            await self._write_suppression(tx, workspace_id, address, reason, detail, None, at)
        return new, count, reason

    async def _write_suppression(
        self,
        tx: Tx,
        workspace_id: str,
        address: str,
        reason: SuppressionReason,
        detail: str | None,
        created_by: str | None,
        at: Any,
    ) -> None:
        await tx.execute(
            "DELETE FROM suppressions WHERE email_address = ? AND workspace_id = ?",
            (address, workspace_id),
        )
        await tx.execute(
            "INSERT INTO suppressions (workspace_id, email_address, reason, detail,"
            " created_by, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (workspace_id, address, reason.value, (detail or "")[:2000] or None, created_by, at),
        )

    async def _mark_row(
        self, tx: Tx, target: Row, event: BounceEvent, policy: BouncePolicy, now: datetime
    ) -> tuple[str | None, str | None]:
        row_id, _, row_status, _, message_status = (int(target[0]), *target[1:5])
        message_id = str(event.message_id)
        at = self.to_db_time(now)
        if event.kind is EventKind.COMPLAINT:
            return str(row_status), str(message_status)
        if event.kind is EventKind.DELIVERED:
            if row_status == DeliveryStatus.SENT.value:
                await tx.execute(
                    "UPDATE message_recipients SET bounce_reason = NULL WHERE id = ?", (row_id,)
                )
            return str(row_status), str(message_status)

        queued_at = self.from_db_time(target[5])
        young = (now - queued_at).total_seconds() < policy.max_age_s
        if event.kind is EventKind.SOFT and event.retry and young:
            # Runbook 4.3: soft bounces are sent again after a delay (24 h). The message
            # goes back to the queue with this row pending; a worker holding it now would
            # overwrite the message's status, so the caller is asked to try again.
            if message_status == MessageStatus.PROCESSING.value:
                raise MessageBusy(message_id)
            due = now + timedelta(seconds=policy.soft_bounce_retry_s)
            if message_status == MessageStatus.QUEUED.value:
                due = min(due, self.from_db_time(target[6]))
            await tx.execute(
                "UPDATE message_recipients SET delivery_status = ?, bounce_reason = ?,"
                " updated_at = ? WHERE id = ?",
                (DeliveryStatus.DEFERRED.value, event.reason[:2000], at, row_id),
            )
            await tx.execute(
                "UPDATE messages SET status = ?, next_attempt_at = ?, claimed_by = NULL,"
                " claim_expires_at = NULL, error = ? WHERE id = ?",
                (
                    MessageStatus.QUEUED.value,
                    self.to_db_time(due),
                    f"soft bounce, retry at {due.isoformat()}Z: {event.reason}"[:2000],
                    message_id,
                ),
            )
            return DeliveryStatus.DEFERRED.value, MessageStatus.QUEUED.value

        await tx.execute(
            "UPDATE message_recipients SET delivery_status = ?, bounce_reason = ?,"
            " updated_at = ? WHERE id = ?",
            (DeliveryStatus.BOUNCED.value, event.reason[:2000] or None, at, row_id),
        )
        return DeliveryStatus.BOUNCED.value, await self._settle(tx, message_id, message_status)

    async def _settle(self, tx: Tx, message_id: str, status: Any) -> str:
        """A message's status after a bounce: `bounced` when every recipient bounced,
        `failed` when some did (README "States"). Mail a worker holds is left to it, and
        queued mail while a recipient is still pending."""
        settled = (
            MessageStatus.QUEUED.value,
            MessageStatus.SENT.value,
            MessageStatus.FAILED.value,
            MessageStatus.BOUNCED.value,
        )
        if status not in settled:
            return str(status)
        rows = await tx.fetchall(
            "SELECT delivery_status, COUNT(*) FROM message_recipients WHERE message_id = ?"
            " GROUP BY delivery_status",
            (message_id,),
        )
        counts = {str(s): int(n) for s, n in rows}
        bounced = counts.get(DeliveryStatus.BOUNCED.value, 0)
        if bounced == sum(counts.values()):
            new = MessageStatus.BOUNCED.value
        elif any(counts.get(p.value) for p in PENDING):
            return str(status)
        elif bounced or counts.get(DeliveryStatus.FAILED.value):
            new = MessageStatus.FAILED.value
        else:
            new = MessageStatus.SENT.value
        if new != status:
            await tx.execute(
                "UPDATE messages SET status = ? WHERE id = ? AND status = ?",
                (new, message_id, status),
            )
        return new

    async def bounce_candidates(self, message_id: str) -> list[tuple[int, str]] | None:
        """(row id, address) of a message's recipients; None when the message is gone."""
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT id, email_address FROM message_recipients WHERE message_id = ? ORDER BY id",
                (message_id,),
            )
        return [(int(r), str(a)) for r, a in rows] or None

    async def suppression_count(self) -> int:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT COUNT(*) FROM recipients WHERE status = ?",
                (RecipientStatus.INACTIVE.value,),
            )
        return int(rows[0][0])

    async def suppressed_among(
        self, workspace_id: str, addresses: Sequence[str]
    ) -> dict[str, SuppressionReason]:
        """Which of `addresses` (as given) are INACTIVE in the workspace, and why."""
        if not addresses:
            return {}
        by_key = {address.lower(): address for address in addresses}
        # Asked at every RCPT: one round trip, not a transaction of its own.
        rows = await self.read(
            "SELECT r.email_address, s.reason FROM recipients r LEFT JOIN suppressions s"
            " ON s.email_address = r.email_address AND s.workspace_id = r.workspace_id"
            f" WHERE r.workspace_id = ? AND r.email_address IN ({_placeholders(len(by_key))})"
            " AND r.status = ?",
            (workspace_id, *by_key, RecipientStatus.INACTIVE.value),
        )
        found: dict[str, SuppressionReason] = {}
        for address, reason in rows:
            original = by_key.get(str(address).lower())
            if original is not None:
                found[original] = _reason(reason)
        return found

    async def suppress(
        self,
        *,
        workspace_id: str,
        address: str,
        reason: SuppressionReason,
        detail: str | None,
        created_by: str | None,
        now: datetime,
    ) -> bool:
        """Make an address INACTIVE by hand; False when it already was."""
        address, at = address.lower(), self.to_db_time(now)
        async with self.transaction() as tx:
            await self._ensure_recipient(tx, workspace_id, address, at)
            changed = await tx.execute(
                "UPDATE recipients SET status = ?, updated_at = ?"
                " WHERE email_address = ? AND workspace_id = ? AND status <> ?",
                (
                    RecipientStatus.INACTIVE.value,
                    at,
                    address,
                    workspace_id,
                    RecipientStatus.INACTIVE.value,
                ),
            )
            if changed:
                await self._write_suppression(
                    tx, workspace_id, address, reason, detail, created_by, at
                )
        return bool(changed)

    async def unsuppress(self, *, workspace_id: str, address: str, now: datetime) -> bool:
        """Lift a suppression; the bounce count starts again from zero. False: none."""
        address = address.lower()
        async with self.transaction() as tx:
            changed = await tx.execute(
                "UPDATE recipients SET status = ?, bounce_count = 0, updated_at = ?"
                " WHERE email_address = ? AND workspace_id = ? AND status = ?",
                (
                    RecipientStatus.ACTIVE.value,
                    self.to_db_time(now),
                    address,
                    workspace_id,
                    RecipientStatus.INACTIVE.value,
                ),
            )
            await tx.execute(
                "DELETE FROM suppressions WHERE email_address = ? AND workspace_id = ?",
                (address, workspace_id),
            )
        return bool(changed)

    _SUPPRESSION_COLUMNS = (
        "r.workspace_id, r.email_address, r.status, s.reason, s.detail, s.created_by,"
        " COALESCE(s.created_at, r.updated_at), r.bounce_type, r.bounce_count,"
        " r.last_bounce_date"
    )

    def _suppression_view(self, row: Row) -> dict[str, Any]:
        return {
            "workspace_id": row[0],
            "email_address": row[1],
            "status": row[2],
            "reason": _reason(row[3]).value if row[2] == "INACTIVE" else None,
            "detail": row[4],
            "created_by": row[5],
            "since": self.from_db_time(row[6]),
            "bounce_type": row[7],
            "bounce_count": int(row[8]),
            "last_bounce_date": self.from_db_time(row[9]) if row[9] else None,
        }

    async def suppressions(
        self, *, workspace_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """INACTIVE addresses, most recently changed first."""
        only = " AND r.workspace_id = ?" if workspace_id is not None else ""
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT {self._SUPPRESSION_COLUMNS} FROM recipients r"
                " LEFT JOIN suppressions s ON s.email_address = r.email_address"
                " AND s.workspace_id = r.workspace_id"
                f" WHERE r.status = ?{only} ORDER BY r.updated_at DESC, r.id DESC"
                " LIMIT ? OFFSET ?",
                (
                    RecipientStatus.INACTIVE.value,
                    *((workspace_id,) if workspace_id is not None else ()),
                    limit,
                    offset,
                ),
            )
        return [self._suppression_view(row) for row in rows]

    async def recipient_record(
        self, *, workspace_id: str, address: str, events: int = 20
    ) -> dict[str, Any] | None:
        """One address's bounce state, suppression and latest events; None if unknown."""
        key = (address.lower(), workspace_id)
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT {self._SUPPRESSION_COLUMNS} FROM recipients r"
                " LEFT JOIN suppressions s ON s.email_address = r.email_address"
                " AND s.workspace_id = r.workspace_id"
                " WHERE r.email_address = ? AND r.workspace_id = ?",
                key,
            )
            history = await tx.fetchall(
                "SELECT created_at, source, bounce_type, status, reason, message_id"
                " FROM bounce_events WHERE email_address = ? AND workspace_id = ?"
                " ORDER BY id DESC LIMIT ?",
                (*key, events),
            )
        if not rows:
            return None
        record = self._suppression_view(rows[0])
        names = ("at", "source", "type", "status", "reason", "message_id")
        record["events"] = [
            dict(zip(names, (self.from_db_time(h[0]), *h[1:]), strict=True)) for h in history
        ]
        return record

    async def bounce_stats(
        self, *, since: datetime, workspace_id: str | None = None, limit: int = 10
    ) -> dict[str, list[dict[str, Any]]]:
        """Runbook 4.3's three queries, written once for SQLite and MySQL.

        SUBSTRING_INDEX and DATE_SUB are MySQL's; SUBSTR/INSTR exist in both, and the
        time bound comes from Python like every other time here.
        """
        ws = " AND workspace_id = ?" if workspace_id is not None else ""
        ws_args: tuple[Any, ...] = (workspace_id,) if workspace_id is not None else ()
        domain = "LOWER(SUBSTR(email_address, INSTR(email_address, '@') + 1))"
        async with self.transaction() as tx:
            by_type = await tx.fetchall(
                "SELECT workspace_id, bounce_type, COUNT(*), COUNT(DISTINCT email_address)"
                f" FROM recipients WHERE bounce_count > 0 AND last_bounce_date > ?{ws}"
                " GROUP BY workspace_id, bounce_type ORDER BY workspace_id, bounce_type",
                (self.to_db_time(since), *ws_args),
            )
            # INACTIVE too: an address suppressed after its third bounce has not stopped
            # being a problem of its domain.
            domains = await tx.fetchall(
                f"SELECT {domain} AS domain, COUNT(*) AS bounced FROM recipients"
                f" WHERE status IN (?, ?){ws} GROUP BY {domain}"
                " ORDER BY bounced DESC, domain LIMIT ?",
                (
                    RecipientStatus.BOUNCED.value,
                    RecipientStatus.INACTIVE.value,
                    *ws_args,
                    limit,
                ),
            )
            join = " JOIN messages m ON m.id = mr.message_id" if workspace_id is not None else ""
            reasons = await tx.fetchall(
                "SELECT mr.bounce_reason, COUNT(*) AS bounced FROM message_recipients mr"
                f"{join} WHERE mr.delivery_status = ?"
                " AND COALESCE(mr.sent_at, mr.updated_at) > ?"
                f"{' AND m.workspace_id = ?' if workspace_id is not None else ''}"
                " GROUP BY mr.bounce_reason ORDER BY bounced DESC, mr.bounce_reason LIMIT ?",
                (DeliveryStatus.BOUNCED.value, self.to_db_time(since), *ws_args, limit),
            )
        return {
            "by_workspace_and_type": [
                {
                    "workspace_id": w,
                    "bounce_type": t,
                    "count": int(n),
                    "unique_emails": int(u),
                }
                for w, t, n, u in by_type
            ],
            "domains": [{"domain": d, "bounce_count": int(n)} for d, n in domains],
            "reasons": [{"bounce_reason": r, "count": int(n)} for r, n in reasons],
        }


def _reason(value: Any) -> SuppressionReason:
    # INACTIVE without a suppressions row: the runbook's own clean-up, for hard bounces.
    try:
        return SuppressionReason(value)
    except ValueError:
        return SuppressionReason.HARD_BOUNCE


@asynccontextmanager
async def no_lock() -> AsyncIterator[None]:
    yield
