"""A blue-green switch of relay versions under steady SMTP load loses and duplicates nothing.

What the operator does in a blue-green rollout, with real parts: two `smtp-relay serve`
processes of different configuration (blue, the old version, and green, the new) share one
MariaDB queue and deliver through their smtp provider to Postfix's smtp-sink. Clients send
to a Service, here a TCP proxy whose backend moves from blue to green in one assignment
while established connections stay where they are, as kube-proxy keeps them. Then blue gets
SIGTERM while it still has client sessions, an open transaction and claimed deliveries, and
drains: 421 to whatever comes next, the open transaction answered, its deliveries finished.

Clients are smtplib sessions, each reminder with its own Message-ID; like an MTA, a client
keeps a reminder until it is answered 250 and retries every other answer. The test proves:
every attempt answered 250 is delivered exactly once (by queue id and Message-ID); an attempt
whose connection died after DATA is delivered at most once, and no other attempt at all;
blue exits 0 within its shutdown grace after finishing deliveries it had claimed before the
signal; both versions accepted and delivered mail; green never refused any.
"""

from __future__ import annotations

import asyncio
import email.parser
import itertools
import json
import re
import secrets
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.conftest import mysql_settings
from tests.servers import MariaDB, SinkMessage, SmtpSink, free_port, wait_for_port
from tests.test_processes import start_process, write_config

BLUE, GREEN = "relay-blue.test", "relay-green.test"
# Seconds smtp-sink waits before answering DATA: each delivery takes about a second, so the
# old version is always in the middle of some when it is told to stop.
DELIVERY_DELAY_S = 1
GRACE_S = 10
# Messages each load client sends per SMTP session. Applications keep connections open for
# different lengths; the long one is sure still to be on blue when blue is told to stop.
SESSION_LENGTHS = (40, 8, 4, 2)
PACE_S = 0.3
RETRY_DELAY_S = 0.1
SMTP_TIMEOUT_S = 20
# Which try of a reminder a delivered copy came from: a real MTA resends the same bytes, but
# the test must tell a retry's copy from the first try's.
ATTEMPT_HEADER = "X-Reminder-Attempt"

ACCEPTED = "accepted"
REFUSED = "refused"
DROPPED = "dropped before DATA"
UNCERTAIN = "dropped after DATA"


class ServiceProxy:
    """A Kubernetes Service in miniature: new connections go to the current backend.

    It runs its own event loop in a thread, so that nothing the test waits on can stall the
    traffic. Switching is one assignment, read once per accepted connection: connections
    established before it stay on the old backend, as kube-proxy's conntrack entries do.
    """

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.opened: Counter[int] = Counter()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="service-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._forward, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])

    def switch(self, backend: int) -> None:
        self.backend = backend

    def stop(self) -> None:
        async def shut_down() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.gather(*self._connections, return_exceptions=True)

        if self._server is not None:
            self._call(shut_down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _forward(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        backend = self.backend
        try:
            try:
                backend_r, backend_w = await asyncio.open_connection("127.0.0.1", backend)
            except OSError:
                # No endpoint listening: the client sees a reset, as with kube-proxy.
                client_w.transport.abort()
                return
            self.opened[backend] += 1
            self._writers |= {client_w, backend_w}
            try:
                await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))
            finally:
                for writer in (client_w, backend_w):
                    self._writers.discard(writer)
                    writer.close()
        finally:
            self._connections.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        # Half-close, so that a relay's last words (221, or 421 when draining) reach the
        # client before it sees the end of the connection.
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


