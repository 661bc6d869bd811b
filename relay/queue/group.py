"""Group commit: messages accepted while one commit is on its way share the next one.

Each accepted message costs a transaction: its INSERTs, a COMMIT, the server's log
flush, and the relay's side of the round trip. Under load, many sessions reach the end of
DATA within the same millisecond or two. Here a message that finds no commit in flight is
committed at once, alone, so an idle relay adds no wait; messages that arrive while
commits are in flight wait for one to return and then go together, as multi-row INSERTs in
one transaction (`SqlStore.enqueue_group`). Every session still hears 250 only after the
commit that holds its message returned.

A group that fails is rolled back whole. If the server refused a statement, the messages
are committed one by one, so that one message the database refuses does not cost the
others their place; if the database is out of reach, each of them fails, as it would have
alone, and its client hears 451 and keeps its copy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from relay.logs import event
from relay.queue.model import NewMessage
from relay.queue.sql import SqlStore
from relay.queue.store import StoreRefused, StoreUnavailable

log = logging.getLogger("relay.queue")

# Commits in flight at once: while one waits for the disk the next one is being sent.
_IN_FLIGHT = 2
# A group's contents stay well inside max_allowed_packet, which is only checked against
# the largest single message (MysqlStore.open).
_GROUP_BYTES = 1 << 20
_GROUP_MESSAGES = 64


@dataclass
class _Waiting:
    message: NewMessage
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommit:
    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        self._committers: set[asyncio.Task[None]] = set()

    async def enqueue(self, message: NewMessage) -> None:
        """Return once the message is committed; raise what its commit raised."""
        if message.quota is not None:
            # Its quota charge decides within its own transaction.
            await self.store.enqueue(message)
            return
        waiting = _Waiting(message)
        self._waiting.append(waiting)
        if self._in_flight < _IN_FLIGHT:
            self._in_flight += 1
            committer = asyncio.create_task(self._commit_while_waiting())
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        await asyncio.shield(waiting.done)

    async def _commit_while_waiting(self) -> None:
        try:
            while self._waiting:
                await self._commit(self._take())
        finally:
            self._in_flight -= 1

    def _take(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        size = 0
        while self._waiting and len(group) < _GROUP_MESSAGES:
            length = len(self._waiting[0].message.content)
            if group and size + length > _GROUP_BYTES:
                break
            group.append(self._waiting.pop(0))
            size += length
        return group

    async def _commit(self, group: list[_Waiting]) -> None:
        try:
            if len(group) == 1:
                await self.store.enqueue(group[0].message)
            else:
                await self.store.enqueue_group([w.message for w in group])
        except StoreUnavailable as exc:
            if not isinstance(exc, StoreRefused) or len(group) == 1:
                for waiting in group:
                    _settle(waiting, exc)
                return
            await self._one_by_one(group, exc)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], exc)
                return
            await self._one_by_one(group, exc)
        else:
            for waiting in group:
                _settle(waiting, None)

    async def _one_by_one(self, group: list[_Waiting], refusal: Exception) -> None:
        """The group was refused and rolled back: each message gets its own commit."""
        event(
            log,
            "queue.group_refused",
            logging.WARNING,
            messages=len(group),
            error=refusal.__class__.__name__,
        )
        for waiting in group:
            try:
                await self.store.enqueue(waiting.message)
            except Exception as alone:
                _settle(waiting, alone)
            else:
                _settle(waiting, None)


def _settle(waiting: _Waiting, error: BaseException | None) -> None:
    if waiting.done.done():
        return
    if error is None:
        waiting.done.set_result(None)
        return
    waiting.done.set_exception(error)
    # A session that hung up no longer awaits its outcome; its client keeps the message.
    waiting.done.add_done_callback(lambda done: done.exception())
