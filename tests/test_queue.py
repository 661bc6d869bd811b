"""The queue's storage contract, run unchanged against SQLite and a real MariaDB."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT

from relay.clock import utcnow
from relay.ids import new_queue_id
from relay.queue import (
    AttemptResult,
    DeliveryStatus,
    MessageStatus,
    NewMessage,
    RecipientUpdate,
    SqlStore,
    StoreUnavailable,
    create_store,
    mysql,
)
from relay.queue.sql import PRELOAD_MAX_BYTES
from tests.conftest import relay_settings

LEASE = timedelta(minutes=5)


def new_message(*recipients: str, content: bytes = b"Subject: x\r\n\r\nbody\r\n") -> NewMessage:
    return NewMessage(
        id=new_queue_id(),
        workspace_id="default",
        from_email="sender@example.org",
        recipients=recipients or ("to@example.net",),
        subject="x",
        content=content,
        queued_at=utcnow(),
    )


async def test_enqueue_commits_message_content_and_every_recipient(store: SqlStore) -> None:
    message = new_message("a@example.net", "b@example.net", "c@example.net")
    await store.enqueue(message)

    found = await store.message_status(message.id)
    assert found is not None
    assert found["status"] == "queued"
    assert [r["email_address"] for r in found["recipients"]] == list(message.recipients)
    assert {r["delivery_status"] for r in found["recipients"]} == {"QUEUED"}
    assert await store.load_content(message.id) == message.content


async def test_large_binary_content_round_trips(store: SqlStore) -> None:
    content = bytes(range(256)) * 40_000  # 10 MB, every byte value
    message = new_message(content=content)
    await store.enqueue(message)
    assert await store.load_content(message.id) == content


async def test_claim_leases_due_messages_once(store: SqlStore) -> None:
    messages = [new_message() for _ in range(5)]
    for message in messages:
        await store.enqueue(message)

    now = utcnow()
    first = await store.claim(worker_id="w1", limit=3, lease=LEASE, now=now)
    second = await store.claim(worker_id="w2", limit=10, lease=LEASE, now=now)
    third = await store.claim(worker_id="w3", limit=10, lease=LEASE, now=now)

    assert len(first) == 3 and len(second) == 2 and third == []
    claimed = {m.id for m in first} | {m.id for m in second}
    assert claimed == {m.id for m in messages}
    stats = await store.stats(now=now)
    assert stats.counts == {"processing": 5}


async def test_a_claim_brings_small_contents_and_leaves_large_ones_for_later(
    store: SqlStore,
) -> None:
    small = new_message(content=b"Subject: x\r\n\r\n" + b"s" * 1000 + b"\r\n")
    large = new_message(content=b"Subject: y\r\n\r\n" + b"L" * PRELOAD_MAX_BYTES + b"\r\n")
    await store.enqueue(small)
    await store.enqueue(large)

    batch = await store.claim(worker_id="w", limit=10, lease=LEASE, now=utcnow())
    claimed = {m.id: m for m in batch}

    assert claimed[small.id].content == small.content
    # Read at delivery instead: a batch of large messages never sits in memory at once.
    assert claimed[large.id].content is None
    assert await store.load_content(large.id) == large.content
    assert "LLLL" not in repr(claimed[large.id]) and "ssss" not in repr(claimed[small.id])


async def test_recipients_beyond_one_statements_parameters_are_all_stored(
    store: SqlStore,
) -> None:
    # 7,000 rows of 5 parameters: more than SQLite takes in one statement with its default
    # limit of 32,766 (Debian builds it with 250,000: the test sets the default back).
    if store.backend == "sqlite":
        aio = store._conn  # type: ignore[attr-defined]
        limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
        await aio._execute(aio._conn.setlimit, limit, 32766)
    recipients = [f"p{n}@example.net" for n in range(7000)]
    message = new_message(*recipients)
    await store.enqueue(message)

    found = await store.message_status(message.id)
    assert found is not None
    assert [r["email_address"] for r in found["recipients"]] == recipients
    [claimed] = await store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow())
    assert [r.address for r in claimed.recipients] == recipients


async def test_messages_not_yet_due_are_not_claimed(store: SqlStore) -> None:
    await store.enqueue(new_message())
    past = utcnow() - timedelta(minutes=1)
    assert await store.claim(worker_id="w", limit=10, lease=LEASE, now=past) == []


async def test_concurrent_claims_from_two_connections_never_overlap(
    queue_settings: dict[str, Any], tmp_path: Path
) -> None:
    stores = [create_store(relay_settings(tmp_path, queue_settings)) for _ in range(2)]
    for s in stores:
        await s.open()
    await stores[0].migrate()
    ids = set()
    for _ in range(200):
        message = new_message()
        ids.add(message.id)
        await stores[0].enqueue(message)

    async def drain(store: SqlStore, worker: str) -> list[str]:
        got: list[str] = []
        while batch := await store.claim(worker_id=worker, limit=7, lease=LEASE, now=utcnow()):
            got.extend(m.id for m in batch)
        return got

    results = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate(stores)))
    for s in stores:
        await s.close()
    everything = results[0] + results[1]
    assert len(everything) == len(set(everything)) == 200
    assert set(everything) == ids


async def test_complete_records_per_recipient_outcome(store: SqlStore) -> None:
    message = new_message("ok@example.net", "bad@example.net")
    await store.enqueue(message)
    [claimed] = await store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow())
    ok, bad = claimed.recipients
    now = utcnow()
    result = AttemptResult(
        status=MessageStatus.FAILED,
        error="1 recipient(s) failed: 550 no such user",
        retry_count=0,
        next_attempt_at=None,
        finished_at=now,
        recipients=(
            RecipientUpdate(ok.row_id, DeliveryStatus.SENT, None, "smarthost", "ABC123", now),
            RecipientUpdate(bad.row_id, DeliveryStatus.FAILED, "550 no such user", "smarthost"),
        ),
    )
    assert await store.complete(worker_id="w", message_id=message.id, result=result)

    found = await store.message_status(message.id)
    assert found is not None
    assert found["status"] == "failed"
    assert found["processed_at"] is not None
    by_address = {r["email_address"]: r for r in found["recipients"]}
    assert by_address["ok@example.net"]["delivery_status"] == "SENT"
    assert by_address["ok@example.net"]["provider_message_id"] == "ABC123"
    assert by_address["ok@example.net"]["sent_at"] is not None
    assert by_address["bad@example.net"]["error"] == "550 no such user"
    assert by_address["bad@example.net"]["attempts"] == 1


async def test_deferred_recipients_are_the_only_ones_claimed_again(store: SqlStore) -> None:
    message = new_message("done@example.net", "later@example.net")
    await store.enqueue(message)
    [claimed] = await store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow())
    done, later = claimed.recipients
    now = utcnow()
    await store.complete(
        worker_id="w",
        message_id=message.id,
        result=AttemptResult(
            status=MessageStatus.QUEUED,
            error="deferred",
            retry_count=1,
            next_attempt_at=now + timedelta(seconds=30),
            finished_at=now,
            recipients=(
                RecipientUpdate(done.row_id, DeliveryStatus.SENT, sent_at=now),
                RecipientUpdate(later.row_id, DeliveryStatus.DEFERRED, "451 try later"),
            ),
        ),
    )
    assert await store.claim(worker_id="w", limit=1, lease=LEASE, now=now) == []
    [again] = await store.claim(
        worker_id="w", limit=1, lease=LEASE, now=now + timedelta(seconds=31)
    )
    assert [r.address for r in again.recipients] == ["later@example.net"]
    assert again.retry_count == 1


async def test_expired_lease_is_requeued_not_deleted(store: SqlStore) -> None:
    message = new_message()
    await store.enqueue(message)
    now = utcnow()
    await store.claim(worker_id="dead", limit=1, lease=timedelta(seconds=1), now=now)

    assert await store.requeue_expired(now=now) == 0
    assert await store.requeue_expired(now=now + timedelta(seconds=2)) == 1
    [again] = await store.claim(
        worker_id="alive", limit=1, lease=LEASE, now=now + timedelta(seconds=2)
    )
    assert again.id == message.id


async def test_a_lost_lease_cannot_overwrite_the_new_holders_outcome(store: SqlStore) -> None:
    message = new_message()
    await store.enqueue(message)
    now = utcnow()
    [claimed] = await store.claim(worker_id="slow", limit=1, lease=timedelta(seconds=1), now=now)
    later = now + timedelta(seconds=5)
    await store.requeue_expired(now=later)
    await store.claim(worker_id="fast", limit=1, lease=LEASE, now=later)

    row = claimed.recipients[0].row_id
    refused = RecipientUpdate(row, DeliveryStatus.FAILED, "550 stale", "smarthost")
    stale = AttemptResult(MessageStatus.FAILED, "stale", 0, None, later, (refused,))
    assert not await store.complete(worker_id="slow", message_id=message.id, result=stale)
    found = await store.message_status(message.id)
    assert found is not None and found["status"] == "processing"
    # Nor its recipients' (on MySQL they are in the same query as the fence: see complete).
    [recipient] = found["recipients"]
    assert (recipient["delivery_status"], recipient["attempts"]) == ("QUEUED", 0)

    sent = RecipientUpdate(row, DeliveryStatus.SENT, None, "smarthost", "ID1", later)
    done = AttemptResult(MessageStatus.SENT, None, 0, None, later, (sent,))
    assert await store.complete(worker_id="fast", message_id=message.id, result=done)
    found = await store.message_status(message.id)
    assert found is not None and found["status"] == "sent"
    assert [(r["delivery_status"], r["attempts"]) for r in found["recipients"]] == [("SENT", 1)]


async def test_renew_extends_only_the_holders_leases(store: SqlStore) -> None:
    message = new_message()
    await store.enqueue(message)
    now = utcnow()
    await store.claim(worker_id="w", limit=1, lease=timedelta(seconds=1), now=now)
    assert await store.renew(worker_id="other", message_ids=[message.id], until=now) == 0
    assert (
        await store.renew(
            worker_id="w", message_ids=[message.id], until=now + timedelta(minutes=10)
        )
        == 1
    )
    assert await store.requeue_expired(now=now + timedelta(minutes=5)) == 0


async def test_release_returns_claims_without_counting_a_retry(store: SqlStore) -> None:
    message = new_message()
    await store.enqueue(message)
    await store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow())
    assert await store.release(worker_id="w", message_ids=[message.id]) == 1
    [again] = await store.claim(worker_id="w2", limit=1, lease=LEASE, now=utcnow())
    assert again.retry_count == 0


async def test_migrations_are_idempotent(store: SqlStore) -> None:
    assert await store.migrate() == []
    assert await store.schema_version() == max(m.version for m in store.migrations)


async def test_stats_report_depth_and_oldest_age(store: SqlStore) -> None:
    first = new_message()
    await store.enqueue(first)
    await store.enqueue(new_message())
    stats = await store.stats(now=utcnow())
    assert stats.counts == {"queued": 2}
    assert stats.depth() == 2
    assert stats.oldest_queued_at is not None
    assert abs((stats.oldest_queued_at - first.queued_at).total_seconds()) < 0.001


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_runbook_indexes_exist(store: SqlStore, queue_settings: dict[str, Any]) -> None:
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT table_name, index_name FROM information_schema.statistics"
            " WHERE table_schema = ?",
            (queue_settings["mysql"]["database"],),
        )
    indexes = {(str(t).lower(), str(i)) for t, i in rows}
    assert ("messages", "idx_workspace_status_queued") in indexes
    assert ("messages", "idx_status_queued") in indexes
    assert ("recipients", "idx_email_workspace") in indexes
    assert ("message_recipients", "idx_sent_status") in indexes


async def one_connection_store(queue: dict[str, Any], tmp_path: Path) -> SqlStore:
    """A store on a single connection: whatever one call leaves on it, the next one meets."""
    migrating = create_store(relay_settings(tmp_path, queue))
    await migrating.open()
    # On its own connections: the migration lock holds one while the migrations use another.
    await migrating.migrate()
    await migrating.close()
    if queue["backend"] == "mysql":
        queue = {**queue, "mysql": {**queue["mysql"], "min_connections": 1, "max_connections": 1}}
    opened = create_store(relay_settings(tmp_path, queue))
    await opened.open()
    return opened


async def test_a_failing_statement_in_a_batch_leaves_nothing_written(
    queue_settings: dict[str, Any], tmp_path: Path
) -> None:
    """write_all sends its statements and the COMMIT as one query on MySQL; when the second
    fails (a duplicate key), the first one's row is rolled back, and the next commit on the
    same connection does not carry it along."""
    store = await one_connection_store(queue_settings, tmp_path)
    insert = "INSERT INTO quota_usage (workspace_id, subject, day, used) VALUES (?, ?, ?, ?)"
    try:
        await store.write_all([(insert, ("w", "taken", "2026-12-04", 1))])
        with pytest.raises((StoreUnavailable, sqlite3.IntegrityError)):
            await store.write_all(
                [
                    (insert, ("w", "first", "2026-12-04", 1)),
                    (insert, ("w", "taken", "2026-12-04", 2)),
                ]
            )
        await store.write_all([(insert, ("w", "later", "2026-12-04", 3))])
        assert await store.quota_used("w", "2026-12-04") == {"taken": 1, "later": 3}
    finally:
        await store.close()
    # And seen from a connection of its own: nothing of the failed batch was committed.
    other = await one_connection_store(queue_settings, tmp_path)
    try:
        assert await other.quota_used("w", "2026-12-04") == {"taken": 1, "later": 3}
    finally:
        await other.close()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_one_trip_queries_end_their_transaction(
    queue_settings: dict[str, Any], tmp_path: Path
) -> None:
    """read, write_all and claim end their transaction within their last query. A read left open
    would hold its tables' metadata locks on a pooled connection (MariaDB does not even
    flag a read-only transaction as open, so aiomysql's pool would keep it as it is) and
    block every later ALTER TABLE: a migration would wait for it."""
    store = await one_connection_store(queue_settings, tmp_path)
    other = create_store(relay_settings(tmp_path, queue_settings))
    await other.open()
    try:
        pool = store._pool  # type: ignore[attr-defined]
        connection = next(iter(pool._free))
        assert connection.client_flag & CLIENT.MULTI_STATEMENTS
        message = new_message("a@example.net", "b@example.net")
        await store.enqueue(message)
        assert await store.load_content(message.id) == message.content
        assert await store.suppressed_among("default", ["a@example.net"]) == {}
        # A claim's two trips, and the one of a claim that finds nothing due.
        [claimed] = await store.claim(worker_id="w", limit=5, lease=LEASE, now=utcnow())
        assert [r.address for r in claimed.recipients] == ["a@example.net", "b@example.net"]
        assert await store.claim(worker_id="w", limit=5, lease=LEASE, now=utcnow()) == []
        # The same connection is still there: nothing was closed to end a transaction.
        assert pool.freesize == 1 and next(iter(pool._free)) is connection
        async with other.transaction() as tx:
            await tx.execute("SET SESSION lock_wait_timeout = 2")
            for table in ("messages", "message_contents", "recipients", "suppressions"):
                await tx.execute(f"ALTER TABLE {table} COMMENT = 'not locked'")
    finally:
        await other.close()
        await store.close()


def test_server_texts_that_may_quote_data_are_withheld() -> None:
    """A MySQL error's text can quote a statement's values (an address, the message): only
    the code of such errors reaches StoreUnavailable, which is logged and may be replied."""
    body = "Your HIV test result is ready"
    duplicate = pymysql.err.IntegrityError(1062, f"Duplicate entry '{body}' for key 'PRIMARY'")
    signalled = pymysql.err.OperationalError(1644, body)
    lost = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    denied = pymysql.err.OperationalError(1045, "Access denied for user 'relay'@'localhost'")
    assert [str(mysql._unavailable(e)) for e in (duplicate, signalled, lost, denied)] == [
        "MySQL queue unavailable: IntegrityError 1062 (server text withheld)",
        "MySQL queue unavailable: OperationalError 1644 (server text withheld)",
        "MySQL queue unavailable: OperationalError"
        " (2013, 'Lost connection to MySQL server during query')",
        "MySQL queue unavailable: OperationalError"
        " (1045, \"Access denied for user 'relay'@'localhost'\")",
    ]


def test_the_raw_message_is_quoted_exactly_as_pymysql_would() -> None:
    """The enqueue quotes the message itself (15 times faster than PyMySQL's translate);
    the literal must be byte for byte PyMySQL's, whatever the bytes. MariaDB's side of
    it: test_large_binary_content_round_trips."""
    from pymysql.converters import escape_bytes_prefixed

    samples = [bytes(range(256)) * 3, b"", b"'\\\"\0\n\r\x1a", b"\\'", secrets.token_bytes(65536)]
    for sample in samples:
        assert mysql._binary_literal(sample) == escape_bytes_prefixed(sample)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_transaction_cancelled_while_it_begins_leaves_the_queue_usable(
    store: SqlStore,
) -> None:
    """aiosqlite runs BEGIN on its thread whether or not its caller still waits: a claim
    cancelled there (the engine stopping just after it started) must not leave the
    connection inside a transaction that every later call would fail to begin."""
    await store.enqueue(new_message())
    claim = asyncio.create_task(store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow()))
    await asyncio.sleep(0)  # the claim waits on its BEGIN IMMEDIATE
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim

    stats = await store.stats(now=utcnow())
    assert stats.counts == {"queued": 1}


def _deadlocks(connection: Any) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
        return int(cursor.fetchone()[1])


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_a_lease_renewal_that_loses_a_deadlock_is_run_again(
    store: SqlStore, queue_settings: dict[str, Any], mariadb: Any
) -> None:
    """InnoDB rolls back one of two transactions that wait on each other; the relay's
    renewal, the lighter of the two here, is that victim and must still renew its leases."""
    first = new_message()
    await store.enqueue(first)
    await asyncio.sleep(0.01)  # ids and due times in this order, whichever index is read
    second = new_message()
    await store.enqueue(second)
    claimed = await store.claim(worker_id="w", limit=2, lease=LEASE, now=utcnow())
    assert [message.id for message in claimed] == [first.id, second.id]
    heavy = new_message(*(f"p{n}@example.net" for n in range(40)))
    await store.enqueue(heavy)
    other = mariadb.admin()
    other.select_db(queue_settings["mysql"]["database"])
    before = _deadlocks(other)

    # Another transaction holds the second message, after forty recipient rows of a third
    # message that make it the heavier one, which InnoDB keeps.
    other.begin()
    with other.cursor() as cursor:
        cursor.execute(
            "UPDATE message_recipients SET error = 'held' WHERE message_id = %s", (heavy.id,)
        )
        cursor.execute("UPDATE messages SET error = 'held' WHERE id = %s", (second.id,))
    # The renewal locks the first message, then waits for the second.
    renewal = asyncio.create_task(
        store.renew(worker_id="w", message_ids=[first.id, second.id], until=utcnow() + LEASE)
    )
    await asyncio.sleep(0.5)
    assert not renewal.done()

    # The other now wants the first message: a cycle, and InnoDB breaks it.
    def close_the_cycle() -> None:
        with other.cursor() as cursor:
            cursor.execute("UPDATE messages SET error = 'held' WHERE id = %s", (first.id,))
        other.commit()

    await asyncio.to_thread(close_the_cycle)
    renewed = await asyncio.wait_for(renewal, 30)

    assert _deadlocks(other) == before + 1, "the renewal met a deadlock"
    assert renewed == 2
    other.close()


def _rows_walked(connection: Any) -> int:
    """Index and table entries the whole server has stepped through so far."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Handler_read%'")
        return sum(int(value) for _, value in cursor.fetchall())


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_a_claim_reads_its_own_recipients_not_the_whole_backlog(
    store: SqlStore, mariadb: Any
) -> None:
    """The optimizer once chose, for some claims, to walk message_recipients whole in
    primary-key order rather than sort a claim's few rows: a claim's cost then grew with
    the backlog (10,000 rows examined per claim of ten, in the drain benchmark)."""
    backlog = 3000
    messages = [new_message(f"p{n}@example.net") for n in range(backlog)]
    for first in range(0, backlog, 100):
        await asyncio.gather(*(store.enqueue(m) for m in messages[first : first + 100]))
    admin = mariadb.admin()
    claims, claimed = 0, 0
    walked = -_rows_walked(admin)
    for limit in (10, 20, 7, 15, 10, 30, 10, 12, 10, 25):
        batch = await store.claim(worker_id="w", limit=limit, lease=LEASE, now=utcnow())
        claims, claimed = claims + 1, claimed + len(batch)
    walked += _rows_walked(admin)
    admin.close()

    assert claimed == 149
    # Per claim: its messages on two indexes, their recipients, contents and lease
    # updates, each a few entries per message. A walk of the recipients alone is 3,000.
    assert walked < 12 * claimed + 50 * claims, walked


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_live_counts_do_not_walk_the_finished_mail(
    store: SqlStore, queue_settings: dict[str, Any], mariadb: Any
) -> None:
    """The monitor counts the live statuses every few seconds and the health check on
    every probe; sent mail is kept for the retention period, and must not be walked."""
    for _ in range(20):
        await asyncio.gather(*(store.enqueue(new_message()) for _ in range(100)))
    admin = mariadb.admin()
    admin.select_db(queue_settings["mysql"]["database"])
    with admin.cursor() as cursor:
        cursor.execute("UPDATE messages SET status = 'sent'")
    waiting = [new_message() for _ in range(3)]
    for message in waiting:
        await store.enqueue(message)
    await store.claim(worker_id="w", limit=1, lease=LEASE, now=utcnow())

    walked = -_rows_walked(admin)
    live = await store.stats(now=utcnow(), finished=False)
    walked += _rows_walked(admin)
    every = await store.stats(now=utcnow())
    admin.close()

    assert live.counts == {"queued": 2, "processing": 1} and live.depth() == 3
    assert live.oldest_queued_at is not None and live.due == 2
    assert every.counts == {"queued": 2, "processing": 1, "sent": 2000}
    assert walked < 50, walked


