"""`smtp.processes`: several event loops of one relay accept SMTP on the same sockets.

Real parts throughout: `smtp-relay serve` as its users start it, a real MariaDB queue,
smtplib clients, the outbox provider writing what it delivers to a directory. Which process
takes a connection is the kernel's choice, so the tests send enough sessions for every
process to take some and read which one did from the JSON logs (`process_index`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, RateLimits, parse_settings
from relay.limits import RateLimiter
from tests.conftest import mysql_settings
from tests.servers import MariaDB, free_port, wait_for_port
from tests.test_processes import RELAY, embedded_config, start_process, write_config

PROCESSES = 3
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as (\S+)")


class RelayLog:
    """What a running `smtp-relay serve` wrote: its JSON log lines, and waiting on them."""

    log: Path
    process: subprocess.Popen[bytes]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{") and f'"event": "{name}"' in line:
                found.append(json.loads(line))
        return found

    def children(self) -> dict[int, int]:
        """Index to pid of the extra processes, the latest start of each."""
        return {e["index"]: e["pid"] for e in self.events("process.started")}

    def wait_for(self, condition: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out waiting for: {what}"
            time.sleep(0.1)


class Relay(RelayLog):
    """One `smtp-relay serve` with `smtp.processes: 3` on its own MariaDB database."""

    def __init__(self, mariadb: MariaDB, tmp_path: Path, **smtp: Any) -> None:
        database = f"relay_{secrets.token_hex(6)}"
        mariadb.create_database(database)
        self.mariadb, self.database = mariadb, database
        self.tmp_path = tmp_path
        self.smtp_port, self.http_port = free_port(), free_port()
        self.outbox = tmp_path / "outbox"
        self.log = tmp_path / "relay.log"
        self.metrics_dir = tmp_path / "metrics"
        self.config = write_config(
            tmp_path / "relay.yaml",
            {
                "smtp": {
                    "port": self.smtp_port,
                    "hostname": "relay.test",
                    "processes": PROCESSES,
                    **smtp,
                },
                "http": {"port": self.http_port},
                "queue": {"backend": "mysql", "mysql": mysql_settings(mariadb, database)},
                "providers": {"outbox": {"type": "outbox", "directory": str(self.outbox)}},
                # Only the wake-up from the process that queued the mail can start a
                # delivery within the minute.
                "delivery": {"process_interval": "60s", "shutdown_grace": "10s"},
                # The token bucket is not what these tests measure.
                "workspaces": {
                    "default": {"limits": {"rate_limit_burst": 5000, "rate_limit_refill": 5000}}
                },
            },
        )
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        try:
            self.process = start_process(self.config, self.log)
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        wait_for_port(self.smtp_port)
        wait_for_port(self.http_port)
        self.wait_for(
            lambda: len(self.events("smtp.listening")) == PROCESSES, "every process listening"
        )

    def get(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health"))

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")

    def statuses(self, queue_ids: list[str]) -> dict[str, str]:
        with self.mariadb.admin() as connection, connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, status FROM {self.database}.messages WHERE id IN %s",
                (tuple(queue_ids),),
            )
            return {str(row[0]): str(row[1]) for row in cursor.fetchall()}

    def delivered(self) -> list[str]:
        return [path.stem for path in self.outbox.glob("*.eml")]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return subprocess.run(
            [*RELAY, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def relay(mariadb: MariaDB, tmp_path: Path) -> Any:
    started = Relay(mariadb, tmp_path)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


def send(port: int, n: int) -> str | None:
    """One message in its own session, as an application sends a reminder; its queue id."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("clinic.example.org")
            code, reply = client.mail("clinic@example.org")
            if code != 250:
                return None
            client.rcpt(f"patient{n}@example.net")
            client.putcmd("data")
            client.getreply()
            client.send(f"Subject: reminder {n}\r\n\r\nSee you at 9.\r\n.\r\n".encode())
            code, reply = client.getreply()
    except (OSError, smtplib.SMTPException):
        return None
    found = QUEUED.match(f"{code} {reply.decode()}")
    return found.group(1) if found else None


