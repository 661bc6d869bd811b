"""The order in which the operator's API requests get a thread when more are waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from relay_operator.kube import Kube, Turns, bookkeeping, children_first


class Recorder:
    """A blocking call that notes its label; the first one holds the only thread until
    released, so that everything after it queues."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.hold = threading.Event()

    def __call__(self, label: str) -> str:
        if not self.order:
            self.hold.wait(5)
        self.order.append(label)
        return label


async def _queued(kube: Kube, calls: list[tuple[str, Any]]) -> list[str]:
    """Start the calls in order (each in its own task, under its own turn), then let the
    first one finish: the order in which the rest ran."""
    recorder = Recorder()

    async def one(label: str, turn: Any) -> str:
        with turn:
            return await kube._in_thread(recorder, label)

    tasks = []
    for label, turn in calls:
        tasks.append(asyncio.create_task(one(label, turn)))
        await asyncio.sleep(0.01)  # each reaches the queue before the next starts
    recorder.hold.set()
    await asyncio.gather(*tasks)
    return recorder.order


async def test_children_go_before_bookkeeping_and_earlier_relays_first() -> None:
    kube = Kube(None, concurrency=1)  # type: ignore[arg-type]
    order = await _queued(
        kube,
        [
            ("first", children_first(since=1.0)),
            ("status of the first", bookkeeping()),
            ("event of the first", bookkeeping()),
            ("later relay", children_first(since=3.0)),
            ("earlier relay, second round trip", children_first(since=2.0)),
        ],
    )
    assert order == [
        "first",
        "earlier relay, second round trip",
        "later relay",
        "status of the first",
        "event of the first",
    ]


async def test_without_a_turn_requests_are_first_come_first_served() -> None:
    kube = Kube(None, concurrency=1)  # type: ignore[arg-type]
    no_turn = [(f"request {n}", bookkeeping()) for n in range(5)]
    assert await _queued(kube, no_turn) == [f"request {n}" for n in range(5)]


async def test_bookkeeping_inside_a_children_block_waits_its_turn() -> None:
    kube = Kube(None, concurrency=1)  # type: ignore[arg-type]
    recorder = Recorder()

    async def reconcile() -> None:
        with children_first(since=1.0):
            await kube._in_thread(recorder, "apply")
            with bookkeeping():
                await kube._in_thread(recorder, "status")
            await kube._in_thread(recorder, "apply again")

    async def other() -> None:
        with children_first(since=2.0):
            await kube._in_thread(recorder, "other relay")

    first = asyncio.create_task(reconcile())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(other())
    await asyncio.sleep(0.01)
    recorder.hold.set()
    await asyncio.gather(first, second)
    # The status waited for the other relay's apply; the apply after it did not wait
    # behind anything of a later relay.
    assert recorder.order == ["apply", "other relay", "status", "apply again"]


async def test_a_cancelled_waiter_gives_its_place_and_no_slot_is_lost() -> None:
    turns = Turns(1)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with turns.slot((0, 0.0)):
            held.set()
            await release.wait()

    async def waiter(turn: tuple[int, float], ran: list[int]) -> None:
        async with turns.slot(turn):
            ran.append(int(turn[1]))

    ran: list[int] = []
    first = asyncio.create_task(holder())
    await held.wait()
    cancelled = asyncio.create_task(waiter((0, 1.0), ran))
    kept = asyncio.create_task(waiter((0, 2.0), ran))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    release.set()
    await first
    await kept
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert ran == [2]
    # Every slot came back: two more at once would deadlock on a lost one.
    await asyncio.wait_for(waiter((1, 0.0), ran), 1)
    assert ran == [2, 0]


async def test_a_waiter_cancelled_as_it_was_let_in_returns_the_slot() -> None:
    turns = Turns(1)
    ran: list[str] = []

    async def take(label: str) -> None:
        async with turns.slot((0, 0.0)):
            ran.append(label)
            await asyncio.sleep(0)

    async with turns.slot((0, 0.0)):
        late = asyncio.create_task(take("late"))
        await asyncio.sleep(0.01)
    # The slot was just handed to `late`, which has not run yet: cancel it now.
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    await asyncio.wait_for(take("after"), 1)
    assert ran == ["after"]


async def test_bookkeeping_waits_for_children_in_flight_though_threads_are_free() -> None:
    turns = Turns(4)
    started: list[str] = []
    apply_done = asyncio.Event()

    async def apply() -> None:
        async with turns.slot((0, 1.0)):
            started.append("apply")
            await apply_done.wait()

    async def status() -> None:
        async with turns.slot((1, time.monotonic())):
            started.append("status")

    first = asyncio.create_task(apply())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(status())
    await asyncio.sleep(0.05)
    # Three threads free, yet the status waits: the API server's CPU goes to the apply.
    assert started == ["apply"]
    apply_done.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert started == ["apply", "status"]


async def test_bookkeeping_waits_no_longer_than_its_patience() -> None:
    turns = Turns(4, patience_s=0.2)
    started: list[str] = []
    never = asyncio.Event()

    async def endless_children() -> None:
        async with turns.slot((0, 1.0)):
            await never.wait()

    async def status() -> None:
        async with turns.slot((1, time.monotonic())):
            started.append("status")

    held = asyncio.create_task(endless_children())
    await asyncio.sleep(0.01)
    began = time.monotonic()
    await asyncio.wait_for(status(), 2)
    waited = time.monotonic() - began
    assert started == ["status"]
    assert 0.15 <= waited < 1.5
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_children_start_at_once_past_waiting_bookkeeping() -> None:
    # A status held back by one relay's apply must not hold back another relay's apply
    # while threads are free.
    turns = Turns(4)
    first_done = asyncio.Event()
    started: list[str] = []

    async def apply(label: str, since: float, done: asyncio.Event | None) -> None:
        async with turns.slot((0, since)):
            started.append(label)
            if done is not None:
                await done.wait()

    async def status() -> None:
        async with turns.slot((1, time.monotonic())):
            started.append("status")

    first = asyncio.create_task(apply("first apply", 1.0, first_done))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(status())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(apply("second apply", 2.0, None), 0.5)
    assert started == ["first apply", "second apply"]
    first_done.set()
    await asyncio.wait_for(asyncio.gather(first, waiting), 1)
    assert started == ["first apply", "second apply", "status"]
