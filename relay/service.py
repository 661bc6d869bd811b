"""The relay process: SMTP ingest, delivery workers and HTTP in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from relay.api.app import Probes, create_app
from relay.config import Settings
from relay.delivery.engine import DeliveryEngine
from relay.delivery.providers import build_providers
from relay.delivery.routing import Router
from relay.ingest.handler import IngestHandler
from relay.ingest.protocol import Gate
from relay.ingest.server import IngestServer
from relay.logs import event
from relay.queue import create_store

log = logging.getLogger("relay.service")


class _EmbeddedHttpServer(uvicorn.Server):
    """uvicorn sharing our loop: the relay, not uvicorn, owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RelayService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = create_store(settings)
        self.providers = build_providers(settings)
        self.router = Router(self.providers, settings)
        self.gate = Gate()
        self.engine = DeliveryEngine(self.store, self.router, settings.delivery)
        self.handler = IngestHandler(
            self.store, settings, gate=self.gate, on_queued=self.engine.wake
        )
        self.ingest = IngestServer(self.handler, settings.smtp, self.gate)
        self._http: _EmbeddedHttpServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def smtp_port(self) -> int:
        return self.ingest.port

    @property
    def http_port(self) -> int:
        assert self._http is not None and self._http.servers
        return int(self._http.servers[0].sockets[0].getsockname()[1])

    async def start(self) -> None:
        await self.store.open()
        applied = await self.store.migrate()
        if applied:
            event(log, "queue.migrated", backend=self.store.backend, versions=applied)
        await self.engine.start()
        if self.settings.http.enabled:
            await self._start_http()
        await self.ingest.start()
        event(
            log,
            "relay.started",
            backend=self.store.backend,
            providers=",".join(self.settings.delivery.providers),
        )

    async def _start_http(self) -> None:
        app = create_app(Probes(database_ping=self.store.ping, accepting=lambda: self.gate.open))
        config = uvicorn.Config(
            app,
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

    async def stop(self) -> None:
        grace = self.settings.delivery.shutdown_grace.total_seconds()
        event(log, "relay.stopping", grace_s=grace)
        await self.ingest.drain(grace)
        await self.engine.stop()
        await self.router.close()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        await self.store.close()
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