@dataclass(frozen=True)
class Reminder:
    """One appointment reminder, as a clinic application submits it."""

    client: str
    sequence: int

    @property
    def key(self) -> str:
        return f"{self.client}-{self.sequence}"

    @property
    def message_id(self) -> str:
        return f"<reminder-{self.key}@clinic.example>"

    @property
    def sender(self) -> str:
        return f"app-{self.client}@clinic.example"

    @property
    def recipient(self) -> str:
        return f"patient-{self.key}@example.net"

    def content(self, attempt: str) -> bytes:
        return (
            f"From: Clinic <{self.sender}>\r\n"
            f"To: <{self.recipient}>\r\n"
            f"Message-ID: {self.message_id}\r\n"
            f"{ATTEMPT_HEADER}: {attempt}\r\n"
            f"Subject: Appointment reminder {self.key}\r\n"
            "\r\n"
            "Your appointment is tomorrow at 9:00.\r\n"
        ).encode()


@dataclass
class Attempt:
    """One try to hand a reminder over, and how it ended for the client."""

    tag: str
    message_id: str
    relay: str  # the host name in the session's greeting; "" when none named one
    outcome: str
    reply: str
    queue_id: str = ""
    at: float = field(default_factory=time.monotonic)


def _text(code: int, reply: bytes | str) -> str:
    return f"{code} {reply.decode() if isinstance(reply, bytes) else reply}"


class Submitter:
    """An application's SMTP client through the Service: one session, a reminder at a time."""

    def __init__(self, label: str, port: int) -> None:
        self.label = label
        self.port = port
        self.session: smtplib.SMTP | None = None
        self.relay = ""  # whom the open session talks to
        self.sent_in_session = 0

    def start_transaction(self, reminder: Reminder, tag: str) -> Attempt | None:
        """Connect if need be, then MAIL and RCPT; an Attempt if that already failed."""
        try:
            if self.session is None:
                client = smtplib.SMTP(timeout=SMTP_TIMEOUT_S)
                code, banner = client.connect("127.0.0.1", self.port)
                if code != 220:
                    client.close()
                    return Attempt(tag, reminder.message_id, "", REFUSED, _text(code, banner))
                self.session, self.sent_in_session = client, 0
                self.relay = banner.split()[0].decode()
                code, reply = client.ehlo(f"{self.label}.clinic.example")
                if code != 250:
                    return self._failed(reminder, tag, REFUSED, _text(code, reply))
            code, reply = self.session.mail(reminder.sender)
            if code == 250:
                code, reply = self.session.rcpt(reminder.recipient)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            return self._failed(reminder, tag, DROPPED, repr(exc))
        if code != 250:
            return self._failed(reminder, tag, REFUSED, _text(code, reply))
        return None

    def finish_transaction(self, reminder: Reminder, tag: str) -> Attempt:
        """DATA and the message: accepted only when answered 250."""
        assert self.session is not None
        try:
            code, reply = self.session.docmd("DATA")
            if code != 354:
                return self._failed(reminder, tag, REFUSED, _text(code, reply))
            self.session.send(reminder.content(tag) + b".\r\n")
            code, reply = self.session.getreply()
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            # The relay may have committed the message before the connection died: the
            # client cannot know, so this try may be delivered (once) or not.
            return self._failed(reminder, tag, UNCERTAIN, repr(exc))
        if code != 250:
            return self._failed(reminder, tag, REFUSED, _text(code, reply))
        self.sent_in_session += 1
        queue_id = reply.decode().split()[-1]
        return Attempt(tag, reminder.message_id, self.relay, ACCEPTED, _text(code, reply), queue_id)

    def _failed(self, reminder: Reminder, tag: str, outcome: str, reply: str) -> Attempt:
        attempt = Attempt(tag, reminder.message_id, self.relay, outcome, reply)
        # Whatever went wrong, the session is not to be trusted further: start afresh.
        self.hang_up(polite=False)
        return attempt

    def hang_up(self, polite: bool = True) -> None:
        session, self.session, self.relay = self.session, None, ""
        if session is None:
            return
        try:
            if polite:
                session.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            session.close()


