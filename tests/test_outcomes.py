"""Outcomes committed in groups (`complete_many`, `OutcomeRecorder`), on SQLite and MariaDB.

Each guarantee of one-by-one `complete` must hold for every outcome of a group: the lease
fence, the recipients' updates, all of a group or none of it, nothing lost.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.clock import utcnow
from relay.delivery.outcomes import OutcomeRecorder
from relay.queue import (
    AttemptResult,
    ClaimedMessage,
    DeliveryStatus,
    MessageStatus,
    SqlStore,
    StoreUnavailable,
)
from relay.queue.model import RecipientUpdate
from relay.queue.sql import MAX_GROUP_RECIPIENTS
from tests.test_queue import LEASE, new_message, one_connection_store

POISON = "poisoned outcome"


def sent(message: ClaimedMessage, *, error: str | None = None) -> AttemptResult:
    now = utcnow()
    return AttemptResult(
        MessageStatus.SENT,
        None,
        0,
        None,
        now,
        tuple(
            RecipientUpdate(
                r.row_id, DeliveryStatus.SENT, error, "smarthost", f"id-{r.row_id}", now
            )
            for r in message.recipients
        ),
    )


async def claimed(store: SqlStore, count: int, *recipients: str) -> list[ClaimedMessage]:
    for _ in range(count):
        await store.enqueue(new_message(*recipients))
    return await store.claim(worker_id="w", limit=count, lease=LEASE, now=utcnow())


async def lose_lease(store: SqlStore) -> ClaimedMessage:
    """A message "w" claimed, whose lease expired and which "other" holds now."""
    await store.enqueue(new_message("lost@example.net"))
    now = utcnow()
    [message] = await store.claim(worker_id="w", limit=1, lease=timedelta(seconds=1), now=now)
    later = now + timedelta(seconds=5)
    assert await store.requeue_expired(now=later) == 1
    [again] = await store.claim(worker_id="other", limit=1, lease=LEASE, now=later)
    assert again.id == message.id
    return message


async def assert_sent(store: SqlStore, message: ClaimedMessage) -> None:
    found = await store.message_status(message.id)
    assert found is not None and found["status"] == "sent"
    assert [(r["delivery_status"], r["attempts"]) for r in found["recipients"]] == [
        ("SENT", 1)
    ] * len(message.recipients)
    assert all(r["provider_message_id"] for r in found["recipients"])


async def assert_untouched(store: SqlStore, message: ClaimedMessage) -> None:
    found = await store.message_status(message.id)
    assert found is not None and found["status"] == "processing"
    assert {(r["delivery_status"], r["attempts"]) for r in found["recipients"]} == {("QUEUED", 0)}


async def poison_recipient_updates(store: SqlStore) -> None:
    """Any recipient update carrying POISON as its error fails on the server."""
    async with store.transaction() as tx:
        if store.backend == "sqlite":
            await tx.execute(
                "CREATE TRIGGER poison BEFORE UPDATE ON message_recipients"
                f" WHEN NEW.error = '{POISON}' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        else:
            await tx.execute(
                "CREATE TRIGGER poison BEFORE UPDATE ON message_recipients FOR EACH ROW"
                f" IF NEW.error = '{POISON}' THEN"
                " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned'; END IF"
            )


# The store: several outcomes in one transaction


async def test_a_group_commits_every_outcome_and_each_recipient(store: SqlStore) -> None:
    messages = await claimed(store, 3, "a@example.net", "b@example.net")
    held = await store.complete_many(worker_id="w", outcomes=[(m.id, sent(m)) for m in messages])
    assert held == [True, True, True]
    for message in messages:
        await assert_sent(store, message)


async def test_a_group_writes_each_outcome_exactly_as_complete_would(store: SqlStore) -> None:
    """Values chosen per row (on MySQL by CASE) keep their types: times to the microsecond,
    counts, NULLs, a provider id only where one was given."""
    done, later = await claimed(store, 2, "a@example.net", "b@example.net")
    now = utcnow()
    retry_at = now + timedelta(minutes=2, microseconds=7)
    a, b = later.recipients
    deferred = AttemptResult(
        MessageStatus.QUEUED,
        "1 recipient(s) deferred: 451 try later",
        3,
        retry_at,
        now,
        (
            RecipientUpdate(a.row_id, DeliveryStatus.SENT, None, "smarthost", "Q1", now),
            RecipientUpdate(b.row_id, DeliveryStatus.DEFERRED, "451 try later", "smarthost"),
        ),
    )

    held = await store.complete_many(
        worker_id="w", outcomes=[(done.id, sent(done)), (later.id, deferred)]
    )

    assert held == [True, True]
    await assert_sent(store, done)
    found = await store.message_status(later.id)
    assert found is not None
    assert (found["status"], found["error"], found["retry_count"]) == (
        "queued",
        "1 recipient(s) deferred: 451 try later",
        3,
    )
    assert (found["next_attempt_at"], found["processed_at"]) == (retry_at, now)
    assert [
        (r["delivery_status"], r["error"], r["provider_message_id"], r["sent_at"], r["attempts"])
        for r in found["recipients"]
    ] == [("SENT", None, "Q1", now, 1), ("DEFERRED", "451 try later", None, None, 1)]


async def test_a_group_with_many_recipients_is_committed_whole(store: SqlStore) -> None:
    """More recipients than one CASE should pick among: statement by statement (MySQL),
    still in one transaction."""
    recipients = [f"p{n}@example.net" for n in range(MAX_GROUP_RECIPIENTS // 2 + 1)]
    lost = await lose_lease(store)
    first, last = await claimed(store, 2, *recipients)

    held = await store.complete_many(
        worker_id="w",
        outcomes=[(first.id, sent(first)), (lost.id, sent(lost)), (last.id, sent(last))],
    )

    assert held == [True, False, True]
    await assert_sent(store, first)
    await assert_sent(store, last)
    await assert_untouched(store, lost)


async def test_a_lost_lease_in_a_group_writes_nothing_of_that_outcome_alone(
    store: SqlStore,
) -> None:
    lost = await lose_lease(store)
    first, last = await claimed(store, 2, "a@example.net", "b@example.net")

    held = await store.complete_many(
        worker_id="w",
        outcomes=[(first.id, sent(first)), (lost.id, sent(lost)), (last.id, sent(last))],
    )

    assert held == [True, False, True]
    await assert_sent(store, first)
    await assert_sent(store, last)
    # The new holder's claim stands, and its recipient was not marked by the stale outcome.
    await assert_untouched(store, lost)
    found = await store.message_status(lost.id)
    assert found is not None and found["error"] is None


async def test_a_failing_statement_in_a_group_writes_none_of_it(
    queue_settings: dict[str, Any], tmp_path: Path
) -> None:
    """On MySQL the group is one query: the server stops at the failing statement, before
    the COMMIT, and the outcomes before it are rolled back, also on the same connection."""
    store = await one_connection_store(queue_settings, tmp_path)
    try:
        await poison_recipient_updates(store)
        first, poisoned, last = await claimed(store, 3)
        with pytest.raises((StoreUnavailable, sqlite3.Error)):
            await store.complete_many(
                worker_id="w",
                outcomes=[
                    (first.id, sent(first)),
                    (poisoned.id, sent(poisoned, error=POISON)),
                    (last.id, sent(last)),
                ],
            )
        for message in (first, poisoned, last):
            await assert_untouched(store, message)
        # Nothing is lost either: the same outcomes, without the poison, go through.
        held = await store.complete_many(
            worker_id="w", outcomes=[(m.id, sent(m)) for m in (first, poisoned, last)]
        )
        assert held == [True, True, True]
    finally:
        await store.close()


# The recorder: outcomes handed in by workers, committed together


async def test_outcomes_finished_together_share_one_commit(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = spy_on_groups(store, monkeypatch)
    messages = await claimed(store, 10)
    recorder = OutcomeRecorder(store, "w")

    held = await asyncio.gather(*(recorder.record(m.id, sent(m)) for m in messages))

    assert held == [True] * 10
    assert groups == [10]
    for message in messages:
        await assert_sent(store, message)
    await recorder.close()


async def test_outcomes_arriving_during_a_commit_form_the_next_group(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = spy_on_groups(store, monkeypatch)
    first, *later = await claimed(store, 5)
    recorder = OutcomeRecorder(store, "w")

    alone = asyncio.create_task(recorder.record(first.id, sent(first)))
    while not groups:  # the first group is in flight
        await asyncio.sleep(0)
    held = await asyncio.gather(*(recorder.record(m.id, sent(m)) for m in later))

    assert await alone and held == [True] * 4
    assert groups == [1, 4]
    await recorder.close()


async def test_a_group_is_bounded_by_its_recipients(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = spy_on_groups(store, monkeypatch)
    messages = await claimed(store, 5, "a@example.net", "b@example.net", "c@example.net")
    recorder = OutcomeRecorder(store, "w", max_group_recipients=7)

    await asyncio.gather(*(recorder.record(m.id, sent(m)) for m in messages))

    assert groups == [2, 2, 1]
    await recorder.close()


async def test_the_recorder_reports_a_lost_lease_to_its_worker_only(store: SqlStore) -> None:
    lost = await lose_lease(store)
    first, last = await claimed(store, 2)
    recorder = OutcomeRecorder(store, "w")

    held = await asyncio.gather(*(recorder.record(m.id, sent(m)) for m in (first, lost, last)))

    assert held == [True, False, True]
    await assert_sent(store, first)
    await assert_sent(store, last)
    await assert_untouched(store, lost)
    await recorder.close()


async def test_a_failed_group_is_written_again_outcome_by_outcome(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One outcome the database refuses fails alone: the rest of its group is committed
    and each worker learns its own outcome's fate."""
    groups = spy_on_groups(store, monkeypatch)
    await poison_recipient_updates(store)
    first, poisoned, last = await claimed(store, 3)
    recorder = OutcomeRecorder(store, "w")

    results = await asyncio.gather(
        recorder.record(first.id, sent(first)),
        recorder.record(poisoned.id, sent(poisoned, error=POISON)),
        recorder.record(last.id, sent(last)),
        return_exceptions=True,
    )

    assert groups[0] == 3
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], StoreUnavailable | sqlite3.Error)
    await assert_sent(store, first)
    await assert_sent(store, last)
    await assert_untouched(store, poisoned)
    [failed] = [r for r in caplog.records if r.getMessage() == "delivery.outcome_group_failed"]
    assert POISON not in str(failed.__dict__)
    await recorder.close()


async def test_close_commits_the_outcomes_of_workers_cut_off_while_waiting(
    store: SqlStore,
) -> None:
    """A worker cancelled at the end of the shutdown grace, its outcome handed in but not
    yet committed: the mail has left, so close must still record it."""
    messages = await claimed(store, 3)
    recorder = OutcomeRecorder(store, "w")
    workers = [asyncio.create_task(recorder.record(m.id, sent(m))) for m in messages]
    await asyncio.sleep(0)  # each has handed its outcome in; none is committed yet
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)

    await recorder.close()

    for message in messages:
        await assert_sent(store, message)


async def test_outcomes_after_close_are_still_committed(store: SqlStore) -> None:
    [message] = await claimed(store, 1)
    recorder = OutcomeRecorder(store, "w")
    await recorder.close()

    assert await recorder.record(message.id, sent(message))

    await assert_sent(store, message)


def spy_on_groups(store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every group the store is asked to commit, in order."""
    sizes: list[int] = []
    complete_many = store.complete_many

    async def counted(*, worker_id: str, outcomes: Any) -> list[bool]:
        sizes.append(len(outcomes))
        return await complete_many(worker_id=worker_id, outcomes=outcomes)

    monkeypatch.setattr(store, "complete_many", counted)
    return sizes
