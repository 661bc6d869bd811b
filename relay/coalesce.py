"""Requests that arrive while others are on their way to the database go together.

Under load many SMTP sessions ask the queue database the same kind of thing within a
millisecond or two: commit my message, is this recipient suppressed. A `Coalescer` sends
a request that finds fewer than `in_flight` groups on their way at once, alone, so an idle
relay adds no wait; requests that arrive while that many are on their way queue up and go
as the next group, in one round trip and one transaction. Each caller gets its own result
or its own exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# One result per item, in order: a value, or the exception that item's caller gets.
GroupRunner = Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]]


class Coalescer(Generic[Item, Result]):
    def __init__(
        self,
        run: GroupRunner[Item, Result],
        *,
        in_flight: int = 2,
        max_items: int = 64,
        weight: Callable[[Item], int] = lambda _: 1,
        max_weight: int | None = None,
        stopped: Callable[[], Exception] = lambda: RuntimeError("group runner stopped"),
    ) -> None:
        self._run = run
        self._limit = in_flight
        self._max_items = max_items
        self._weight = weight
        self._max_weight = max_weight
        self._stopped = stopped
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._runners: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._in_flight < self._limit:
            self._in_flight += 1
            runner = asyncio.create_task(self._drain())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        # A caller that goes away (its client hung up) does not cancel the group.
        return await asyncio.shield(done)

    async def close(self) -> None:
        """Return once every request submitted so far has its result."""
        while self._runners:
            await asyncio.shield(asyncio.gather(*self._runners, return_exceptions=True))

    async def _drain(self) -> None:
        group: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                group = self._take()
                await self._run_group(group)
                group = []
        finally:
            self._in_flight -= 1
            # Only when this runner is cancelled (the event loop going away): no caller
            # may wait for ever on a group nobody will run.
            left = group + (self._waiting if self._in_flight == 0 else [])
            for _, done in left:
                _settle(done, self._stopped())
            if self._in_flight == 0:
                self._waiting.clear()

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        group: list[tuple[Item, asyncio.Future[Result]]] = []
        weight = 0
        while self._waiting and len(group) < self._max_items:
            item_weight = self._weight(self._waiting[0][0])
            if group and self._max_weight is not None and weight + item_weight > self._max_weight:
                break
            group.append(self._waiting.pop(0))
            weight += item_weight
        return group

    async def _run_group(self, group: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for a group of {len(group)}")
        except Exception as exc:
            results = [exc] * len(group)
        for (_, done), result in zip(group, results, strict=True):
            _settle(done, result)


def _settle(done: asyncio.Future[Result], result: Result | BaseException) -> None:
    if done.done():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
        # Retrieved here too: a caller that went away never reads it.
        done.add_done_callback(lambda future: future.exception())
    else:
        done.set_result(result)
