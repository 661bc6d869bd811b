"""Delivery end to end: SMTP in, queue, workers, out to a real smarthost (smtp-sink) or outbox."""

from __future__ import annotations

import asyncio
import json
import smtplib
from datetime import timedelta
from pathlib import Path
from typing import Any

from relay.clock import utcnow
from relay.ids import new_queue_id
from relay.queue import NewMessage
from relay.queue.sql import PRELOAD_MAX_BYTES
from relay.service import RelayService
from tests.conftest import StartRelay
from tests.servers import SmtpSink, free_port


def smarthost(sink_port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "smtp", "host": "127.0.0.1", "port": sink_port, "tls": "none", **extra}


async def submit(port: int, sender: str, recipients: list[str], body: bytes) -> str:
    def run() -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("app.example")
            client.mail(sender)
            for rcpt in recipients:
                client.rcpt(rcpt)
            code, reply = client.data(body)
            assert code == 250, reply
            return reply.decode().rsplit(" ", 1)[1]

    return await asyncio.to_thread(run)


def plain_message() -> NewMessage:
    """A one-line message to one recipient, queued as another replica would have."""
    return NewMessage(
        id=new_queue_id(),
        workspace_id="default",
        from_email="a@example.org",
        recipients=("b@example.net",),
        subject=None,
        content=b"\r\nx\r\n",
        queued_at=utcnow(),
    )


