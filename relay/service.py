"""The relay process: SMTP ingest, delivery workers and HTTP in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from relay import metrics
from relay.api.app import create_app
from relay.clock import utcnow
from relay.config import Settings
from relay.delivery.engine import DeliveryEngine
from relay.delivery.providers import build_providers
from relay.delivery.routing import Router
from relay.ingest.handler import IngestHandler
from relay.ingest.protocol import Gate
from relay.ingest.server import IngestServer
from relay.ingest.tally import SessionTally
from relay.ingest.tally import create as create_tally
from relay.logs import event
from relay.processes import ExtraProcesses, Roles, WakePipe, listen, private_dir, unlisten
from relay.queue import create_store

log = logging.getLogger("relay.service")

MAINTENANCE = "maintenance"
_MONITOR_EVERY_S = 5.0
# The finished messages (sent, failed, bounced) are counted this much less often than the
# live ones: a count walks every row kept for the retention period, and these gauges
# trend over days.
_FINISHED_EVERY_S = 300.0
_DEFAULT_MAINTENANCE_REPLY = "421 4.3.2 Service under maintenance, try again later"


class _EmbeddedHttpServer(uvicorn.Server):
    """uvicorn sharing our loop: the relay, not uvicorn, owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RelayService:
    """One relay process.

    The first (and usually only) process binds the listeners, migrates the queue, serves
    HTTP, ingests, delivers, and starts the extra processes that `smtp.processes` and
    `delivery.processes` ask for (relay.processes). An extra process is this class with
    its `roles`: SMTP ingest on `inherited` sockets, delivery workers, or both.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        config_text: str | None = None,
        roles: Roles | None = None,
        inherited: list[tuple[str, socket.socket]] | None = None,
        tally: SessionTally | None = None,
    ) -> None:
        self.settings = settings
        self.config_text = config_text
        self.primary = roles is None
        self._pipes: dict[int, WakePipe] = {}
        if roles is None:
            roles = self._first_roles(settings)
        self.roles = roles
        self.ingests = settings.ingests(roles.index)
        self.delivers = settings.delivers(roles.index)
        # Workers, provider limits and connections: this process's part of the totals.
        share = settings.delivery_share(roles.index) if self.delivers else settings
        self.store = create_store(settings)
        self.providers = build_providers(share) if self.delivers else {}
        self.router = Router(self.providers, share)
        self._tally_dir: Path | None = None
        if tally is None and self.primary and settings.smtp.processes > 1:
            # The count of open sessions all processes share (relay.ingest.tally).
            self._tally_dir = private_dir("smtp-relay-sessions-")
            create_tally(self._tally_dir / "sessions", settings.smtp.processes)
            tally = SessionTally(self._tally_dir / "sessions", settings.smtp.processes, 0)
        self.gate = Gate(tally)
        self.handler = IngestHandler(
            self.store,
            settings,
            gate=self.gate,
            on_queued=roles.on_queued(self.wake if self.delivers else None),
        )
        self.engine = DeliveryEngine(
            self.store,
            self.router,
            share.delivery,
            bounces=self.handler.bounces,
            on_backlog=roles.on_backlog(),
        )
        self.ingest = IngestServer(self.handler, settings.smtp, self.gate, inherited=inherited)
        self.extra_processes: ExtraProcesses | None = None
        self.draining = False
        self._http: _EmbeddedHttpServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._finished_counted_at: float | None = None
        self._stopped = asyncio.Event()

    @property
    def smtp_port(self) -> int:
        return self.ingest.port

    @property
    def http_port(self) -> int:
        assert self._http is not None and self._http.servers
        return int(self._http.servers[0].sockets[0].getsockname()[1])

    def _first_roles(self, settings: Settings) -> Roles:
        # A pipe per delivery process, this one's included, so that any process can wake
        # any delivery process (relay.processes.Roles).
        if settings.process_count > 1 and settings.delivery.enabled:
            self._pipes = {index: WakePipe() for index in range(settings.delivery.processes)}
        return Roles(
            index=0,
            peers={i: pipe.write_fd for i, pipe in self._pipes.items() if i != 0},
            woken=self._pipes[0].read_fd if self._pipes else None,
        )

    def wake(self) -> None:
        self.engine.wake()

    async def start(self) -> None:
        await self.store.open()
        if self.primary:
            applied = await self.store.migrate()
            if applied:
                event(log, "queue.migrated", backend=self.store.backend, versions=applied)
        await self._observe()
        if self.delivers:
            if self.roles.woken is not None:
                listen(self.roles.woken, self.wake)
            await self.engine.start()
        if self.primary and self.settings.http.enabled:
            await self._start_http()
        if self.ingests:
            await self.ingest.start()
        if self.primary and self.settings.process_count > 1:
            await self._start_extra_processes()
        self._monitor_task = asyncio.create_task(self._monitor(), name="monitor")
        if self.primary:
            event(
                log,
                "relay.started",
                backend=self.store.backend,
                providers=",".join(self.settings.delivery.providers),
                processes=self.settings.process_count,
            )

    async def _start_extra_processes(self) -> None:
        self.extra_processes = ExtraProcesses(
            self.settings,
            self.config_text,
            self.ingest.listening(),
            self._pipes,
            self.gate.tally,
        )
        await self.extra_processes.start()

    async def _start_http(self) -> None:
        config = uvicorn.Config(
            create_app(self),
            host=self.settings.http.host,
            port=self.settings.http.port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self._http = _EmbeddedHttpServer(config)
        self._http_task = asyncio.create_task(self._http.serve(), name="http")
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("HTTP server failed to start")
            await asyncio.sleep(0.01)

    # Maintenance mode (runbook 6.1): service-wide, kept in the database

    async def set_maintenance(self, enabled: bool, message: str | None, by: str) -> None:
        value = json.dumps({"enabled": enabled, "message": message})
        await self.store.set_state(MAINTENANCE, value, updated_by=by)
        await self._observe()

    def _apply_maintenance(self, enabled: bool, message: str | None) -> None:
        if self.draining:
            return
        if enabled:
            reply = _DEFAULT_MAINTENANCE_REPLY
            if message:
                reply = "421 4.3.2 " + " ".join(message.split())[:200]
            if self.gate.closed_reply != reply:
                event(log, "relay.maintenance", enabled=True)
            self.gate.close(reply)
        elif not self.gate.open:
            event(log, "relay.maintenance", enabled=False)
            self.gate.reopen()
        metrics.maintenance_mode.set(1 if enabled else 0)

    # What the metrics and the gate follow: the shared database, every few seconds

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(_MONITOR_EVERY_S)
            await self._observe()

    async def _observe(self) -> None:
        try:
            state = await self.store.get_state(MAINTENANCE)
            wanted = json.loads(state[0]) if state is not None else {}
            self._apply_maintenance(bool(wanted.get("enabled")), wanted.get("message"))
        except Exception as exc:
            metrics.errors_total.labels("store").inc()
            event(log, "monitor.failed", logging.WARNING, error=exc.__class__.__name__)
        if self.primary:
            await self._observe_queue()
        share = self.settings.smtp.processes
        for workspace in set(self.settings.workspaces) | {self.settings.smtp.workspace}:
            limits = self.settings.workspace(workspace).limits
            remaining = self.handler.limiter.remaining(workspace)
            metrics.rate_limit_burst.labels(workspace).set(limits.rate_limit_burst)
            metrics.rate_limit_remaining.labels(workspace).set(
                max(1.0, limits.rate_limit_burst / share) if remaining is None else remaining
            )
        metrics.smtp_sessions.set(len(self.gate.sessions))

    async def _observe_queue(self) -> None:
        """Gauges of the whole queue and the providers: the first process's to keep."""
        counted = self._finished_counted_at
        finished = counted is None or time.monotonic() - counted >= _FINISHED_EVERY_S
        try:
            now = utcnow()
            stats = await self.store.stats(now=now, finished=finished)
            await self.handler.bounces.observe_gauges()
        except Exception as exc:
            metrics.errors_total.labels("store").inc()
            event(log, "monitor.failed", logging.WARNING, error=exc.__class__.__name__)
        else:
            if finished:
                self._finished_counted_at = time.monotonic()
            metrics.email_queue_depth.set(stats.depth())
            statuses = ["queued", "processing"] + (
                ["sent", "failed", "bounced"] if finished else []
            )
            for status in statuses:
                metrics.email_queue_messages.labels(status).set(stats.counts.get(status, 0))
            age = (now - stats.oldest_queued_at).total_seconds() if stats.oldest_queued_at else 0
            metrics.email_queue_oldest_age_seconds.set(age)
        for entry in self.router.health():
            metrics.provider_health.labels(entry["provider"]).set(1 if entry["healthy"] else 0)

    async def stop(self) -> None:
        grace = self.settings.delivery.shutdown_grace.total_seconds()
        event(log, "relay.stopping", grace_s=grace)
        self.draining = True
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        if self.extra_processes is not None:
            # The extra processes drain alongside this one, not after it.
            self.extra_processes.signal_stop()
        if self.ingests:
            await self.ingest.drain(grace)
        if self.extra_processes is not None:
            await self.extra_processes.wait(grace)
        if self.roles.woken is not None:
            unlisten(self.roles.woken)
        for pipe in self._pipes.values():
            pipe.close()
        await self.engine.stop()
        await self.router.close()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        await self.store.close()
        if self._tally_dir is not None:
            shutil.rmtree(self._tally_dir, ignore_errors=True)
        event(log, "relay.stopped")
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()