def send_all(port: int, count: int, sessions: int = 15) -> list[str | None]:
    with ThreadPoolExecutor(sessions) as pool:
        return list(pool.map(lambda n: send(port, n), range(count)))


def sessions_by_pid(port: int) -> Counter[int]:
    """Established SMTP sessions on the relay's port, by the pid of the process serving it."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Counter(int(pid) for pid in re.findall(r"pid=(\d+)", listing))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.slow
def test_every_process_accepts_into_one_queue_and_delivery_starts_at_once(relay: Relay) -> None:
    queued = send_all(relay.smtp_port, 240)

    assert None not in queued, "every message was answered 250"
    relay.wait_for(lambda: len(relay.delivered()) >= 240, "all delivered", timeout=40)
    delivered = relay.delivered()
    assert sorted(delivered) == sorted(queued), "each delivered once, none other"

    by_process = Counter(e["process_index"] for e in relay.events("smtp.queued"))
    assert sum(by_process.values()) == 240
    assert set(by_process) == set(range(PROCESSES)), f"every process took mail: {by_process}"

    # The counters of all processes add up in the first one's /metrics.
    accepted = relay.metric("smtp_messages_accepted_total")
    assert accepted == 240
    assert relay.metric("maintenance_mode") == 0, "written before maintenance was ever set"
    health = relay.health()
    assert health["status"] == "healthy"
    assert health["checks"]["processes"]["message"].startswith("3 of 3 running")

    assert relay.stop() == 0
    assert not any(alive(pid) for pid in relay.children().values())


@pytest.mark.slow
def test_open_sessions_of_every_process_add_up(relay: Relay) -> None:
    clients = [socket.create_connection(("127.0.0.1", relay.smtp_port)) for _ in range(12)]
    try:
        for client in clients:
            assert client.recv(200).startswith(b"220")
        # The monitor of each process writes its own count every 5 s.
        relay.wait_for(lambda: relay.metric("smtp_sessions") == 12, "12 sessions", timeout=15)
    finally:
        for client in clients:
            client.close()
    assert relay.stop() == 0


@pytest.mark.slow
def test_maintenance_mode_reaches_every_process(relay: Relay) -> None:
    relay.cli("maintenance", "on", "--message", "Database upgrade")

    def all_closed() -> bool:
        shut = relay.events("relay.maintenance")
        return {e["process_index"] for e in shut if e["enabled"]} == {0, 1, 2}

    relay.wait_for(all_closed, "every process in maintenance", timeout=15)
    for _ in range(12):
        with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as client:
            assert client.recv(200) == b"421 4.3.2 Database upgrade\r\n"

    relay.cli("maintenance", "off")
    relay.wait_for(
        lambda: len([e for e in relay.events("relay.maintenance") if not e["enabled"]]) == 3,
        "every process open again",
        timeout=15,
    )
    assert None not in send_all(relay.smtp_port, 30)
    assert relay.stop() == 0


@pytest.mark.slow
def test_a_killed_process_is_started_again_and_no_accepted_mail_is_lost(relay: Relay) -> None:
    victim = relay.children()[1]
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(send_all, relay.smtp_port, 300, 10)
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        queued = load.result(timeout=120)

    relay.wait_for(lambda: relay.children()[1] != victim, "process 1 started again")
    exited = relay.events("process.exited")
    assert [(e["index"], e["pid"], e["returncode"]) for e in exited] == [(1, victim, -9)]

    # A session cut off by the kill was never answered 250: its client still holds the
    # message. Every message that was answered is delivered, once. A message whose commit
    # returned just before the kill but whose 250 never left is delivered too, and its
    # client sends it again (at least once, as with any MTA): at most one per session.
    answered = [queue_id for queue_id in queued if queue_id]
    assert len(answered) > 250
    relay.wait_for(lambda: set(relay.delivered()) >= set(answered), "all answered delivered")
    time.sleep(1)
    delivered = relay.delivered()
    assert len(delivered) == len(set(delivered))
    assert len(set(delivered) - set(answered)) <= 10

    relay.wait_for(
        lambda: relay.health()["checks"]["processes"]["status"] == "healthy",
        "healthy again",
    )
    assert "1 restarts" in relay.health()["checks"]["processes"]["message"]
    assert relay.stop() == 0


@pytest.mark.slow
def test_sigterm_lets_every_process_finish_its_open_transactions(relay: Relay) -> None:
    sessions: list[tuple[socket.socket, Any]] = []
    # Which process accepts is the kernel's choice, and a busy machine can hand one process
    # many in a row: open sessions until at least two processes hold some (nine at least).
    n = 0
    while n < 9 or len(sessions_by_pid(relay.smtp_port)) < 2:
        assert n < 40, "every session went to one process"
        n += 1
        client = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=20)
        reader = client.makefile("rb")
        reader.readline()
        client.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
        client.sendall(f"RCPT TO:<p{n}@example.net>\r\n".encode())
        while not reader.readline().startswith(b"250 2.1.5"):
            pass
        sessions.append((client, reader))
    children = list(relay.children().values())

    relay.process.send_signal(signal.SIGTERM)
    relay.wait_for(lambda: len(relay.events("relay.stopping")) == PROCESSES, "all draining")
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as late:
        assert late.recv(200).startswith(b"421 4.3.2")

    queued = []
    for client, reader in sessions:
        client.sendall(b"DATA\r\n")
        assert reader.readline().startswith(b"354")
        client.sendall(b"Subject: during shutdown\r\n\r\nstill accepted\r\n.\r\n")
        found = QUEUED.match(reader.readline().decode())
        assert found, "an open transaction is answered"
        queued.append(found.group(1))
        client.close()
    assert relay.process.wait(timeout=40) == 0
    assert not any(alive(pid) for pid in children)
    by_process = {e["process_index"] for e in relay.events("smtp.queued")}
    assert len(by_process) > 1, "the transactions were spread over the processes"
    # Each answered message is in the queue: delivered before the exit, or still queued
    # for the next start if it came in after the delivery workers had stopped.
    statuses = relay.statuses(queued)
    assert sorted(statuses) == sorted(queued)
    assert {queue_id for queue_id, status in statuses.items() if status == "sent"} == set(
        relay.delivered()
    )
    assert set(statuses.values()) <= {"sent", "queued"}


@pytest.mark.slow
def test_extra_processes_exit_when_the_first_one_dies(relay: Relay) -> None:
    children = list(relay.children().values())
    relay.process.kill()
    relay.process.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, "an extra process outlived the first"
        time.sleep(0.1)
    assert len(relay.events("process.orphaned")) == PROCESSES - 1


def test_more_processes_need_the_mysql_queue() -> None:
    needs_mysql = r"smtp\.processes \(or environment RELAY_SMTP__PROCESSES\) above 1 needs"
    with pytest.raises(ConfigError, match=needs_mysql):
        parse_settings("smtp:\n  processes: 2\n", "relay.yaml")
    with pytest.raises(ConfigError, match=r"smtp\.processes: .*not true/false"):
        parse_settings("smtp:\n  processes: true\nqueue:\n  backend: mysql\n", "relay.yaml")
    with pytest.raises(ConfigError, match=r"smtp\.processes: Input should be less than or equal"):
        parse_settings("smtp:\n  processes: 65\nqueue:\n  backend: mysql\n", "relay.yaml")


def test_rate_buckets_are_split_between_the_processes() -> None:
    limits = RateLimits(rate_limit_burst=10, rate_limit_refill=6)
    limiter = RateLimiter(share=2)
    taken = [limiter.take(limits, "clinic", "a@clinic.example") for _ in range(6)]
    assert taken == [None] * 5 + ["workspace"]
    bucket = limiter._buckets[("clinic", "")]
    assert bucket.refill_per_s == 3
    # A burst smaller than the process count still lets each process send.
    assert RateLimiter(share=4)._bucket(("x", ""), RateLimits(rate_limit_burst=2)).capacity == 1


@pytest.mark.slow
def test_connection_limits_count_the_sessions_of_every_process(
    mariadb: MariaDB, tmp_path: Path
) -> None:
    relay = Relay(mariadb, tmp_path, max_connections_per_ip=6)
    try:
        clients = []
        for _ in range(6):
            client = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10)
            assert client.recv(200).startswith(b"220"), "the limit is on all processes together"
            clients.append(client)
        with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as extra:
            assert extra.recv(200).startswith(b"421 4.7.0 Too many connections from your")

        # The sessions of a process that dies are its own to lose, not the client's places.
        held = sessions_by_pid(relay.smtp_port)
        index, victim = max(relay.children().items(), key=lambda child: held[child[1]])
        assert held[victim] > 0, held
        os.kill(victim, signal.SIGKILL)
        relay.wait_for(lambda: relay.children()[index] != victim, "the process started again")
        for client in clients:
            client.settimeout(0.5)
        gone = 0
        for client in clients:
            try:
                client.sendall(b"NOOP\r\n")
                gone += client.recv(200) == b""
            except OSError:
                gone += 1
        alive = 6 - gone
        opened = []
        while True:
            client = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10)
            opened.append(client)
            if not client.recv(200).startswith(b"220"):
                break
        assert gone == held[victim]
        assert len(opened) - 1 == 6 - alive, (gone, len(opened))
        for client in clients + opened:
            client.close()
        assert relay.stop() == 0
    finally:
        if relay.process.poll() is None:
            relay.process.kill()


def test_a_given_metrics_directory_is_used_and_emptied_of_an_earlier_run(tmp_path: Path) -> None:
    config, smtp_port, http_port = embedded_config(tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999.db").write_bytes(b"left by a process long gone")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        process = start_process(config, tmp_path / "relay.log")
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        wait_for_port(smtp_port)
        wait_for_port(http_port)
        assert send(smtp_port, 1) is not None
        url = f"http://127.0.0.1:{http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert 'smtp_messages_accepted_total{workspace="default"} 1.0' in text
        assert not (metrics_dir / "counter_99999.db").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.slow
def test_extra_processes_of_a_relay_configured_by_environment_alone(
    mariadb: MariaDB, tmp_path: Path
) -> None:
    database = f"relay_{secrets.token_hex(6)}"
    mariadb.create_database(database)
    smtp_port, http_port = free_port(), free_port()
    mysql = mysql_settings(mariadb, database)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        {
            "RELAY_SMTP__PORT": str(smtp_port),
            "RELAY_SMTP__PROCESSES": "2",
            "RELAY_HTTP__PORT": str(http_port),
            "RELAY_QUEUE__BACKEND": "mysql",
            "RELAY_DELIVERY__ENABLED": "false",
            **{f"RELAY_QUEUE__MYSQL__{key.upper()}": str(value) for key, value in mysql.items()},
        }
    )
    log = tmp_path / "relay.log"
    process = subprocess.Popen(
        [*RELAY, "serve"], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count('"event": "smtp.listening"') < 2:
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert None not in send_all(smtp_port, 20, sessions=4)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert '"process_index": 1' in log.read_text()


def test_private_metrics_directories_of_dead_relays_are_swept(tmp_path: Path) -> None:
    """A relay killed with SIGKILL leaves its metrics directory; the next one removes it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    temp = Path(tempfile.gettempdir())
    dead = temp / f"smtp-relay-metrics-{gone.pid}-test{secrets.token_hex(3)}"
    dead.mkdir()
    (dead / "counter_1.db").write_bytes(b"samples of a relay long gone")
    living = temp / f"smtp-relay-metrics-{os.getpid()}-test{secrets.token_hex(3)}"
    living.mkdir()
    try:
        made = subprocess.run(
            [
                sys.executable,
                "-c",
                "from relay.processes import prepare_metrics_dir; print(prepare_metrics_dir())",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        ).stdout.strip()
        assert not dead.exists()
        assert living.exists(), "a live process's directory is kept"
        assert Path(made).name.startswith("smtp-relay-metrics-")
        assert not Path(made).exists(), "the relay's own went at its exit"
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(living, ignore_errors=True)