class LoadClient(threading.Thread):
    """Sends reminders continuously until told to stop, each until it is answered 250."""

    def __init__(self, label: str, port: int, session_length: int, stop: threading.Event) -> None:
        super().__init__(name=f"load-{label}", daemon=True)
        self.submitter = Submitter(label, port)
        self.session_length = session_length
        self.stop = stop
        self.attempts: list[Attempt] = []
        self.error: BaseException | None = None

    @property
    def relay(self) -> str:
        return self.submitter.relay

    def run(self) -> None:
        try:
            for sequence in itertools.count():
                if self.stop.is_set():
                    break
                self.submit(Reminder(self.submitter.label, sequence))
                time.sleep(PACE_S)
            self.submitter.hang_up()
        except BaseException as exc:
            self.error = exc

    def submit(self, reminder: Reminder) -> None:
        # The reminder stays the client's until a 250: every other answer is retried, as an
        # MTA's queue would, here after a short pause rather than minutes.
        deadline = time.monotonic() + 60
        for number in itertools.count(1):
            tag = f"{reminder.key}/{number}"
            attempt = self.submitter.start_transaction(reminder, tag)
            if attempt is None:
                attempt = self.submitter.finish_transaction(reminder, tag)
            self.attempts.append(attempt)
            if attempt.outcome == ACCEPTED:
                if self.submitter.sent_in_session >= self.session_length:
                    self.submitter.hang_up()
                return
            assert time.monotonic() < deadline, f"{reminder.key} never accepted: {attempt}"
            time.sleep(RETRY_DELAY_S)


@dataclass
class Delivery:
    """One copy that reached smtp-sink, and what its trace says about its way there."""

    message_id: str
    attempt: str
    ingested_by: str
    queue_id: str
    delivered_by: str

    @classmethod
    def read(cls, dump: bytes) -> Delivery:
        helo = re.search(rb"^X-Helo-Args: (\S+)$", dump, re.MULTILINE)
        assert helo is not None, dump[:300]
        headers = email.parser.BytesHeaderParser().parsebytes(SinkMessage.parse(dump).content)
        trace = re.search(r"by (\S+) \(smtp-relay\) with \S+ id (\w+)", str(headers["Received"]))
        assert trace is not None, headers["Received"]
        return cls(
            message_id=str(headers["Message-ID"]),
            attempt=str(headers[ATTEMPT_HEADER]),
            ingested_by=trace[1],
            queue_id=trace[2],
            delivered_by=helo[1].decode().removeprefix("delivery."),
        )


def relay_config(
    name: str, smtp_port: int, queue: dict[str, Any], sink: SmtpSink
) -> dict[str, Any]:
    return {
        "smtp": {"port": smtp_port, "hostname": name},
        "http": {"port": free_port()},
        "queue": queue,
        "providers": {
            "sink": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": sink.port,
                "tls": "none",
                # The EHLO name tells, in every delivered copy, which version sent it.
                "local_hostname": f"delivery.{name}",
            }
        },
        "delivery": {
            "providers": ["sink"],
            # Few workers for the load: the queue never runs dry, so both versions always
            # hold claims, and the old one is mid-delivery when it is told to stop.
            "worker_count": 4,
            "batch_size": 4,
            "process_interval": "0.5s",
            "shutdown_grace": f"{GRACE_S}s",
        },
    }


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def logged(log: Path, name: str) -> bool:
    return any(entry.get("event") == name for entry in events(log))


