"""The production backend: MySQL 8+ or MariaDB 10.6+ through aiomysql, shared by replicas.

Claims use `SELECT ... FOR UPDATE SKIP LOCKED`, so replicas claiming at the same moment take
disjoint rows without waiting on each other; that clause is why older servers are refused
at start-up. Sessions run at READ COMMITTED in UTC.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import aiomysql
import pymysql
from pymysql.constants import CLIENT, ER

from relay.config import MysqlSettings
from relay.limits import QuotaCharge, QuotaExceeded
from relay.queue import schema
from relay.queue.model import AttemptResult, MessageStatus
from relay.queue.sql import MAX_GROUP_RECIPIENTS, Row, SqlStore, Statement, Tx
from relay.queue.store import StoreRefused, StoreUnavailable

_MIGRATION_LOCK = "smtp_relay_migrate"
# Room for the statement and the other columns next to the raw message in one packet.
_PACKET_OVERHEAD = 1024 * 1024


def _dialect(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


# Server errors whose text describes the server or the connection, never a statement's
# values. Other server texts can quote what a statement carried ("Duplicate entry '...'",
# "Incorrect string value: '...'", a SIGNAL's text, a syntax error "near '...'"), which in
# an enqueue is an address, a subject or the message itself: those keep only their code.
_SERVER_TEXT_SHOWN = frozenset(
    (
        ER.CON_COUNT_ERROR,
        ER.DBACCESS_DENIED_ERROR,
        ER.ACCESS_DENIED_ERROR,  # names the user and whether a password was sent, not it
        ER.BAD_DB_ERROR,
        ER.SERVER_SHUTDOWN,
        ER.NO_SUCH_TABLE,
        ER.BAD_FIELD_ERROR,
        ER.NET_PACKET_TOO_LARGE,
        ER.TOO_MANY_USER_CONNECTIONS,
        ER.LOCK_WAIT_TIMEOUT,
        ER.LOCK_DEADLOCK,
        ER.READ_ONLY_TRANSACTION,
        ER.OPTION_PREVENTS_STATEMENT,
        ER.QUERY_INTERRUPTED,
    )
)
# Codes from 2000 are the client library's own (CR_*: cannot connect, connection lost).
_CLIENT_ERRORS_FROM = 2000


def _code(exc: BaseException) -> int | None:
    code = exc.args[0] if isinstance(exc, pymysql.Error) and len(exc.args) > 1 else None
    return code if isinstance(code, int) else None


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """The error as a StoreUnavailable whose text is safe to log and to show in replies."""
    code = _code(exc)
    if code is not None and _CLIENT_ERRORS_FROM > code > 0 and code not in _SERVER_TEXT_SHOWN:
        shown = f"{code} (server text withheld)"
    else:
        shown = str(exc.args[:2])
    what = "lost a deadlock, rolled back" if code == ER.LOCK_DEADLOCK else "unavailable"
    text = f"MySQL queue {what}: {exc.__class__.__name__} {shown}"
    # Codes below 2000 are the server's answer to a statement: it was reached.
    refused = code is not None and 0 < code < _CLIENT_ERRORS_FROM
    return StoreRefused(text) if refused else StoreUnavailable(text)


# InnoDB picks a victim when two transactions wait on each other's row locks and rolls it
# back whole; MySQL's manual asks clients to run it again. Leases renewed while a group of
# outcomes commits, or replicas claiming and reaping, meet this now and then.
_DEADLOCK_RETRIES = 3
_T = TypeVar("_T")


def _deadlock(exc: StoreUnavailable) -> bool:
    return exc.__cause__ is not None and _code(exc.__cause__) == ER.LOCK_DEADLOCK


async def _again_after_deadlock(transaction: Callable[[], Awaitable[_T]]) -> _T:
    """Run a whole transaction, and run it again if it was the victim of a deadlock."""
    for attempt in range(_DEADLOCK_RETRIES):
        try:
            return await transaction()
        except StoreRefused as exc:
            if not _deadlock(exc):
                raise
            # Apart, so that the two transactions do not meet in the same order again.
            await asyncio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
    return await transaction()


class _MysqlTx(Tx):
    def __init__(self, cursor: aiomysql.Cursor) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(await self._cursor.execute(_dialect(sql), tuple(params)))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._cursor.executemany(_dialect(sql), [tuple(row) for row in rows])

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._cursor.execute(_dialect(sql), tuple(params))
        return [tuple(row) for row in await self._cursor.fetchall()]


class MysqlStore(SqlStore):
    backend = "mysql"
    migrations = (*schema.MYSQL, schema.MYSQL_STATE)
    # ON DUPLICATE KEY rather than INSERT IGNORE: IGNORE raises a server warning per call.
    ensure_quota_row_sql = (
        "INSERT INTO quota_usage (workspace_id, subject, day, used) VALUES (?, ?, ?, 0)"
        " ON DUPLICATE KEY UPDATE used = used"
    )
    table_exists_sql = (
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = DATABASE() AND table_name = ?"
    )
    # The few recipients of a claim's messages, never a walk of the whole table, whatever
    # the optimizer's statistics say at the moment.
    _RECIPIENTS_BY_MESSAGE = "message_recipients FORCE INDEX (idx_message)"
    _MESSAGES_BY_STATUS = "messages FORCE INDEX (idx_status_queued)"

    def __init__(self, settings: MysqlSettings, *, max_message_size: int | None = None) -> None:
        self.settings = settings
        self.max_message_size = max_message_size
        self._pool: aiomysql.Pool | None = None
        self.server_version = ""

    async def open(self) -> None:
        s = self.settings
        try:
            self._pool = await aiomysql.create_pool(
                host=s.host,
                port=s.port,
                unix_socket=s.unix_socket,
                user=s.user,
                password=s.resolved_password(),
                db=s.database,
                minsize=s.min_connections,
                maxsize=s.max_connections,
                pool_recycle=int(s.conn_lifetime.total_seconds()),
                connect_timeout=s.connect_timeout.total_seconds(),
                autocommit=False,
                # write_all and read send several statements in one query. aiomysql 0.3
                # asks for this by default; said here so that no upgrade silently drops it.
                client_flag=CLIENT.MULTI_STATEMENTS,
                charset="utf8mb4",
                init_command=(
                    "SET SESSION time_zone = '+00:00', SESSION tx_isolation = 'READ-COMMITTED'"
                ),
            )
        except (pymysql.Error, OSError) as exc:
            raise _unavailable(exc) from exc
        await self._check_server()

    async def _check_server(self) -> None:
        async with self.transaction() as tx:
            rows = await tx.fetchall("SELECT VERSION(), @@max_allowed_packet")
        version, max_packet = str(rows[0][0]), int(rows[0][1])
        self.server_version = version
        if not _supports_skip_locked(version):
            raise StoreUnavailable(
                f"MySQL server {version} lacks SELECT ... SKIP LOCKED:"
                " MySQL 8.0+ or MariaDB 10.6+ is required"
            )
        if self.max_message_size and max_packet < self.max_message_size + _PACKET_OVERHEAD:
            raise StoreUnavailable(
                f"server max_allowed_packet is {max_packet} bytes, too small for"
                f" smtp.max_message_size {self.max_message_size}: raise it to at least"
                f" {self.max_message_size + _PACKET_OVERHEAD}"
            )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None

    async def ping(self) -> None:
        async with self.transaction() as tx:
            await tx.fetchall("SELECT 1")

    @asynccontextmanager
    async def _cursor(self) -> AsyncIterator[aiomysql.Cursor]:
        """A cursor on a pooled connection; rolled back if the block fails, whatever it
        was doing, and database failures raised as StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable("MySQL queue is not open")
        try:
            conn = await self._pool.acquire()
        except (pymysql.Error, OSError) as exc:
            raise _unavailable(exc) from exc
        try:
            # No BEGIN: with autocommit off the first statement opens the transaction, and
            # a BEGIN would cost a round trip of its own.
            cursor = await conn.cursor()
            try:
                yield cursor
            except BaseException as exc:
                await _rollback_quietly(conn)
                if isinstance(exc, pymysql.Error | OSError):
                    raise _unavailable(exc) from exc
                raise
            finally:
                await cursor.close()
        finally:
            self._pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._cursor() as cursor:
            yield _MysqlTx(cursor)
            await cursor.connection.commit()

    async def write_all(self, statements: Sequence[Statement]) -> None:
        # The statements and the COMMIT go to the server as one multi-statement query
        # (CLIENT.MULTI_STATEMENTS, see open): one round trip. The server stops at the
        # first statement that fails, so the COMMIT is never reached, and _one_trip rolls
        # back what the statements before it wrote.
        await self._one_trip([*statements, ("COMMIT", ())])

    async def _enqueue_charged(self, statements: list[Statement], charge: QuotaCharge) -> None:
        # Two round trips instead of one per statement: the inserts, the quota rows and
        # the conditional charges, each charge followed by its ROW_COUNT(); then COMMIT,
        # or ROLLBACK when a charge found no room. The charges hold their rows' locks
        # until then, so racing replicas still cannot both take the last of a quota.
        charges = self._charge_statements(charge)
        sent = [*statements]
        for _, ensure, update in charges:
            sent += [ensure, update, ("SELECT ROW_COUNT()", ())]

        async def once() -> None:
            async with self._cursor() as cursor:
                results, _ = await _send(cursor, sent)
                # One result per statement: each ROW_COUNT() is the last of its three.
                counts = [results[len(statements) + 3 * n + 2] for n in range(len(charges))]
                for (name, _, _), [(charged,)] in zip(charges, counts, strict=True):
                    if not charged:
                        raise QuotaExceeded(name)  # _cursor rolls the transaction back
                await cursor.connection.commit()

        await _again_after_deadlock(once)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        # The query and the COMMIT that ends its implicit transaction, in one round trip.
        results, _ = await self._one_trip([(sql, params), ("COMMIT", ())])
        return results[0]

    async def complete(self, *, worker_id: str, message_id: str, result: AttemptResult) -> bool:
        # One round trip instead of one per statement: the recipients' updates apply only
        # if the fenced update of the message found the lease still held (ROW_COUNT() of
        # the statement just before, kept in a session variable), all in one transaction.
        fence, updates = self._outcome_statements(worker_id, message_id, result)
        _, held = await self._one_trip(
            [
                fence,
                ("SET @relay_lease_held = ROW_COUNT()", ()),
                *((sql + " AND @relay_lease_held = 1", params) for sql, params in updates),
                ("COMMIT", ()),
            ]
        )
        return held > 0

    async def complete_many(
        self, *, worker_id: str, outcomes: Sequence[tuple[str, AttemptResult]]
    ) -> list[bool]:
        if len(outcomes) == 1:
            [(message_id, result)] = outcomes
            return [await self.complete(worker_id=worker_id, message_id=message_id, result=result)]
        if sum(len(result.recipients) for _, result in outcomes) > MAX_GROUP_RECIPIENTS:
            # complete's statements, one set per outcome, in one transaction: CASE picks a
            # row's value by comparing its key with each WHEN in turn.
            return await super().complete_many(worker_id=worker_id, outcomes=outcomes)
        message_ids = [message_id for message_id, _ in outcomes]
        if len(set(message_ids)) != len(message_ids):
            raise ValueError("a group holds one outcome per message")
        results, _ = await self._one_trip(self._group_statements(worker_id, outcomes))
        held = {str(row[0]) for row in results[0]}
        return [message_id in held for message_id in message_ids]

    def _group_statements(
        self, worker_id: str, outcomes: Sequence[tuple[str, AttemptResult]]
    ) -> list[Statement]:
        """Four statements for the whole group, sent with its COMMIT as one query.

        The server's work goes by statements far more than by rows (docs/benchmarks.md:
        three per message made MariaDB's CPU per delivered message as large as the
        relay's), so each table gets one UPDATE whose values are chosen per row by CASE.
        The SELECT ... FOR UPDATE names the messages whose lease this worker still holds,
        which are the group's answer, and locks them until the COMMIT, so that both
        UPDATEs, fenced by the same condition, see the same messages. A recipient row is
        updated only through its message (the join), so an outcome whose lease was lost
        writes nothing. A statement that fails stops the query before the COMMIT.
        """
        processing = MessageStatus.PROCESSING.value
        message_ids = [message_id for message_id, _ in outcomes]
        in_messages = ", ".join("?" * len(message_ids))
        messages: list[tuple[Any, tuple[Any, ...]]] = []
        recipients: list[tuple[Any, tuple[Any, ...]]] = []
        owners: list[tuple[Any, tuple[Any, ...]]] = []
        for message_id, result in outcomes:
            written, updates = self._outcome_values(result)
            messages.append((message_id, written))
            recipients.extend(updates)
            owners.extend((row_id, (message_id,)) for row_id, _ in updates)

        statements: list[Statement] = [
            (
                f"SELECT id FROM messages WHERE id IN ({in_messages})"
                " AND claimed_by = ? AND status = ? FOR UPDATE",
                (*message_ids, worker_id, processing),
            )
        ]
        if recipients:
            row_ids = [row_id for row_id, _ in recipients]
            assignments, values = _cases("r.id", recipients, _RECIPIENT_ASSIGNMENTS)
            owned, owners_values = _cases("r.id", owners, ("r.message_id = {}",))
            statements.append(
                (
                    "UPDATE message_recipients r JOIN messages m ON m.id = r.message_id"
                    f" SET {assignments}, r.attempts = r.attempts + 1"
                    f" WHERE r.id IN ({', '.join('?' * len(row_ids))}) AND {owned}"
                    " AND m.claimed_by = ? AND m.status = ?",
                    (*values, *row_ids, *owners_values, worker_id, processing),
                )
            )
        assignments, values = _cases("id", messages, _MESSAGE_ASSIGNMENTS)
        statements += [
            (
                f"UPDATE messages SET {assignments}, claimed_by = NULL, claim_expires_at = NULL"
                f" WHERE id IN ({in_messages}) AND claimed_by = ? AND status = ?",
                (*values, *message_ids, worker_id, processing),
            ),
            ("COMMIT", ()),
        ]
        return statements

    async def _one_trip(self, statements: Sequence[Statement]) -> tuple[list[list[Row]], int]:
        """Send the statements as one query (see _send) on a connection of their own.

        Rolled back on failure (the COMMIT, if it is the last statement, was not reached).
        The query is its whole transaction, so a deadlock's victim is sent again as it was.
        """

        async def once() -> tuple[list[list[Row]], int]:
            async with self._cursor() as cursor:
                return await _send(cursor, statements)

        return await _again_after_deadlock(once)

    async def renew(self, *, worker_id: str, message_ids: Sequence[str], until: datetime) -> int:
        if not message_ids:
            return 0
        # One round trip, and again after a deadlock: a lapsed lease is a second delivery.
        _, renewed = await self._one_trip(
            [self._renew_statement(worker_id, message_ids, until), ("COMMIT", ())]
        )
        return renewed

    @asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        # A named lock, so replicas starting together migrate one at a time.
        async with self.transaction() as tx:
            rows = await tx.fetchall("SELECT GET_LOCK(?, 60)", (_MIGRATION_LOCK,))
            if not rows or rows[0][0] != 1:
                raise StoreUnavailable("timed out waiting for another replica's migration")
            try:
                yield
            finally:
                await tx.fetchall("SELECT RELEASE_LOCK(?)", (_MIGRATION_LOCK,))

    def to_db_time(self, value: datetime) -> datetime:
        return value

    def from_db_time(self, value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    async def _claim_batch(
        self, *, worker_id: str, limit: int, until: datetime, now: datetime
    ) -> tuple[list[Row], list[Row], list[Row]]:
        return await _again_after_deadlock(
            lambda: self._claim_once(worker_id=worker_id, limit=limit, until=until, now=now)
        )

    async def _claim_once(
        self, *, worker_id: str, limit: int, until: datetime, now: datetime
    ) -> tuple[list[Row], list[Row], list[Row]]:
        # Two round trips instead of one per statement: the due messages, locked (SKIP
        # LOCKED: replicas claiming at the same moment take disjoint rows), then their
        # lease, their recipients, their contents and the COMMIT as one query.
        async with self._cursor() as cursor:
            [rows], _ = await _send(
                cursor,
                [
                    (
                        f"SELECT {self._CLAIM_COLUMNS} FROM messages"
                        " FORCE INDEX (idx_status_next_attempt) WHERE status = ?"
                        " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
                        " FOR UPDATE SKIP LOCKED",
                        (MessageStatus.QUEUED.value, now, limit),
                    )
                ],
            )
            if not rows:
                await cursor.connection.commit()
                return [], [], []
            ids = [row[0] for row in rows]
            recipients, contents = self._claimed_reads(rows)
            results, _ = await _send(
                cursor,
                [
                    (
                        "UPDATE messages SET status = ?, claimed_by = ?, claim_expires_at = ?,"
                        f" processed_at = ? WHERE id IN ({', '.join('?' * len(ids))})",
                        (MessageStatus.PROCESSING.value, worker_id, until, now, *ids),
                    ),
                    recipients,
                    *([contents] if contents else []),
                    ("COMMIT", ()),
                ],
            )
        return rows, results[1], results[2] if contents else []


async def _send(
    cursor: aiomysql.Cursor, statements: Sequence[Statement]
) -> tuple[list[list[Row]], int]:
    """Send the statements as one query; the rows of each (none for a statement that returns
    none) and the first one's affected row count."""
    sql = ";\n".join(_dialect(text) for text, _ in statements)
    params = [value for _, values in statements for value in values]
    # Interpolated here rather than by aiomysql, for the raw message's sake: see
    # _binary_literal. Executed without arguments, so nothing is done twice. A group's
    # CASE lists name each id and timestamp five or six times: each is escaped once.
    escaped: dict[tuple[type, Any], str] = {}
    literals = tuple(_literal(cursor.connection, value, escaped) for value in params)
    await cursor.execute(sql % literals)
    first = int(cursor.rowcount)
    results = [[tuple(row) for row in await cursor.fetchall() or ()]]
    # Every result must be read (the failure of a later statement surfaces here) before
    # the connection can take another query.
    while await cursor.nextset():
        results.append([tuple(row) for row in await cursor.fetchall() or ()])
    return results, first


# PyMySQL's escapes for a quoted literal (converters._escape_table), backslash first.
_BINARY_ESCAPES = (
    (b"\\", b"\\\\"),
    (b"\0", b"\\0"),
    (b"\n", b"\\n"),
    (b"\r", b"\\r"),
    (b"\x1a", b"\\Z"),
    (b'"', b'\\"'),
    (b"'", b"\\'"),
)


# What _outcome_values gives, in its order, as one group's assignments (see _cases).
_MESSAGE_ASSIGNMENTS = (
    "status = {}",
    "error = {}",
    "retry_count = {}",
    "next_attempt_at = {}",
    "processed_at = {}",
)
_RECIPIENT_ASSIGNMENTS = (
    "r.delivery_status = {}",
    "r.error = {}",
    "r.provider = COALESCE({}, r.provider)",
    "r.provider_message_id = COALESCE({}, r.provider_message_id)",
    "r.sent_at = COALESCE({}, r.sent_at)",
    "r.updated_at = {}",
)


def _cases(
    key: str, rows: Sequence[tuple[Any, tuple[Any, ...]]], templates: Sequence[str]
) -> Statement:
    """Each template with `CASE key WHEN ? THEN ? ... END` in its place, joined by commas:
    the nth template takes, for the row whose key matches, the nth of the row's values."""
    case = f"CASE {key}" + " WHEN ? THEN ?" * len(rows) + " END"
    params = [
        value
        for column in range(len(templates))
        for row_key, values in rows
        for value in (row_key, values[column])
    ]
    return ", ".join(template.format(case) for template in templates), params


def _binary_literal(value: bytes) -> str:
    """The same _binary'...' literal as PyMySQL's escape_bytes_prefixed, made faster.

    PyMySQL maps every byte through str.translate: 12 % of ingest CPU for 4 KiB messages
    (docs/benchmarks.md). bytes.replace runs at memory speed; the bytes above 127 travel
    as surrogates that the connection encodes back (utf-8, surrogateescape), as PyMySQL's do.
    """
    for special, escaped in _BINARY_ESCAPES:
        if special in value:
            value = value.replace(special, escaped)
    return "_binary'" + value.decode("ascii", "surrogateescape") + "'"


def _literal(conn: aiomysql.Connection, value: Any, escaped: dict[tuple[type, Any], str]) -> str:
    if isinstance(value, bytes):
        return _binary_literal(value)
    # The type is part of the key: True == 1 and 1 == 1.0, but their literals differ.
    key = (type(value), value)
    try:
        return escaped[key]
    except KeyError:
        literal = escaped[key] = str(conn.escape(value))
        return literal
    except TypeError:  # unhashable: a list, escaped as PyMySQL does
        return str(conn.escape(value))


async def _rollback_quietly(conn: aiomysql.Connection) -> None:
    try:
        await conn.rollback()
    except (pymysql.Error, OSError):
        conn.close()


def _supports_skip_locked(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    major, minor = int(match[1]), int(match[2])
    if "mariadb" in version.lower():
        return (major, minor) >= (10, 6)
    return major >= 8
