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

from relay.coalesce import Coalescer
from relay.logs import event
from relay.queue.model import AttemptResult
from relay.queue.sql import MAX_GROUP_RECIPIENTS, SqlStore
from relay.queue.store import StoreUnavailable

log = logging.getLogger("relay.delivery")

# Outcomes per group: a bound on the size of one query (recipients: MAX_GROUP_RECIPIENTS).
MAX_GROUP = 100

Outcome = tuple[str, AttemptResult]


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
        self._groups: Coalescer[Outcome, bool] = Coalescer(
            self._write,
            in_flight=1,
            max_items=max_group,
            weight=lambda outcome: len(outcome[1].recipients),
            max_weight=max_group_recipients,
            stopped=lambda: StoreUnavailable("outcome writer stopped"),
        )
        self._closing = False

    async def record(self, message_id: str, result: AttemptResult) -> bool:
        """Commit the outcome; False when the lease had been lost and nothing was written.

        Raises what the store raised (StoreUnavailable) when the outcome, written on its
        own after its group failed, could not be committed either. A worker cancelled
        while it waits leaves its outcome to be committed all the same (close waits for
        it), rather than its message being sent again.
        """
        if self._closing:
            return await self._write_alone((message_id, result))
        return await self._groups.submit((message_id, result))

    async def close(self) -> None:
        """Commit every outcome handed in so far; later ones are written one by one."""
        self._closing = True
        await self._groups.close()

    def reopen(self) -> None:
        self._closing = False

    async def _write(self, group: list[Outcome]) -> Sequence[bool | BaseException]:
        try:
            return await self.store.complete_many(worker_id=self.worker_id, outcomes=group)
        except Exception as exc:
            if len(group) == 1:
                raise
            # Store errors are worded to be logged; anything else could quote a value.
            shown = str(exc) if isinstance(exc, StoreUnavailable) else exc.__class__.__name__
            event(
                log,
                "delivery.outcome_group_failed",
                logging.WARNING,
                count=len(group),
                error=shown,
            )
            return await asyncio.gather(
                *(self._write_alone(outcome) for outcome in group), return_exceptions=True
            )

    async def _write_alone(self, outcome: Outcome) -> bool:
        message_id, result = outcome
        return await self.store.complete(
            worker_id=self.worker_id, message_id=message_id, result=result
        )
