"""`delivery.processes`: delivery workers of one relay in more than one event loop.

Real parts throughout: `smtp-relay serve` as its users start it, a real MariaDB queue,
smtplib clients, and Postfix's smtp-sink as the smarthost, answering DATA after a pause so
that deliveries overlap and the connections each process holds can be counted with `ss`.
Which process delivered a message is read from the JSON logs (`process_index`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import multiprocess

from relay.config import ConfigError, parse_settings
from tests.conftest import mysql_settings
from tests.servers import MariaDB, SmtpSink, free_port, wait_for_port
from tests.test_ingest_processes import RelayLog, send_all
from tests.test_processes import start_process, write_config

DELIVERING = 3
WORKERS = 6
CONNECTIONS = 6
TOKEN = "oncall-token-" + "d" * 24


class Relay(RelayLog):
    """`smtp.processes: 1`, `delivery.processes: 3`: two extra processes that only deliver."""

    def __init__(self, mariadb: MariaDB, tmp_path: Path, sink: SmtpSink) -> None:
        database = f"relay_{secrets.token_hex(6)}"
        mariadb.create_database(database)
        self.mariadb, self.database = mariadb, database
        self.smtp_port, self.http_port = free_port(), free_port()
        self.log = tmp_path / "relay.log"
        config = write_config(
            tmp_path / "relay.yaml",
            {
                "smtp": {"port": self.smtp_port, "hostname": "relay.test"},
                "http": {
                    "port": self.http_port,
                    "admin_tokens": [{"name": "oncall", "token": TOKEN}],
                },
                "queue": {"backend": "mysql", "mysql": mysql_settings(mariadb, database)},
                "providers": {
                    "smarthost": {
                        "type": "smtp",
                        "host": "127.0.0.1",
                        "port": sink.port,
                        "tls": "none",
                        "max_connections": CONNECTIONS,
                    }
                },
                "delivery": {
                    "providers": ["smarthost"],
                    "processes": DELIVERING,
                    "worker_count": WORKERS,
                    # Only wake-ups between the processes start deliveries within the minute.
                    "process_interval": "60s",
                    "shutdown_grace": "20s",
                },
                "workspaces": {
                    "default": {"limits": {"rate_limit_burst": 5000, "rate_limit_refill": 5000}}
                },
            },
        )
        self.metrics = tmp_path / "metrics"
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics)
        try:
            self.process = start_process(config, self.log)
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        wait_for_port(self.smtp_port)
        wait_for_port(self.http_port)
        self.wait_for(
            lambda: len(self.events("delivery.started")) == DELIVERING, "every process delivering"
        )

    def statuses(self) -> Counter[str]:
        with self.mariadb.admin() as connection, connection.cursor() as cursor:
            cursor.execute(f"SELECT status, COUNT(*) FROM {self.database}.messages GROUP BY 1")
            return Counter({str(row[0]): int(row[1]) for row in cursor.fetchall()})


@pytest.fixture
def slow_sink() -> Any:
    # Each DATA is answered after a second: deliveries overlap, connections stay busy.
    sink = SmtpSink.start("-w", "1")
    yield sink
    sink.stop()


@pytest.fixture
def relay(mariadb: MariaDB, tmp_path: Path, slow_sink: SmtpSink) -> Any:
    started = Relay(mariadb, tmp_path, slow_sink)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


def get_json(relay: Relay, path: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{relay.http_port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:  # /health answers 503 when unhealthy
        return json.load(error)


# Sets provider_health to 0 in the relay's metrics directory and stays alive, as a delivery
# process whose breaker for the provider opened does.
_OPENED_ELSEWHERE = (
    "import sys, time; from relay import metrics; "
    "metrics.provider_health.labels('smarthost').set(0); print('open', flush=True); "
    "time.sleep(120)"
)


def test_a_circuit_open_in_another_process_shows_in_the_first_ones_health(
    relay: Relay,
) -> None:
    """The first process answers /health and /api/providers/health, from breakers of its
    own; a circuit open in another delivery process must show there too. The other
    process is a stand-in writing to the relay's metrics directory what a delivery
    process whose breaker opened writes, so that which process meets the failure is not
    left to chance."""
    [before] = get_json(relay, "/api/providers/health")
    assert before["healthy"] and before["state"] == "closed"

    stand_in = subprocess.Popen(
        [sys.executable, "-c", _OPENED_ELSEWHERE],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(relay.metrics)},
        stdout=subprocess.PIPE,
    )
    try:
        assert stand_in.stdout is not None and stand_in.stdout.readline() == b"open\n"
        [after] = get_json(relay, "/api/providers/health")
        health = get_json(relay, "/health")
    finally:
        stand_in.kill()
        stand_in.wait()
        multiprocess.mark_process_dead(stand_in.pid, str(relay.metrics))

    assert not after["healthy"] and after["state"] == "open in another process"
    assert health["checks"]["smarthost"] == {
        "status": "unhealthy",
        "message": "circuit open in another process",
    }
    assert health["status"] == "degraded"
    [again] = get_json(relay, "/api/providers/health")
    assert again["healthy"], "the stand-in is gone: every live process finds it healthy"


def connections_by_pid(*, sport: int | None = None, dport: int | None = None) -> Counter[int]:
    where = f"( sport = :{sport} )" if sport else f"( dport = :{dport} )"
    state = ["state", "listening"] if sport else ["state", "established"]
    listing = subprocess.run(
        ["ss", "-Htnp", *state, where], capture_output=True, text=True, check=True
    ).stdout
    found: Counter[int] = Counter()
    for line in listing.splitlines():
        for pid in {int(p) for p in _pids(line)}:
            found[pid] += 1
    return found


def _pids(line: str) -> list[str]:
    return [part.split(",")[0] for part in line.split("pid=")[1:]]


def recipients_at_sink(sink: SmtpSink) -> Counter[str]:
    return Counter(rcpt for message in sink.messages() for rcpt in message.rcpt_tos)


@pytest.mark.slow
def test_a_backlog_is_shared_by_every_delivery_process_within_the_relays_limits(
    relay: Relay, slow_sink: SmtpSink
) -> None:
    children = relay.children()
    assert sorted(children) == [1, 2]
    # Delivery-only processes are not handed the listening socket.
    assert set(connections_by_pid(sport=relay.smtp_port)) == {relay.process.pid}

    queued = send_all(relay.smtp_port, 60)
    assert None not in queued

    # Sample the smarthost connections while the backlog drains: each process keeps to
    # its part of max_connections, and all of them send.
    most: Counter[int] = Counter()
    deadline = time.monotonic() + 60
    while relay.statuses()["sent"] < 60:
        assert time.monotonic() < deadline, f"not drained: {relay.statuses()}"
        for pid, count in connections_by_pid(dport=slow_sink.port).items():
            most[pid] = max(most[pid], count)
        time.sleep(0.2)

    pids = {relay.process.pid, *children.values()}
    assert set(most) == pids, "every delivery process connected to the smarthost"
    assert max(most.values()) <= CONNECTIONS // DELIVERING
    by_process = Counter(e["process_index"] for e in relay.events("delivery.attempt"))
    assert set(by_process) == {0, 1, 2}, by_process
    assert sum(by_process.values()) == 60
    # Each message reached the smarthost once.
    assert recipients_at_sink(slow_sink) == Counter(f"patient{n}@example.net" for n in range(60))
    workers = {e["process_index"]: e["workers"] for e in relay.events("delivery.started")}
    assert workers == {0: 2, 1: 2, 2: 2}


@pytest.mark.slow
def test_sigterm_lets_every_delivery_process_finish_and_hand_back_the_rest(
    relay: Relay, slow_sink: SmtpSink
) -> None:
    queued = send_all(relay.smtp_port, 90)
    assert None not in queued
    relay.wait_for(
        lambda: {e["process_index"] for e in relay.events("delivery.attempt")} == {0, 1, 2},
        "every process delivered",
    )
    children = list(relay.children().values())

    relay.process.send_signal(signal.SIGTERM)
    assert relay.process.wait(timeout=60) == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
        ), "an extra process outlived the first"

    # Nothing is left claimed: what was started was finished, the rest handed back.
    statuses = relay.statuses()
    assert set(statuses) <= {"sent", "queued"}, statuses
    assert statuses["sent"] + statuses["queued"] == 90
    assert 0 < statuses["queued"], "the SIGTERM came before the backlog was drained"
    at_sink = recipients_at_sink(slow_sink)
    assert sum(at_sink.values()) == statuses["sent"]
    assert set(at_sink.values()) == {1}, "no message was sent twice"


# The configuration: what each delivery process takes of the relay's totals


def _settings(**delivery: Any) -> Any:
    return parse_settings(
        json.dumps(
            {
                "queue": {"backend": "mysql", "mysql": {"database": "relay"}},
                "providers": {
                    "smarthost": {"type": "smtp", "host": "127.0.0.1", "max_connections": 8},
                    "mailgun": {
                        "type": "mailgun",
                        "domain": "mg.example.org",
                        "api_key": "key-not-real",
                    },
                },
                "delivery": {"providers": ["smarthost", "mailgun"], **delivery},
            }
        ),
        "test",
    )


def test_each_delivery_process_gets_its_part_of_the_relays_limits() -> None:
    settings = _settings(
        processes=3,
        worker_count=10,
        provider_limits={"smarthost": {"max_concurrency": 7, "rate_per_second": 30}},
    )
    shares = [settings.delivery_share(index) for index in range(3)]

    assert [s.delivery.worker_count for s in shares] == [4, 3, 3]
    smarthost = [s.delivery.provider_limits["smarthost"] for s in shares]
    assert [limit.max_concurrency for limit in smarthost] == [3, 2, 2]
    assert [limit.rate_per_second for limit in smarthost] == [10, 10, 10]
    # A provider with no limits configured splits the default concurrency (10).
    mailgun = [s.delivery.provider_limits["mailgun"] for s in shares]
    assert [limit.max_concurrency for limit in mailgun] == [4, 3, 3]
    assert [limit.rate_per_second for limit in mailgun] == [None, None, None]
    assert [s.providers["smarthost"].max_connections for s in shares] == [3, 3, 2]
    assert [s.providers["mailgun"].max_connections for s in shares] == [3, 3, 2]
    # Everything else, and the totals the first process reports, stay as configured.
    assert settings.delivery.worker_count == 10
    assert {s.delivery.batch_size for s in shares} == {50}
    assert settings.process_count == 3


def test_a_process_never_gets_less_than_one_of_anything() -> None:
    settings = _settings(processes=4, worker_count=2)
    shares = [settings.delivery_share(index) for index in range(4)]
    assert [s.delivery.worker_count for s in shares] == [1, 1, 1, 1]


def test_one_delivery_process_keeps_the_settings_as_they_are() -> None:
    settings = _settings(worker_count=10)
    assert settings.delivery_share(0) is settings
    assert settings.process_count == 1


def test_which_process_ingests_and_which_delivers() -> None:
    settings = _settings(processes=3)
    settings = settings.model_copy(
        update={"smtp": settings.smtp.model_copy(update={"processes": 2})}
    )
    assert settings.process_count == 3
    assert [settings.ingests(i) for i in range(3)] == [True, True, False]
    assert [settings.delivers(i) for i in range(3)] == [True, True, True]


def test_delivery_processes_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.processes"):
        _settings(processes=True)
    with pytest.raises(ConfigError, match=r"delivery\.processes"):
        _settings(processes=0)
    sqlite = json.dumps({"delivery": {"processes": 2}})
    needs_mysql = r"delivery\.processes \(or environment RELAY_DELIVERY__PROCESSES\) above 1"
    with pytest.raises(ConfigError, match=needs_mysql):
        parse_settings(sqlite, "test")
