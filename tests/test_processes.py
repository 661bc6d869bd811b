"""The relay as its users run it: `smtp-relay` processes, several sharing one MariaDB."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.clock import utcnow
from relay.ids import new_queue_id
from relay.queue import NewMessage, create_store
from relay.queue.sqlite import SqliteStore
from tests.conftest import mysql_settings, relay_settings
from tests.servers import MariaDB, free_port, wait_for_port

RELAY = [sys.executable, "-m", "relay.cli"]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def embedded_config(tmp_path: Path, **sections: Any) -> tuple[Path, int, int]:
    """A relay.yaml on the embedded SQLite queue and free ports: (path, SMTP, HTTP port)."""
    smtp_port, http_port = free_port(), free_port()
    config = {
        "smtp": {"port": smtp_port, "hostname": "relay.test"},
        "http": {"port": http_port},
        "queue": {"sqlite": {"path": str(tmp_path / "queue.db")}},
        "providers": {"outbox": {"type": "outbox", "directory": str(tmp_path / "outbox")}},
        **sections,
    }
    return write_config(tmp_path / "relay.yaml", config), smtp_port, http_port


def start_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.Popen(
        [*RELAY, "--config", str(config), "serve"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.mark.slow
async def test_two_relays_on_one_mariadb_deliver_a_backlog_exactly_once(
    mariadb: MariaDB, tmp_path: Path
) -> None:
    database = f"relay_{secrets.token_hex(6)}"
    mariadb.create_database(database)
    password_file = tmp_path / "db-password"
    password_file.write_text(mariadb.password + "\n")
    mysql = {**mysql_settings(mariadb, database), "password_file": str(password_file)}
    del mysql["password"]
    queue = {"backend": "mysql", "mysql": mysql}

    store = create_store(relay_settings(tmp_path, queue))
    await store.open()
    await store.migrate()
    backlog = set()
    for n in range(2000):
        message = NewMessage(
            id=new_queue_id(),
            workspace_id="default",
            from_email="bulk@example.org",
            recipients=(f"patient{n}@example.net",),
            subject=f"reminder {n}",
            content=f"Subject: reminder {n}\r\n\r\nSee you soon.\r\n".encode(),
            queued_at=utcnow(),
        )
        await store.enqueue(message)
        backlog.add(message.id)

    processes = []
    for name in ("a", "b"):
        config = write_config(
            tmp_path / f"{name}.yaml",
            {
                "smtp": {"port": free_port(), "hostname": f"relay-{name}.test"},
                "http": {"port": free_port()},
                "queue": queue,
                "providers": {"outbox": {"type": "outbox", "directory": str(tmp_path / name)}},
                "delivery": {"worker_count": 10, "batch_size": 50, "process_interval": "0.5s"},
            },
        )
        processes.append(start_process(config, tmp_path / f"{name}.log"))
    try:
        deadline = time.monotonic() + 240
        while (await store.stats(now=utcnow())).counts.get("sent", 0) < 2000:
            assert time.monotonic() < deadline, (await store.stats(now=utcnow())).counts
            for process in processes:
                assert process.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            await asyncio.sleep(0.5)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            assert process.wait(timeout=60) == 0
    stats = await store.stats(now=utcnow())
    await store.close()

    delivered = {name: [p.stem for p in (tmp_path / name).glob("*.eml")] for name in "ab"}
    everything = delivered["a"] + delivered["b"]
    assert stats.counts == {"sent": 2000}
    assert len(everything) == 2000, "no message delivered twice"
    assert set(everything) == backlog, "none left behind"
    assert delivered["a"] and delivered["b"], "both replicas took part"


def test_sigterm_drains_then_exits_cleanly(tmp_path: Path) -> None:
    config, smtp_port, _ = embedded_config(tmp_path, delivery={"shutdown_grace": "10s"})
    process = start_process(config, tmp_path / "relay.log")
    try:
        wait_for_port(smtp_port)
        session = socket.create_connection(("127.0.0.1", smtp_port), timeout=10)
        reader = session.makefile("rb")
        reader.readline()
        session.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        replies = [reader.readline() for _ in range(9)]
        assert replies[-1].startswith(b"250 2.1.5"), replies

        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", smtp_port), timeout=10) as late:
            assert late.recv(200).startswith(b"421 4.3.2")

        session.sendall(b"DATA\r\n")
        assert reader.readline().startswith(b"354")
        session.sendall(b"Subject: during shutdown\r\n\r\nstill accepted\r\n.\r\n")
        assert reader.readline().startswith(b"250 2.0.0 Ok: queued as")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "relay.log").read_text()
    assert '"event": "relay.stopped"' in log
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [*RELAY, *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )


def test_every_command_has_help() -> None:
    for command in (
        [],
        ["serve"],
        ["db", "migrate"],
        ["queue", "status"],
        ["queue", "show"],
        ["config", "check"],
    ):
        result = run_cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: smtp-relay" in result.stdout


def test_db_migrate_and_queue_status(tmp_path: Path) -> None:
    env = {"RELAY_QUEUE__SQLITE__PATH": str(tmp_path / "q.db")}
    first = run_cli("db", "migrate", env=env)
    versions = [m.version for m in SqliteStore.migrations]
    latest = max(versions)
    assert first.returncode == 0, first.stderr
    assert f"applied migrations {', '.join(map(str, versions))}" in first.stdout
    again = run_cli("db", "migrate", env=env)
    assert again.returncode == 0 and f"up to date at version {latest}" in again.stdout
    status = run_cli("queue", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["counts"]["queued"] == 0 and report["oldest_queued_age_seconds"] is None


def test_a_missing_secret_file_stops_startup_naming_the_key(tmp_path: Path) -> None:
    gone = tmp_path / "secrets" / "smarthost-password"
    config = write_config(
        tmp_path / "relay.yaml",
        {
            "providers": {
                "smarthost": {
                    "type": "smtp",
                    "host": "127.0.0.1",
                    "username": "relay",
                    "password_file": str(gone),
                }
            },
            "delivery": {"providers": ["smarthost"]},
        },
    )
    for command in (["config", "check"], ["serve"]):
        result = run_cli("--config", str(config), *command)
        assert result.returncode == 2, result.stdout
        assert f"providers.smarthost.password_file: cannot read {gone}" in result.stderr

    # Once the file is there (a Secret mounted, say), the same configuration starts.
    gone.parent.mkdir()
    gone.write_text("s3cret\n")
    assert run_cli("--config", str(config), "config", "check").returncode == 0


def test_only_secret_files_in_use_are_required(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "not-mounted")
    unused = {
        # A provider no route names, and the MySQL password with the sqlite queue.
        "providers": {
            "outbox": {"type": "outbox", "directory": str(tmp_path / "outbox")},
            "spare": {"type": "mailgun", "domain": "mg.example.org", "api_key_file": nowhere},
        },
        "delivery": {"providers": ["outbox"]},
        "queue": {"backend": "sqlite", "mysql": {"password_file": nowhere}},
    }
    config = write_config(tmp_path / "unused.yaml", unused)
    result = run_cli("--config", str(config), "config", "check")
    assert result.returncode == 0, result.stderr

    # An admin token's file is in use whenever the admin API is (a list entry).
    tokens = {"http": {"admin_tokens": [{"name": "oncall", "token_file": nowhere}]}}
    config = write_config(tmp_path / "tokens.yaml", tokens)
    result = run_cli("--config", str(config), "config", "check")
    assert result.returncode == 2
    assert "http.admin_tokens.0.token_file: cannot read" in result.stderr


def test_a_bad_config_file_stops_startup_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", {"delivery": {"worker_count": 0}})
    result = run_cli("--config", str(config), "serve")
    assert result.returncode == 2
    assert "delivery.worker_count" in result.stderr
    assert "greater than or equal to 1" in result.stderr


def test_an_unreachable_database_stops_startup_with_a_clear_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        {
            "queue": {
                "backend": "mysql",
                "mysql": {
                    "port": free_port(),
                    "password": "hunter2-secret",
                    "connect_timeout": "1s",
                },
            }
        },
    )
    result = run_cli("--config", str(config), "db", "migrate")
    assert result.returncode == 1
    assert "MySQL queue unavailable" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


@pytest.mark.slow
async def test_daily_quota_is_exact_across_two_relay_processes(
    mariadb: MariaDB, tmp_path: Path
) -> None:
    database = f"relay_{secrets.token_hex(6)}"
    mariadb.create_database(database)
    queue = {"backend": "mysql", "mysql": mysql_settings(mariadb, database)}
    ports = []
    processes = []
    for name in ("a", "b"):
        smtp_port = free_port()
        config = write_config(
            tmp_path / f"{name}.yaml",
            {
                "smtp": {"port": smtp_port, "hostname": f"relay-{name}.test"},
                "http": {"port": free_port()},
                "queue": queue,
                "providers": {"outbox": {"type": "outbox", "directory": str(tmp_path / name)}},
                "delivery": {"process_interval": "1h"},
                "workspaces": {"default": {"limits": {"workspace_daily": 50}}},
            },
        )
        processes.append(start_process(config, tmp_path / f"{name}.log"))
        ports.append(smtp_port)
    try:
        for port in ports:
            wait_for_port(port)

        def hammer(port: int) -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                for n in range(40):
                    client.ehlo("app")
                    client.mail("a@example.org")
                    client.rcpt(f"p{n}@example.net")
                    codes.append(client.data(b"Subject: q\r\n\r\nx\r\n")[0])
            return codes

        # Both replicas race for the same 50-recipient quota, 80 messages in all.
        results = await asyncio.gather(*(asyncio.to_thread(hammer, p) for p in ports))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
    accepted = sum(codes.count(250) for codes in results)
    refused = sum(codes.count(451) for codes in results)
    assert (accepted, refused) == (50, 30)
    assert all(250 in codes for codes in results), "both replicas accepted some"

    store = create_store(relay_settings(tmp_path, queue))
    await store.open()
    counts = (await store.stats(now=utcnow())).counts
    used = await store.quota_used("default", utcnow().date().isoformat())
    await store.close()
    assert sum(counts.values()) == 50
    assert used["*"] == 50


def test_a_reader_that_stops_reading_gets_no_traceback(tmp_path: Path) -> None:
    # `smtp-relay queue status | head -1`, where head has already gone: the write fails
    # with EPIPE. Before, two tracebacks (the write, then the flush at exit), exit 1.
    env = {"RELAY_QUEUE__SQLITE__PATH": str(tmp_path / "q.db")}
    assert run_cli("db", "migrate", env=env).returncode == 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*RELAY, "queue", "status", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean, **env},
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""
