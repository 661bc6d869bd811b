"""Group commit: messages accepted while commits are on their way share the next one.

Each accepted message costs a transaction: its INSERTs, a COMMIT, the server's log
flush, and the relay's side of the round trip. Under load many sessions reach the end of
DATA within the same millisecond or two. A message that finds a commit slot free is
committed at once, alone, so an idle relay adds no wait; messages that arrive while both
slots are taken go together as the next group, as multi-row INSERTs in one transaction
(`SqlStore.enqueue_group`, relay.coalesce). Every session still hears 250 only after the
commit that holds its message returned.

A group that fails is rolled back whole. If the server refused a statement, the messages
are committed one by one, so that one message the database refuses does not cost the
others their place; if the database is out of reach, each of them fails, as it would have
alone, and its client hears 451 and keeps its copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relay.coalesce import Coalescer
from relay.logs import event
from relay.queue.model import NewMessage
from relay.queue.sql import SqlStore
from relay.queue.store import StoreRefused, StoreUnavailable

log = logging.getLogger("relay.queue")

# A group's contents stay well inside max_allowed_packet, which is only checked against
# the largest single message (MysqlStore.open).
_GROUP_BYTES = 1 << 20


class GroupCommit:
    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._groups: Coalescer[NewMessage, None] = Coalescer(
            self._commit,
            weight=lambda message: len(message.content),
            max_weight=_GROUP_BYTES,
        )

    async def enqueue(self, message: NewMessage) -> None:
        """Return once the message is committed; raise what its commit raised."""
        if message.quota is not None:
            # Its quota charge decides within its own transaction.
            await self.store.enqueue(message)
            return
        await self._groups.submit(message)

    async def _commit(self, group: list[NewMessage]) -> Sequence[BaseException | None]:
        if len(group) == 1:
            await self.store.enqueue(group[0])
            return [None]
        try:
            await self.store.enqueue_group(group)
        except StoreUnavailable as exc:
            if not isinstance(exc, StoreRefused):
                raise
            return await self._one_by_one(group, exc)
        except Exception as exc:
            return await self._one_by_one(group, exc)
        return [None] * len(group)

    async def _one_by_one(
        self, group: list[NewMessage], refusal: Exception
    ) -> list[BaseException | None]:
        """The group was refused and rolled back: each message gets its own commit."""
        event(
            log,
            "queue.group_refused",
            logging.WARNING,
            messages=len(group),
            error=refusal.__class__.__name__,
        )
        outcomes: list[BaseException | None] = []
        for message in group:
            try:
                await self.store.enqueue(message)
            except Exception as alone:
                outcomes.append(alone)
            else:
                outcomes.append(None)
        return outcomes