def _charged(*recipients: str, workspace: int | None = 3, per_user: int | None = None) -> Any:
    import dataclasses

    from relay.limits import QuotaCharge

    message = new_message(*recipients)
    charge = QuotaCharge(
        workspace_id="default",
        user_key="app@example.org",
        day=utcnow().strftime("%Y-%m-%d"),
        recipients=len(message.recipients),
        workspace_daily=workspace,
        per_user_daily=per_user,
    )
    return dataclasses.replace(message, quota=charge)


async def test_a_quota_charge_commits_with_its_message_or_not_at_all(store: SqlStore) -> None:
    from relay.limits import QuotaExceeded

    day = utcnow().strftime("%Y-%m-%d")
    await store.enqueue(_charged("a@example.net", "b@example.net", per_user=10))
    with pytest.raises(QuotaExceeded) as refused:
        await store.enqueue(_charged("c@example.net", "d@example.net", per_user=10))
    assert refused.value.args[0] == "workspace_daily"
    # The workspace has room, the user does not: the workspace's charge is undone too.
    with pytest.raises(QuotaExceeded) as refused:
        await store.enqueue(_charged("e@example.net", workspace=10, per_user=2))
    assert refused.value.args[0] == "per_user_daily"
    await store.enqueue(_charged("f@example.net"))

    assert await store.quota_used("default", day) == {"*": 3, "app@example.org": 2}
    assert (await store.stats(now=utcnow())).counts == {"queued": 2}


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
async def test_a_charged_message_is_queued_in_two_round_trips(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts, quota rows, charges and their row counts, then the COMMIT: it was one
    round trip per statement (eight here)."""
    import aiomysql

    sent = 0
    command = aiomysql.Connection._execute_command

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        return await command(self, *args, **kwargs)

    await store.enqueue(new_message())  # the pool's connection, opened before counting
    monkeypatch.setattr(aiomysql.Connection, "_execute_command", counted)
    await store.enqueue(_charged("a@example.net", per_user=5))
    assert sent == 2