async def wait_for_status(
    service: RelayService, queue_id: str, statuses: set[str], timeout: float = 20
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await service.store.message_status(queue_id)
        if found is not None and found["status"] in statuses:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{queue_id} still {found and found['status']}")
        await asyncio.sleep(0.05)


async def test_mail_reaches_the_smarthost_and_the_outcome_is_recorded(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    service = await start_relay(
        providers={"smarthost": smarthost(smtp_sink.port)},
        delivery={"providers": ["smarthost"], "process_interval": "10s"},
    )
    body = b"From: clinic@example.org\r\nSubject: Results\r\n\r\nYour results are ready.\r\n"
    queue_id = await submit(
        service.smtp_port, "clinic@example.org", ["p1@example.net", "p2@example.net"], body
    )
    # Woken by ingest, not by the 10 s poll.
    found = await wait_for_status(service, queue_id, {"sent"}, timeout=5)

    assert {r["delivery_status"] for r in found["recipients"]} == {"SENT"}
    assert {r["provider"] for r in found["recipients"]} == {"smarthost"}
    # smtp-sink's "250 2.0.0 Ok" names no queue id (a relay's "queued as" does).
    assert [r["provider_message_id"] for r in found["recipients"]] == [None, None]
    [dumped] = smtp_sink.messages()
    assert dumped.mail_from == "clinic@example.org"
    assert dumped.rcpt_tos == ["p1@example.net", "p2@example.net"]
    stored = await service.store.load_content(queue_id)
    assert dumped.content == stored.replace(b"\r\n", b"\n")


async def test_a_message_too_large_to_come_with_its_claim_is_delivered_whole(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    service = await start_relay(
        providers={"smarthost": smarthost(smtp_sink.port)},
        delivery={"providers": ["smarthost"]},
    )
    line = b"A line of a long report, well under 998 octets as RFC 5322 wants.\r\n"
    body = b"From: clinic@example.org\r\nSubject: Report\r\n\r\n" + line * 5000
    assert len(body) > PRELOAD_MAX_BYTES
    queue_id = await submit(service.smtp_port, "clinic@example.org", ["p1@example.net"], body)

    await wait_for_status(service, queue_id, {"sent"})
    [dumped] = smtp_sink.messages()
    stored = await service.store.load_content(queue_id)
    assert dumped.content == stored.replace(b"\r\n", b"\n")
    assert stored.endswith(line * 5000)


async def test_transient_refusal_is_retried_with_backoff(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    # smtp-sink answering every RCPT with a 4xx: the message must stay queued for retry.
    sink = SmtpSink.start("-r", "RCPT")
    try:
        service = await start_relay(
            providers={"smarthost": smarthost(sink.port)},
            delivery={"providers": ["smarthost"], "min_backoff": "30s", "max_backoff": "1h"},
        )
        queue_id = await submit(
            service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            found = await service.store.message_status(queue_id)
            assert found is not None
            if found["retry_count"] >= 1 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert found["status"] == "queued"
        assert found["retry_count"] == 1
        [recipient] = found["recipients"]
        assert recipient["delivery_status"] == "DEFERRED"
        assert recipient["error"].startswith("4")
        delay = found["next_attempt_at"] - found["processed_at"]
        assert timedelta(seconds=15) <= delay <= timedelta(seconds=30)
    finally:
        sink.stop()


async def test_permanent_refusal_fails_at_once_with_the_reason(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    sink = SmtpSink.start("-f", "RCPT")
    try:
        service = await start_relay(
            providers={"smarthost": smarthost(sink.port)},
            delivery={"providers": ["smarthost"]},
        )
        queue_id = await submit(
            service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
        )
        found = await wait_for_status(service, queue_id, {"failed"})
        assert found["retry_count"] == 0
        [recipient] = found["recipients"]
        assert recipient["delivery_status"] == "FAILED"
        assert recipient["error"].startswith("5")
        assert found["error"].startswith("1 recipient(s) failed: 5")
    finally:
        sink.stop()


async def test_unreachable_smarthost_keeps_mail_queued(start_relay: StartRelay) -> None:
    service = await start_relay(
        providers={"smarthost": smarthost(free_port(), timeout="2s")},
        delivery={"providers": ["smarthost"], "min_backoff": "30s", "max_backoff": "1h"},
    )
    queue_id = await submit(
        service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while (found := await service.store.message_status(queue_id)) and found["retry_count"] == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert found["status"] == "queued"
    assert "cannot connect" in found["error"]
    assert found["recipients"][0]["delivery_status"] == "DEFERRED"


async def test_next_provider_takes_over_when_the_first_is_down(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    service = await start_relay(
        providers={
            "smarthost": smarthost(free_port(), timeout="2s"),
            "outbox": {"type": "outbox", "directory": str(tmp_path / "outbox")},
        },
        delivery={"providers": ["smarthost", "outbox"]},
    )
    queue_id = await submit(
        service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
    )
    found = await wait_for_status(service, queue_id, {"sent"})
    assert found["recipients"][0]["provider"] == "outbox"
    assert (tmp_path / "outbox" / f"{queue_id}.eml").exists()
    envelope = json.loads((tmp_path / "outbox" / f"{queue_id}.json").read_text())
    assert envelope["rcpt_tos"] == ["b@example.net"]


async def test_a_dead_workers_claim_is_delivered_after_its_lease(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    service = await start_relay(delivery={"lease": "1s", "process_interval": "0.2s"})
    await service.engine.stop()
    message = NewMessage(
        id=new_queue_id(),
        workspace_id="default",
        from_email="a@example.org",
        recipients=("b@example.net",),
        subject="x",
        content=b"Subject: x\r\n\r\nx\r\n",
        queued_at=utcnow(),
    )
    await service.store.enqueue(message)
    # A worker that claims and then dies without completing or releasing.
    [claimed] = await service.store.claim(
        worker_id="dead-worker", limit=1, lease=timedelta(seconds=1), now=utcnow()
    )
    assert claimed.id == message.id

    from relay.delivery.engine import DeliveryEngine

    engine = DeliveryEngine(service.store, service.router, service.settings.delivery)
    await engine.start()
    try:
        found = await wait_for_status(service, message.id, {"sent"}, timeout=15)
    finally:
        await engine.stop()
    assert found["recipients"][0]["delivery_status"] == "SENT"
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1


async def test_shutdown_releases_claims_it_did_not_start(start_relay: StartRelay) -> None:
    service = await start_relay(
        providers={"smarthost": smarthost(free_port(), timeout="2s")},
        delivery={"providers": ["smarthost"], "process_interval": "1h", "worker_count": 1},
    )
    await service.engine.stop()
    for _ in range(5):
        await service.store.enqueue(plain_message())
    from relay.delivery.engine import DeliveryEngine

    engine = DeliveryEngine(service.store, service.router, service.settings.delivery)
    await engine.start()
    await asyncio.sleep(0.3)
    await engine.stop()
    stats = await service.store.stats(now=utcnow())
    assert stats.counts.get("processing", 0) == 0
    assert stats.counts["queued"] == 5


async def test_smarthost_starttls_and_auth_against_a_tls_peer(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """Relay A hands mail to relay B, which demands STARTTLS then AUTH (a real TLS peer)."""
    import trustme

    from relay.ingest.policy import hash_password

    ca = trustme.CA()
    cert = ca.issue_cert("smarthost.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "b.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "b.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "smarthost-password").write_text("relay-a-secret-password\n")

    smarthost_b = await start_relay(
        smtp={
            "port": 0,
            "hostname": "smarthost.test",
            "trusted_networks": [],
            "tls": {"cert_file": str(tmp_path / "b.pem"), "key_file": str(tmp_path / "b.key")},
        },
        queue={"backend": "sqlite", "sqlite": {"path": str(tmp_path / "b.db")}},
        providers={"outbox": {"type": "outbox", "directory": str(tmp_path / "b-outbox")}},
        workspaces={
            "relay-a": {
                "users": {"relay-a": {"password_hash": hash_password("relay-a-secret-password")}}
            }
        },
        delivery={"providers": ["outbox"]},
    )
    relay_a = await start_relay(
        providers={
            "b": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": smarthost_b.smtp_port,
                "tls": "starttls",
                "ca_file": str(tmp_path / "ca.pem"),
                "username": "relay-a",
                "password_file": str(tmp_path / "smarthost-password"),
            }
        },
        delivery={"providers": ["b"]},
    )
    queue_id = await submit(
        relay_a.smtp_port, "a@example.org", ["b@example.net"], b"Subject: via b\r\n\r\nx\r\n"
    )
    found = await wait_for_status(relay_a, queue_id, {"sent"})
    b_id = found["recipients"][0]["provider_message_id"]
    # A's "sent" is B's 250 (queued); B's own workers write the outbox file after that.
    await wait_for_status(smarthost_b, b_id, {"sent"})
    delivered = (tmp_path / "b-outbox" / f"{b_id}.eml").read_bytes()
    assert b"with ESMTPSA id" in delivered, "B saw TLS and AUTH"
    assert f"id {queue_id}".encode() in delivered, "A's trace header travelled with it"


async def test_required_starttls_is_never_downgraded(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    # smtp-sink offers no STARTTLS: with tls=starttls (the default) nothing may be sent.
    service = await start_relay(
        providers={"smarthost": {"type": "smtp", "host": "127.0.0.1", "port": smtp_sink.port}},
        delivery={"providers": ["smarthost"], "min_backoff": "1h", "max_backoff": "2h"},
    )
    queue_id = await submit(
        service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while (found := await service.store.message_status(queue_id)) and found["retry_count"] == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert found["status"] == "queued"
    assert "STARTTLS" in found["error"] or "starttls" in found["error"].lower()
    assert smtp_sink.messages() == []


async def test_delivery_uses_verp_and_learns_from_permanent_refusals(
    start_relay: StartRelay,
) -> None:
    """The smarthost answers "user unknown" to every RCPT: each counts as a hard bounce."""
    sink = SmtpSink.start("-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: User unknown")
    try:
        service = await start_relay(
            providers={"smarthost": smarthost(sink.port)},
            delivery={"providers": ["smarthost"]},
            bounces={"verp_domain": "bounces.relay.test", "verp_key": "verp-key-" + "k" * 16},
        )
        for _ in range(3):
            queue_id = await submit(
                service.smtp_port,
                "clinic@example.org",
                ["gone@example.net"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            await wait_for_status(service, queue_id, {"failed"})

        def refused() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
                client.ehlo("app")
                client.mail("clinic@example.org")
                return client.rcpt("gone@example.net")

        code, text = await asyncio.to_thread(refused)
        assert (code, text) == (550, b"5.1.1 Recipient suppressed after repeated hard bounces")
    finally:
        sink.stop()


async def test_the_return_path_is_a_verp_address(
    start_relay: StartRelay, smtp_sink: SmtpSink
) -> None:
    service = await start_relay(
        providers={"smarthost": smarthost(smtp_sink.port)},
        delivery={"providers": ["smarthost"]},
        bounces={"verp_domain": "bounces.relay.test", "verp_key": "verp-key-" + "k" * 16},
    )
    queue_id = await submit(
        service.smtp_port, "clinic@example.org", ["p@example.net"], b"Subject: x\r\n\r\nx\r\n"
    )
    await wait_for_status(service, queue_id, {"sent"})
    [dumped] = smtp_sink.messages()
    assert dumped.mail_from.endswith("@bounces.relay.test")
    assert queue_id.lower() in dumped.mail_from.lower()
    assert service.handler.bounces.verp is not None
    assert service.handler.bounces.verp.owns(dumped.mail_from)


async def test_outcomes_of_deliveries_finishing_together_share_commits(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    service = await start_relay(delivery={"worker_count": 10, "process_interval": "10s"})
    groups: list[int] = []
    complete_many = service.store.complete_many

    async def counted(*, worker_id: str, outcomes: Any) -> list[bool]:
        groups.append(len(outcomes))
        return await complete_many(worker_id=worker_id, outcomes=outcomes)

    service.store.complete_many = counted  # type: ignore[method-assign]
    ids = []
    for n in range(30):
        message = NewMessage(
            id=new_queue_id(),
            workspace_id="default",
            from_email="a@example.org",
            recipients=(f"p{n}@example.net",),
            subject="x",
            content=b"Subject: x\r\n\r\nx\r\n",
            queued_at=utcnow(),
        )
        await service.store.enqueue(message)
        ids.append(message.id)
    service.engine.wake()

    for queue_id in ids:
        found = await wait_for_status(service, queue_id, {"sent"})
        assert [(r["delivery_status"], r["attempts"]) for r in found["recipients"]] == [("SENT", 1)]
    # Every outcome committed once, and not each on its own.
    assert sum(groups) == 30
    assert max(groups) > 1
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 30


async def test_shutdown_commits_the_outcomes_still_waiting_for_their_group(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """Workers cut off by the grace period while their outcomes wait for a slow commit:
    the mail has left, so stop must record it as sent, not hand it back to be sent again."""
    service = await start_relay(
        delivery={"worker_count": 5, "process_interval": "10s", "shutdown_grace": "0.1s"}
    )
    complete_many = service.store.complete_many

    async def slow(*, worker_id: str, outcomes: Any) -> list[bool]:
        await asyncio.sleep(0.5)
        return await complete_many(worker_id=worker_id, outcomes=outcomes)

    service.store.complete_many = slow  # type: ignore[method-assign]
    ids = []
    for _ in range(5):
        message = NewMessage(
            id=new_queue_id(),
            workspace_id="default",
            from_email="a@example.org",
            recipients=("b@example.net",),
            subject="x",
            content=b"Subject: x\r\n\r\nx\r\n",
            queued_at=utcnow(),
        )
        await service.store.enqueue(message)
        ids.append(message.id)
    service.engine.wake()
    deadline = asyncio.get_running_loop().time() + 10
    while len(list((tmp_path / "outbox").glob("*.eml"))) < 5:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)

    await service.engine.stop()

    for queue_id in ids:
        found = await service.store.message_status(queue_id)
        assert found is not None and found["status"] == "sent"


async def test_a_send_that_outlasts_the_attempt_timeout_is_cut_off(
    start_relay: StartRelay,
) -> None:
    """A smarthost that accepts the connection and never greets: the provider would wait
    its own 30 s; delivery.attempt_timeout ends the attempt first and the mail stays queued."""
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        service = await start_relay(
            providers={"smarthost": smarthost(port, timeout="30s")},
            delivery={"providers": ["smarthost"], "attempt_timeout": "1s"},
        )
        queue_id = await submit(
            service.smtp_port, "a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while (found := await service.store.message_status(queue_id)) and not found["error"]:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert found["status"] == "queued"
        assert found["error"].endswith("smarthost: no answer within 1s")
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_shutdown_during_a_claim_hands_back_what_the_claim_took(
    start_relay: StartRelay,
) -> None:
    """SIGTERM while the database answers a claim: its messages are released, not stranded.

    The claim runs against the real queue; only its answer reaches the engine late, as it
    does from a busy MySQL server, so that stop() arrives after the lease was written.
    """
    service = await start_relay(delivery={"process_interval": "1h", "worker_count": 1})
    await service.engine.stop()
    for _ in range(3):
        await service.store.enqueue(plain_message())
    from relay.delivery.engine import DeliveryEngine

    claimed = asyncio.Event()
    real_claim = service.store.claim

    async def slow_answer(**arguments: Any) -> Any:
        rows = await real_claim(**arguments)
        if rows:
            claimed.set()
            await asyncio.sleep(0.5)
        return rows

    engine = DeliveryEngine(service.store, service.router, service.settings.delivery)
    engine.store = _StoreWithClaim(service.store, slow_answer)  # type: ignore[assignment]
    await engine.start()
    await asyncio.wait_for(claimed.wait(), 10)
    await engine.stop()

    stats = await service.store.stats(now=utcnow())
    assert stats.counts.get("processing", 0) == 0, stats.counts
    assert stats.counts.get("queued", 0) + stats.counts.get("sent", 0) == 3


class _StoreWithClaim:
    """The real store, with claim answers passed through `claim`."""

    def __init__(self, store: Any, claim: Any) -> None:
        self._store = store
        self.claim = claim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
