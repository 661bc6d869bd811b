"""Delivery outcomes committed in groups: one query and one COMMIT for several messages.

A worker hands its attempt's outcome to the recorder and waits until it is committed. While
one group is being written, the outcomes finished meanwhile gather and go together in the
next (group commit, as a database does with its log): under load a group holds what the
workers finished during one commit, and an outcome that finds no write in flight goes at
once, so a quiet relay waits for nothing. One group is in flight at a time: the groups grow
with the load instead of the commits multiplying, and two groups never wait on each
other's row locks.

Each outcome keeps what `complete` gives it alone: its own lease fence (an outcome whose
lease was lost writes nothing and is reported back as such while the rest of its group is
committed), and all of a group or none of it. A group that fails is written again outcome
by outcome, so one bad outcome fails alone and every worker learns its own outcome's fate.
Nothing is reported before its commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from relay.logs import event
from relay.queue.model import AttemptResult
from relay.queue.sql import MAX_GROUP_RECIPIENTS, SqlStore
from relay.queue.store import StoreUnavailable

log = logging.getLogger("relay.delivery")

# Outcomes per group: a bound on the size of one query (recipients: MAX_GROUP_RECIPIENTS).
MAX_GROUP = 100


@dataclass
class _Pending:
    message_id: str
    result: AttemptResult
    committed: asyncio.Future[bool]


class OutcomeRecorder:
    def __init__(
        self,
        store: SqlStore,
        worker_id: str,
        *,
        max_group: int = MAX_GROUP,
        max_group_recipients: int = MAX_GROUP_RECIPIENTS,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.max_group = max_group
        self.max_group_recipients = max_group_recipients
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def record(self, message_id: str, result: AttemptResult) -> bool:
        """Commit the outcome; False when the lease had been lost and nothing was written.

        Raises what the store raised (StoreUnavailable) when the outcome, written on its
        own after its group failed, could not be committed either.
        """
        if self._closing:
            return await self.store.complete(
                worker_id=self.worker_id, message_id=message_id, result=result
            )
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A worker cancelled meanwhile never reads the failure: its message is released
        # or its lease expires, and it is sent again. Read here, so that asyncio does not
        # log the unread exception.
        committed.add_done_callback(_read_failure)
        self._pending.append(_Pending(message_id, result, committed))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups(), name="delivery-outcomes")
        self._wake.set()
        # Shielded: a worker cancelled at the end of the shutdown grace leaves its outcome
        # to be committed all the same (close waits for it), rather than sending it again.
        return await asyncio.shield(committed)

    async def close(self) -> None:
        """Commit every outcome handed in so far; later ones are written one by one."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await asyncio.shield(self._writer)
            self._writer = None

    def reopen(self) -> None:
        self._closing = False

    async def _write_groups(self) -> None:
        group: list[_Pending] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    group = self._next_group()
                    await self._write(group)
                    group = []
                if self._closing:
                    return
        finally:
            # Only if this task itself is cancelled (the event loop going away): no worker
            # may wait for ever on an outcome nobody will write.
            for pending in (*group, *self._pending):
                _settle(pending.committed, StoreUnavailable("outcome writer stopped"))
            self._pending.clear()

    def _next_group(self) -> list[_Pending]:
        taken, recipients = 0, 0
        for pending in self._pending[: self.max_group]:
            recipients += len(pending.result.recipients)
            if taken and recipients > self.max_group_recipients:
                break
            taken += 1
        group, self._pending = self._pending[:taken], self._pending[taken:]
        return group

    async def _write(self, group: Sequence[_Pending]) -> None:
        try:
            held = await self.store.complete_many(
                worker_id=self.worker_id,
                outcomes=[(pending.message_id, pending.result) for pending in group],
            )
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0].committed, exc)
                return
            # Store errors are worded to be logged; anything else could quote a value.
            shown = str(exc) if isinstance(exc, StoreUnavailable) else exc.__class__.__name__
            event(
                log,
                "delivery.outcome_group_failed",
                logging.WARNING,
                count=len(group),
                error=shown,
            )
            await asyncio.gather(*(self._write_alone(pending) for pending in group))
            return
        for pending, lease_held in zip(group, held, strict=True):
            _settle(pending.committed, lease_held)

    async def _write_alone(self, pending: _Pending) -> None:
        try:
            held = await self.store.complete(
                worker_id=self.worker_id, message_id=pending.message_id, result=pending.result
            )
        except Exception as exc:
            _settle(pending.committed, exc)
        else:
            _settle(pending.committed, held)


def _settle(committed: asyncio.Future[bool], outcome: bool | BaseException) -> None:
    if committed.done():
        return
    if isinstance(outcome, BaseException):
        committed.set_exception(outcome)
    else:
        committed.set_result(outcome)


def _read_failure(committed: asyncio.Future[bool]) -> None:
    if not committed.cancelled():
        committed.exception()
