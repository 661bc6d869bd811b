"""Delivery workers: claim due mail from the shared queue, send it, record every outcome.

One dispatcher claims batches (runbook 7.2: batch_size 50) into a local buffer that
`worker_count` workers drain. Claims are leases: a keeper renews them while this process
holds them, and a reaper on every replica returns leases that a dead worker let expire.
Mail accepted by this process wakes the dispatcher at once; mail accepted by other replicas
is found by polling every `process_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from relay import metrics
from relay.bounces.suppression import BounceProcessor
from relay.clock import utcnow
from relay.config import DeliverySettings
from relay.delivery.outcomes import OutcomeRecorder
from relay.delivery.providers.base import Outcome
from relay.delivery.retry import ProviderAttempt, RetryPolicy, decide
from relay.delivery.routing import Router
from relay.logs import event
from relay.queue.model import AttemptResult, ClaimedMessage
from relay.queue.sql import SqlStore
from relay.queue.store import StoreUnavailable

log = logging.getLogger("relay.delivery")

_REAP_EVERY_S = 30.0
# messages.status after an attempt, as emails_processed_total's outcome label.
_OUTCOMES = {"queued": "deferred"}
_STORE_RETRY_S = 2.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


class DeliveryEngine:
    def __init__(
        self,
        store: SqlStore,
        router: Router,
        settings: DeliverySettings,
        *,
        worker_id: str | None = None,
        bounces: BounceProcessor | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        # Called when a claim comes back full: more mail is due than this engine holds, so
        # the relay's other delivery processes should look too (relay.processes).
        self.on_backlog = on_backlog
        self.router = router
        self.bounces = bounces
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.policy = RetryPolicy(settings.min_backoff, settings.max_backoff, settings.max_age)
        self._buffer: asyncio.Queue[ClaimedMessage | None] = asyncio.Queue()
        self._held: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.outcomes = OutcomeRecorder(store, self.worker_id)
        self._refill_at = max(1, min(settings.batch_size, settings.worker_count) // 2)

    @property
    def held(self) -> int:
        return len(self._held)

    def wake(self) -> None:
        """New mail is queued: look now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self.outcomes.reopen()
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="delivery-dispatcher"),
            asyncio.create_task(self._keep_leases(), name="delivery-leases"),
            asyncio.create_task(self._reap(), name="delivery-reaper"),
        ]
        self._workers = [
            asyncio.create_task(self._work(), name=f"delivery-worker-{n}")
            for n in range(self.settings.worker_count)
        ]
        event(log, "delivery.started", workers=self.settings.worker_count)

    async def stop(self, grace: timedelta | None = None) -> None:
        """Stop claiming, hand back what was not started, let deliveries finish, release."""
        self._stopping = True
        timeout = (grace or self.settings.shutdown_grace).total_seconds()
        dispatcher = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
        if dispatcher is not None:
            # Not cancelled mid-claim: a claim the database committed but this process never
            # saw would stay leased, undelivered, until the lease ran out. The dispatcher
            # sees `_stopping` once its claim is in the buffer, and the buffer is handed back.
            self.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(dispatcher), timeout)
            dispatcher.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        unstarted = []
        while not self._buffer.empty():
            message = self._buffer.get_nowait()
            if message is not None:
                unstarted.append(message.id)
        await self._release(unstarted)

        for _ in self._workers:
            self._buffer.put_nowait(None)
        _, late = await asyncio.wait(self._workers, timeout=timeout) if self._workers else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        # Outcomes of finished deliveries still waiting for their group's commit, including
        # those of workers the grace period cut off while they waited.
        await self.outcomes.close()
        # Deliveries cut off by the grace period: the peer may or may not have the message.
        # Releasing it means it is sent again (at-least-once), never lost.
        await self._release(list(self._held))

    async def _release(self, message_ids: Sequence[str]) -> None:
        if not message_ids:
            return
        try:
            count = await self.store.release(worker_id=self.worker_id, message_ids=message_ids)
        except StoreUnavailable as exc:
            event(
                log,
                "delivery.release_failed",
                logging.WARNING,
                error=str(exc),
                count=len(message_ids),
            )
            return
        self._held.difference_update(message_ids)
        event(log, "delivery.released", count=count)

    # Claiming

    def _capacity(self) -> int:
        """How many messages to claim now; 0 until a claim is worth its round trips.

        Keep about one round of work buffered beyond the busy workers, no more: claimed
        mail sitting in one replica's buffer is mail another replica could be sending. And
        refill only once half a round is free: a claim costs the same two round trips and
        commit for one message as for fifty, and under a backlog claiming each time one
        delivery ends spent most of them on one or two messages.
        """
        free = min(self.settings.batch_size, 2 * self.settings.worker_count - len(self._held))
        return free if free >= self._refill_at else 0

    async def _dispatch(self) -> None:
        interval = self.settings.process_interval.total_seconds()
        while not self._stopping:
            self._wake.clear()
            limit = self._capacity()
            claimed: list[ClaimedMessage] = []
            if limit > 0:
                try:
                    claimed = await self.store.claim(
                        worker_id=self.worker_id,
                        limit=limit,
                        lease=self.settings.lease,
                        now=utcnow(),
                    )
                except StoreUnavailable as exc:
                    event(log, "delivery.claim_failed", logging.WARNING, error=str(exc))
                    await asyncio.sleep(_STORE_RETRY_S)
                    continue
                for message in claimed:
                    self._held.add(message.id)
                    self._buffer.put_nowait(message)
                if len(claimed) == limit:
                    if self.on_backlog is not None:
                        self.on_backlog()
                    continue
            # Woken at every delivery's end: asyncio.timeout rather than wait_for, which
            # would start a task for every wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def _keep_leases(self) -> None:
        period = self.settings.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            if not self._held:
                continue
            try:
                await self.store.renew(
                    worker_id=self.worker_id,
                    message_ids=list(self._held),
                    until=utcnow() + self.settings.lease,
                )
            except StoreUnavailable as exc:
                event(log, "delivery.renew_failed", logging.WARNING, error=str(exc))

    async def _reap(self) -> None:
        period = min(_REAP_EVERY_S, self.settings.lease.total_seconds() / 2)
        while True:
            try:
                count = await self.store.requeue_expired(now=utcnow())
            except StoreUnavailable as exc:
                event(log, "delivery.reap_failed", logging.WARNING, error=str(exc))
            else:
                if count:
                    event(log, "delivery.leases_expired", logging.WARNING, count=count)
                    self.wake()
            await asyncio.sleep(period)

    # Delivering

    async def _work(self) -> None:
        while True:
            message = await self._buffer.get()
            if message is None:
                return
            try:
                await self.deliver(message)
            except StoreUnavailable as exc:
                # The lease will expire and the message will be tried again; nothing is lost.
                metrics.errors_total.labels("store").inc()
                event(
                    log,
                    "delivery.store_failed",
                    logging.ERROR,
                    message_id=message.id,
                    error=str(exc),
                )
            except Exception:
                metrics.errors_total.labels("crash").inc()
                log.exception("delivery.crashed", extra={"message_id": message.id})
            finally:
                self._held.discard(message.id)
                if not self._stopping:
                    self.wake()

    async def deliver(self, message: ClaimedMessage) -> AttemptResult:
        started = time.monotonic()
        content = message.content
        if content is None:
            content = await self.store.load_content(message.id)
        # With a VERP domain configured, bounces come back to an address naming this message.
        return_path = (
            self.bounces.return_path(message_id=message.id, original=message.from_email)
            if self.bounces is not None
            else None
        )
        routed = await self.router.route(message, content, mail_from=return_path)
        result = decide(
            message,
            routed.attempts,
            policy=self.policy,
            now=utcnow(),
            provider_error="; ".join(routed.errors) or None,
        )
        held = await self._complete(message, result)
        await self._learn_from_refusals(message, routed.attempts)
        elapsed = time.monotonic() - started
        outcome = _OUTCOMES.get(result.status.value, result.status.value)
        metrics.child(metrics.emails_processed_total, message.workspace_id, outcome).inc()
        if outcome == "sent":
            metrics.child(metrics.emails_delivered_total, message.workspace_id).inc()
        metrics.email_processing_duration_seconds.observe(elapsed)
        event(
            log,
            "delivery.attempt",
            message_id=message.id,
            workspace=message.workspace_id,
            providers=",".join(routed.tried),
            skipped=",".join(routed.skipped),
            outcome=result.status.value,
            recipients=len(message.recipients),
            retry_count=result.retry_count,
            duration_ms=round(elapsed * 1000, 1),
            lease_held=held,
        )
        return result

    async def _learn_from_refusals(
        self, message: ClaimedMessage, attempts: Sequence[ProviderAttempt]
    ) -> None:
        """Permanent refusals at send time count towards suppression, like bounces."""
        if self.bounces is None:
            return
        for attempt in attempts:
            for result in attempt.results.values():
                if result.outcome is not Outcome.PERMANENT:
                    continue
                try:
                    await self.bounces.record_send_failure(
                        workspace_id=message.workspace_id,
                        address=result.address,
                        detail=result.detail,
                    )
                except Exception as exc:
                    event(
                        log,
                        "delivery.bounce_record_failed",
                        logging.WARNING,
                        message_id=message.id,
                        error=exc.__class__.__name__,
                    )

    async def _complete(self, message: ClaimedMessage, result: AttemptResult) -> bool:
        # The mail has left: recording that must outlast a short database outage, or the
        # lease expires and the message is sent a second time.
        deadline = time.monotonic() + self.settings.lease.total_seconds() / 2
        while True:
            try:
                # Committed with the outcomes other workers finished meanwhile.
                return await self.outcomes.record(message.id, result)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(_STORE_RETRY_S)