@pytest.mark.slow
def test_blue_green_switch_under_load_delivers_every_accepted_message_once(
    mariadb: MariaDB, tmp_path: Path
) -> None:
    database = f"relay_{secrets.token_hex(6)}"
    mariadb.create_database(database)
    queue = {"backend": "mysql", "mysql": mysql_settings(mariadb, database)}
    db: pymysql.Connection = mariadb.admin()
    db.select_db(database)

    def rows(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with db.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    sink = SmtpSink.start("-w", str(DELIVERY_DELAY_S))
    ports = {BLUE: free_port(), GREEN: free_port()}
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    relays: dict[str, subprocess.Popen[bytes]] = {}
    proxy = ServiceProxy(ports[BLUE])
    proxy.start()
    stop_load = threading.Event()
    clients = [
        LoadClient(f"app{n}", proxy.port, length, stop_load)
        for n, length in enumerate(SESSION_LENGTHS)
    ]
    late = Submitter("late-app", proxy.port)
    late_reminder = Reminder("late-app", 0)
    try:
        for name, port in ports.items():
            config = write_config(tmp_path / f"{name}.yaml", relay_config(name, port, queue, sink))
            relays[name] = start_process(config, logs[name])
        for port in ports.values():
            wait_for_port(port, timeout=60)
        blue, green = relays[BLUE], relays[GREEN]

        def accepted(by: str, since: float = 0.0) -> int:
            return sum(
                a.outcome == ACCEPTED and a.relay == by and a.at >= since
                for c in clients
                for a in list(c.attempts)
            )

        def alive() -> bool:
            for name, process in relays.items():
                assert process.poll() is None or name == BLUE, logs[name].read_text()[-3000:]
            return True

        # A transaction opened on blue before the switch, to be finished during its drain.
        assert late.start_transaction(late_reminder, f"{late_reminder.key}/1") is None
        assert late.relay == BLUE
        for client in clients:
            client.start()
        wait_until(lambda: alive() and accepted(BLUE) >= 10, "blue to take load")

        proxy.switch(ports[GREEN])
        switched_at = time.monotonic()
        blue_claims = f"%:{blue.pid}:%"

        def claimed_by_blue() -> list[str]:
            query = "SELECT id FROM messages WHERE status = 'processing' AND claimed_by LIKE %s"
            return [row[0] for row in rows(query, blue_claims)]

        wait_until(
            lambda: (
                alive()
                and accepted(GREEN, since=switched_at) >= 2
                and any(c.relay == BLUE for c in clients)
                and bool(claimed_by_blue())
            ),
            "green to take new sessions while blue still has sessions and claims",
        )
        sessions_on_blue = sum(c.relay == BLUE for c in clients)
        claims_at_sigterm = set(claimed_by_blue())
        blue.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()

        # The open transaction: DATA only once blue is draining, and it must be accepted.
        wait_until(lambda: logged(logs[BLUE], "relay.stopping"), "blue to start draining")
        late_attempt = late.finish_transaction(late_reminder, f"{late_reminder.key}/1")
        late.hang_up()
        assert late_attempt.outcome == ACCEPTED, late_attempt
        assert late_attempt.relay == BLUE

        wait_until(lambda: blue.poll() is not None, "blue to exit", timeout=2 * GRACE_S + 10)
        drain_s = time.monotonic() - sigterm_at
        assert blue.returncode == 0, logs[BLUE].read_text()[-3000:]
        assert drain_s < GRACE_S, f"blue took {drain_s:.1f}s to drain, grace {GRACE_S}s"

        blue_exited_at = time.monotonic()
        wait_until(
            lambda: alive() and accepted(GREEN, since=blue_exited_at) >= 10,
            "green to carry the load alone",
        )
        stop_load.set()
        for client in clients:
            client.join(timeout=90)
            assert not client.is_alive(), f"{client.name} did not stop"
            assert client.error is None, f"{client.name}: {client.error!r}"

        # Everything accepted is delivered by green now, whoever accepted or claimed it.
        def settled() -> bool:
            counts = dict(rows("SELECT status, COUNT(*) FROM messages GROUP BY status"))
            return alive() and set(counts) == {"sent"}

        wait_until(settled, "the queue to be delivered", timeout=120)
        queue_ids = [row[0] for row in rows("SELECT id FROM messages")]
        green.send_signal(signal.SIGTERM)
        assert green.wait(timeout=2 * GRACE_S + 10) == 0, logs[GREEN].read_text()[-3000:]
    finally:
        stop_load.set()
        late.hang_up(polite=False)
        for process in relays.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        proxy.stop()
        db.close()
        deliveries = [Delivery.read(path.read_bytes()) for path in sink.directory.iterdir()]
        sink.stop()

    attempts = [a for c in clients for a in c.attempts] + [late_attempt]
    by_tag = {a.tag: a for a in attempts}
    assert len(by_tag) == len(attempts), "attempt tags are unique"
    copies = Counter(d.attempt for d in deliveries)
    accepted_tags = {a.tag for a in attempts if a.outcome == ACCEPTED}
    uncertain_tags = {a.tag for a in attempts if a.outcome == UNCERTAIN}
    outcomes = Counter(a.outcome for a in attempts)
    report = (
        f"attempts {dict(outcomes)}; deliveries {len(deliveries)}; "
        f"sessions on blue at SIGTERM {sessions_on_blue}; claims {len(claims_at_sigterm)}; "
        f"blue drained in {drain_s:.1f}s"
    )

    lost = sorted(tag for tag in accepted_tags if copies[tag] == 0)
    assert not lost, f"answered 250 but never delivered: {lost}; {report}"
    twice = sorted(tag for tag, n in copies.items() if n > 1)
    assert not twice, f"delivered more than once: {twice}; {report}"
    unexplained = sorted(set(copies) - accepted_tags - uncertain_tags)
    assert not unexplained, f"delivered but refused to the client: {unexplained}; {report}"
    for delivery in deliveries:
        attempt = by_tag[delivery.attempt]
        assert delivery.message_id == attempt.message_id
        if attempt.outcome == ACCEPTED:
            # The copy is the one the 250 promised: same relay, same queue entry.
            assert (delivery.ingested_by, delivery.queue_id) == (attempt.relay, attempt.queue_id)
    # Every reminder offered was in the end accepted, once: a client stops at the first 250.
    reminders = {a.message_id for a in attempts}
    accepted_reminders = Counter(a.message_id for a in attempts if a.outcome == ACCEPTED)
    assert set(accepted_reminders) == reminders and set(accepted_reminders.values()) == {1}
    # And the queue agrees: each of its entries left exactly once.
    assert sorted(d.queue_id for d in deliveries) == sorted(queue_ids), report

    # Both versions took traffic and delivered mail; only the draining one turned any away.
    assert {d.ingested_by for d in deliveries} == {BLUE, GREEN}, report
    assert {d.delivered_by for d in deliveries} == {BLUE, GREEN}, report
    assert proxy.opened[ports[BLUE]] and proxy.opened[ports[GREEN]]
    turned_away = [a for a in attempts if a.outcome != ACCEPTED]
    assert all(a.relay in (BLUE, "") for a in turned_away), turned_away
    assert all("4.3.2" in a.reply for a in turned_away if a.relay == ""), turned_away
    # Sessions still on blue were told to go (421 4.3.2, or the connection closed) and
    # their retries, new connections, landed on green.
    assert any(a.relay == BLUE for a in turned_away), report
    accepted_by = {a.message_id: a.relay for a in attempts if a.outcome == ACCEPTED}
    assert {accepted_by[a.message_id] for a in turned_away} == {GREEN}, turned_away

    # The drain was real: blue had sessions and claimed deliveries when told to stop, and
    # finished deliveries it had claimed before the signal after it.
    assert sessions_on_blue >= 1 and claims_at_sigterm, report
    blue_events = events(logs[BLUE])
    stopping = next(n for n, e in enumerate(blue_events) if e["event"] == "relay.stopping")
    finished_in_drain = {
        e["message_id"]
        for e in blue_events[stopping:]
        if e["event"] == "delivery.attempt" and e["outcome"] == "sent"
    }
    assert finished_in_drain & claims_at_sigterm, report
    assert blue_events[-1]["event"] == "relay.stopped"
    for log in logs.values():
        assert not [e for e in events(log) if e["level"] in ("error", "critical")], log
