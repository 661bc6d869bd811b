"""Group commit of accepted mail (relay.queue.group) on both queue backends."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from relay.clock import utcnow
from relay.queue import NewMessage, SqlStore
from relay.queue.group import GroupCommit
from tests.test_queue import new_message


class Watched(GroupCommit):
    """The real group commit, noting the size of each transaction it makes."""

    def __init__(self, store: SqlStore) -> None:
        super().__init__(store)
        self.sizes: list[int] = []
        original_group, original_one = store.enqueue_group, store.enqueue

        async def group(messages: Sequence[NewMessage]) -> None:
            self.sizes.append(len(messages))
            await original_group(messages)

        async def one(message: NewMessage) -> None:
            self.sizes.append(1)
            await original_one(message)

        store.enqueue_group = group  # type: ignore[method-assign]
        store.enqueue = one  # type: ignore[method-assign]


async def recipients_of(store: SqlStore, message_id: str) -> list[str]:
    rows = await store.read(
        "SELECT email_address FROM message_recipients WHERE message_id = ? ORDER BY email_address",
        (message_id,),
    )
    return [str(row[0]) for row in rows]


async def test_a_message_alone_is_committed_at_once_and_alone(store: SqlStore) -> None:
    commits = Watched(store)
    message = new_message("a@example.net", "b@example.net")
    await commits.enqueue(message)
    assert commits.sizes == [1]
    assert await store.load_content(message.id) == message.content


async def test_messages_arriving_together_share_commits_and_all_are_kept(
    store: SqlStore,
) -> None:
    commits = Watched(store)
    messages = [
        new_message(
            *(f"p{n}-{r}@example.net" for r in range(1 + n % 3)),
            content=b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n),
        )
        for n in range(60)
    ]

    await asyncio.gather(*(commits.enqueue(message) for message in messages))

    assert sum(commits.sizes) == 60
    assert max(commits.sizes) > 1, "concurrent arrivals were grouped"
    assert len(commits.sizes) < 60
    stats = await store.stats(now=utcnow())
    assert stats.counts == {"queued": 60}
    for message in messages:
        assert await store.load_content(message.id) == message.content
        assert await recipients_of(store, message.id) == sorted(message.recipients)


async def test_a_refused_message_costs_the_rest_of_its_group_nothing(store: SqlStore) -> None:
    commits = Watched(store)
    taken = new_message()
    await store.enqueue(taken)
    # Same queue id as a message already queued: the database refuses it (primary key).
    clash = dataclasses.replace(new_message(), id=taken.id)
    others = [new_message(f"o{n}@example.net") for n in range(8)]
    group = [others[0], clash, *others[1:]]

    results = await asyncio.gather(
        *(commits.enqueue(message) for message in group), return_exceptions=True
    )

    assert isinstance(results[1], Exception)
    assert [r for i, r in enumerate(results) if i != 1] == [None] * 8
    assert max(commits.sizes) > 1, "the clash was in a group that was refused whole"
    for message in others:
        assert await store.load_content(message.id) == message.content
    assert await store.load_content(taken.id) == taken.content
    stats = await store.stats(now=utcnow())
    assert stats.counts == {"queued": 9}


async def test_a_message_with_a_quota_charge_is_committed_on_its_own(store: SqlStore) -> None:
    from relay.limits import QuotaCharge

    commits = Watched(store)
    charge = QuotaCharge(
        workspace_id="default",
        user_key="*",
        day=utcnow().strftime("%Y-%m-%d"),
        recipients=1,
        workspace_daily=10,
        per_user_daily=None,
    )
    charged = dataclasses.replace(new_message(), quota=charge)
    plain = [new_message() for _ in range(5)]
    await asyncio.gather(*(commits.enqueue(m) for m in [charged, *plain]))
    stats = await store.stats(now=utcnow())
    assert stats.counts == {"queued": 6}
    with pytest.raises(ValueError, match="quota"):
        await store.enqueue_group([charged, plain[0]])


async def test_concurrent_rcpt_checks_each_get_their_own_answer(
    store: SqlStore, queue_settings: dict[str, object], tmp_path: object
) -> None:
    from relay.bounces.model import SuppressionReason
    from relay.ingest.handler import IngestHandler
    from relay.ingest.protocol import Gate
    from tests.conftest import relay_settings

    for address in ("gone@example.net", "Complained@Example.net"):
        await store.suppress(
            workspace_id="default",
            address=address,
            reason=SuppressionReason.HARD_BOUNCE,
            detail=None,
            created_by="test",
            now=utcnow(),
        )
    handler = IngestHandler(store, relay_settings(tmp_path, queue_settings), gate=Gate())
    asked = [
        ("default", "gone@example.net"),
        ("default", "GONE@example.net"),
        ("default", "fine@example.net"),
        ("other", "gone@example.net"),  # suppressed in another workspace only
        ("default", "complained@example.net"),
    ] * 8
    groups: list[int] = []
    look_up = handler._look_up

    async def watched(questions: list[tuple[str, str]]) -> list[SuppressionReason | None]:
        groups.append(len(questions))
        return await look_up(questions)

    handler._look_up = watched  # type: ignore[method-assign]
    handler._lookups._run = watched  # type: ignore[assignment]

    answers = await asyncio.gather(*(handler._suppression(w, a) for w, a in asked))

    assert max(groups) > 1 and sum(groups) == len(asked)
    for (workspace_id, address), answer in zip(asked, answers, strict=True):
        suppressed = workspace_id == "default" and address.lower() != "fine@example.net"
        assert (answer is not None) == suppressed, (workspace_id, address, answer)
        if suppressed:
            assert answer is not None and answer.startswith("550 5.1.1")
