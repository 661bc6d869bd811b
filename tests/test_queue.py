"""The queue's storage contract, run unchanged against SQLite and a real MariaDB."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.clock import utcnow
from relay.ids import new_queue_id
from relay.queue import (
    AttemptResult,
    DeliveryStatus,
    MessageStatus,
    NewMessage,
    RecipientUpdate,
    SqlStore,
    create_store,
)
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
    await store.claim(worker_id="slow", limit=1, lease=timedelta(seconds=1), now=now)
    later = now + timedelta(seconds=5)
    await store.requeue_expired(now=later)
    await store.claim(worker_id="fast", limit=1, lease=LEASE, now=later)

    stale = AttemptResult(MessageStatus.FAILED, "stale", 0, None, later)
    assert not await store.complete(worker_id="slow", message_id=message.id, result=stale)
    found = await store.message_status(message.id)
    assert found is not None and found["status"] == "processing"


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
