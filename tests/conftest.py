from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import Settings
from relay.queue import SqlStore, create_store
from relay.service import RelayService
from tests.servers import MariaDB, SmtpSink

BACKENDS = ["sqlite", "mariadb"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's RELAY_* variables must not leak into the settings tests build.
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    server = MariaDB.start(tmp_path_factory.mktemp("mariadb"))
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def queue_settings(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> dict[str, Any]:
    """A fresh, empty queue database for one test, on the parametrised backend."""
    if backend == "sqlite":
        return {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "queue.db")}}
    server: MariaDB = request.getfixturevalue("mariadb")
    name = f"relay_{secrets.token_hex(6)}"
    server.create_database(name)
    return {"backend": "mysql", "mysql": mysql_settings(server, name)}


def mysql_settings(server: MariaDB, database: str) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "user": "relay",
        "password": server.password,
        "database": database,
        "max_connections": 20,
    }


def relay_settings(tmp_path: Path, queue: dict[str, Any], **sections: Any) -> Settings:
    values: dict[str, Any] = {
        "smtp": {"port": 0, "hostname": "relay.test"},
        "http": {"port": 0},
        "queue": queue,
        "providers": {"outbox": {"type": "outbox", "directory": str(tmp_path / "outbox")}},
        "delivery": {"process_interval": "0.2s", "min_backoff": "1s", "max_backoff": "2s"},
    }
    for section, overrides in sections.items():
        if isinstance(values.get(section), dict) and section != "providers":
            values[section] = {**values[section], **overrides}
        else:
            values[section] = overrides
    return Settings(**values)


@pytest.fixture
async def store(queue_settings: dict[str, Any], tmp_path: Path) -> AsyncIterator[SqlStore]:
    opened = create_store(relay_settings(tmp_path, queue_settings))
    await opened.open()
    await opened.migrate()
    yield opened
    await opened.close()


StartRelay = Callable[..., Awaitable[RelayService]]


@pytest.fixture
async def start_relay(queue_settings: dict[str, Any], tmp_path: Path) -> AsyncIterator[StartRelay]:
    """Start in-process relays on free ports; each is stopped at the end of the test."""
    started: list[RelayService] = []

    async def start(queue: dict[str, Any] | None = None, **sections: Any) -> RelayService:
        settings = relay_settings(tmp_path, queue or queue_settings, **sections)
        service = RelayService(settings)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        if not service._stopped.is_set():
            await service.stop()


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    sink = SmtpSink.start()
    yield sink
    sink.stop()
