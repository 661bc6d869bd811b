"""The embedded backend: one SQLite file, zero setup, one machine.

Durability: WAL journal with synchronous=FULL, so a transaction that returned is on disk
before the relay answers 250. SQLite has one writer at a time; transactions are serialised
in-process by a lock (aiosqlite runs the calls on one thread, but a transaction spans several
awaits and must not interleave with another coroutine's) and across processes by
BEGIN IMMEDIATE with a busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from relay.queue import schema
from relay.queue.model import MessageStatus
from relay.queue.sql import Row, SqlStore, Tx, no_lock
from relay.queue.store import StoreUnavailable

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


class _SqliteTx(Tx):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = await self._conn.execute(sql, params)
        return [tuple(row) for row in await cursor.fetchall()]


class SqliteStore(SqlStore):
    backend = "sqlite"
    migrations = (*schema.SQLITE, schema.SQLITE_STATE)
    table_exists_sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
    ensure_quota_row_sql = (
        "INSERT INTO quota_usage (workspace_id, subject, day, used) VALUES (?, ?, ?, 0)"
        " ON CONFLICT DO NOTHING"
    )

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=10)
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite queue {self.path}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def ping(self) -> None:
        async with self.transaction() as tx:
            await tx.fetchall("SELECT 1")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        if self._conn is None:
            raise StoreUnavailable("SQLite queue is not open")
        conn = self._conn
        async with self._lock:
            # aiosqlite runs BEGIN on its thread whether or not this task still waits for
            # it: a caller cancelled meanwhile (the engine stopping) must end what BEGIN
            # started before it lets go of the lock, or every later BEGIN would fail.
            begin = asyncio.ensure_future(conn.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite queue unavailable: {exc}") from exc
            except asyncio.CancelledError:
                with contextlib.suppress(sqlite3.Error):
                    await begin
                    await conn.rollback()
                raise
            try:
                yield _SqliteTx(conn)
            except BaseException:
                await conn.rollback()
                raise
            try:
                await conn.commit()
            except sqlite3.Error as exc:
                await conn.rollback()
                raise StoreUnavailable(f"SQLite commit failed: {exc}") from exc

    def migration_lock(self) -> AbstractAsyncContextManager[None]:
        return no_lock()

    def to_db_time(self, value: datetime) -> str:
        return value.strftime(_TIME_FORMAT)

    def from_db_time(self, value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(value)

    async def _claim_batch(
        self, *, worker_id: str, limit: int, until: datetime, now: datetime
    ) -> tuple[list[Row], list[Row], list[Row]]:
        async with self.transaction() as tx:
            rows = await tx.fetchall(
                "UPDATE messages SET status = ?, claimed_by = ?, claim_expires_at = ?,"
                " processed_at = ? WHERE id IN (SELECT id FROM messages WHERE status = ?"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?)"
                f" RETURNING {self._CLAIM_COLUMNS}",
                (
                    MessageStatus.PROCESSING.value,
                    worker_id,
                    self.to_db_time(until),
                    self.to_db_time(now),
                    MessageStatus.QUEUED.value,
                    self.to_db_time(now),
                    limit,
                ),
            )
            if not rows:
                return [], [], []
            recipients, contents = self._claimed_reads(rows)
            return (
                rows,
                await tx.fetchall(*recipients),
                await tx.fetchall(*contents) if contents else [],
            )
