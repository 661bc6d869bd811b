"""Priority routing, failover and circuit breakers.

Unit tests drive the breaker on a fake clock; the end-to-end tests run a relay whose
primary is a Mailgun provider talking to a local server that follows Mailgun's contract,
and whose backup is an SMTP smarthost (Postfix's smtp-sink).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relay.clock import utcnow
from relay.config import BreakerSettings
from relay.delivery.providers.base import ProviderError
from relay.delivery.routing import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from relay.service import RelayService
from tests.conftest import StartRelay
from tests.local_http import LocalApi, Reply, start_api
from tests.servers import SmtpSink, free_port
from tests.test_provider_mailgun import API_KEY, DOMAIN, FakeMailgun


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**settings: Any) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerSettings(**settings), clock=clock), clock


def down(
    kind: str = "unavailable", transient: bool = True, retry_after: float | None = None
) -> ProviderError:
    return ProviderError("primary: 503", kind=kind, transient=transient, retry_after=retry_after)


def test_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    circuit, clock = breaker(failure_threshold=3, cooldown="30s")
    for _ in range(2):
        circuit.failure(down())
        assert circuit.allow()
    circuit.failure(down())
    assert circuit.state == OPEN and not circuit.allow()

    clock.now += 30
    assert circuit.allow(), "one probe after the cool-down"
    assert circuit.state == HALF_OPEN
    assert not circuit.allow(), "only one probe at a time"
    circuit.success()
    assert circuit.state == CLOSED and circuit.allow()


def test_a_failed_probe_doubles_the_wait() -> None:
    circuit, clock = breaker(failure_threshold=1, cooldown="10s")
    circuit.failure(down())
    clock.now += 10
    assert circuit.allow()
    circuit.failure(down())
    assert circuit.state == OPEN
    clock.now += 10
    assert not circuit.allow()
    clock.now += 10
    assert circuit.allow()


def test_error_rate_over_the_window_opens_it() -> None:
    circuit, _ = breaker(failure_threshold=100, error_rate=0.5, window=4)
    circuit.success()
    circuit.failure(down())
    circuit.success()
    assert circuit.state == CLOSED
    circuit.failure(down())
    assert circuit.state == OPEN


def test_throttling_waits_for_the_providers_retry_time() -> None:
    circuit, clock = breaker(cooldown="30s")
    circuit.failure(down(kind="rate_limited", retry_after=120))
    assert circuit.state == OPEN
    clock.now += 119
    assert not circuit.allow()
    clock.now += 1
    assert circuit.allow()


def test_rejected_credentials_open_it_for_the_fatal_cooldown() -> None:
    circuit, clock = breaker(fatal_cooldown="5m")
    circuit.failure(down(kind="credentials", transient=False))
    assert circuit.state == OPEN and circuit.last_error_kind == "credentials"
    clock.now += 299
    assert not circuit.allow()


# End to end


@pytest.fixture
def api() -> Iterator[LocalApi]:
    server = start_api()
    yield server
    server.stop()


@pytest.fixture
def mailgun(api: LocalApi) -> FakeMailgun:
    return FakeMailgun(api)


def routed(api: LocalApi, sink_port: int, **breaker: Any) -> dict[str, Any]:
    return {
        "providers": {
            "mailgun": {
                "type": "mailgun",
                "domain": DOMAIN,
                "api_key": API_KEY,
                "base_url": api.url,
                "timeout": "1s",
            },
            "smarthost": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": sink_port,
                "tls": "none",
                "timeout": "2s",
            },
        },
        "delivery": {
            "providers": ["mailgun", "smarthost"],
            "breaker": {"failure_threshold": 2, "cooldown": "1s", **breaker},
            "min_backoff": "1s",
            "max_backoff": "2s",
        },
    }


async def send(service: RelayService, n: int = 1) -> list[str]:
    def run() -> list[str]:
        ids = []
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
            for i in range(n):
                client.ehlo("app")
                client.mail("clinic@example.org")
                client.rcpt(f"p{i}@example.net")
                code, reply = client.data(
                    f"From: clinic@example.org\r\nTo: p{i}@example.net\r\n"
                    f"Subject: {i}\r\n\r\nx\r\n".encode()
                )
                assert code == 250
                ids.append(reply.decode().rsplit(" ", 1)[1])
        return ids

    return await asyncio.to_thread(run)


async def settle(service: RelayService, ids: list[str], status: str = "sent") -> list[dict]:
    deadline = time.monotonic() + 20
    while True:
        found = [await service.store.message_status(i) for i in ids]
        if all(f and f["status"] == status for f in found):
            return found  # type: ignore[return-value]
        assert time.monotonic() < deadline, [f and f["status"] for f in found]
        await asyncio.sleep(0.05)


def health(service: RelayService, name: str) -> dict[str, Any]:
    return next(h for h in service.router.health() if h["provider"] == name)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_primary_503_fails_over_then_recovers(
    start_relay: StartRelay,
    api: LocalApi,
    mailgun: FakeMailgun,
    smtp_sink: SmtpSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.routing")
    mailgun.replies = [Reply(503, body=b"Service Unavailable")] * 2
    service = await start_relay(**routed(api, smtp_sink.port))

    first = await settle(service, await send(service, 2))
    assert {r["recipients"][0]["provider"] for r in first} == {"smarthost"}
    assert len(smtp_sink.messages()) == 2
    assert health(service, "mailgun")["state"] == OPEN
    assert not health(service, "mailgun")["healthy"]

    # While open, the primary is not even asked.
    asked = len(api.to(f"/v3/{DOMAIN}/messages.mime"))
    await settle(service, await send(service))
    assert len(api.to(f"/v3/{DOMAIN}/messages.mime")) == asked

    # After the cool-down one probe goes to the primary; it succeeds and the circuit closes.
    await asyncio.sleep(1.1)
    again = await settle(service, await send(service))
    assert again[0]["recipients"][0]["provider"] == "mailgun"
    assert health(service, "mailgun")["state"] == CLOSED
    # On-call sees both changes in the logs, once each, with the kind but not the reply.
    changes = [r for r in caplog.records if r.getMessage().startswith("provider.circuit_")]
    assert [(r.getMessage(), r.provider) for r in changes] == [  # type: ignore[attr-defined]
        ("provider.circuit_opened", "mailgun"),
        ("provider.circuit_closed", "mailgun"),
    ]
    assert changes[0].kind == "unavailable"  # type: ignore[attr-defined]
    assert "Service Unavailable" not in str(vars(changes[0]))
    # Every attempt carried the queue id, so Mailgun's events can be matched to it.
    sent = mailgun.queued[-1].multipart()
    ids = [p.data.decode() for p in sent if p.name == "v:relay-message-id"]
    assert ids == [again[0]["id"]]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_primary_timing_out_fails_over(
    start_relay: StartRelay, api: LocalApi, mailgun: FakeMailgun, smtp_sink: SmtpSink
) -> None:
    def slow(request: Any) -> Reply:
        time.sleep(2.5)
        return Reply(json={"id": "<late>", "message": "Queued. Thank you."})

    api.route("POST", f"/v3/{DOMAIN}/messages.mime", slow)
    service = await start_relay(**routed(api, smtp_sink.port))
    [found] = await settle(service, await send(service))
    assert found["recipients"][0]["provider"] == "smarthost"
    assert "mailgun" in (health(service, "mailgun")["last_error"] or "")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_rejected_credentials_fail_over_and_need_attention(
    start_relay: StartRelay, api: LocalApi, mailgun: FakeMailgun, smtp_sink: SmtpSink
) -> None:
    mailgun.keys = {"key-someone-else"}
    service = await start_relay(**routed(api, smtp_sink.port))
    [found] = await settle(service, await send(service))
    assert found["recipients"][0]["provider"] == "smarthost"
    state = health(service, "mailgun")
    assert state["state"] == OPEN and state["needs_attention"]
    assert state["last_error_kind"] == "credentials"
    assert API_KEY not in repr(service.router.health())


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_both_down_keeps_mail_queued_and_health_says_so(
    start_relay: StartRelay, api: LocalApi, mailgun: FakeMailgun
) -> None:
    mailgun.replies = [Reply(503, body=b"down")] * 100
    service = await start_relay(**routed(api, free_port()))
    ids = await send(service, 3)
    deadline = time.monotonic() + 20
    while True:
        found = [await service.store.message_status(i) for i in ids]
        if all(f and f["retry_count"] >= 1 for f in found):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for message in found:
        assert message is not None
        assert message["status"] == "queued"
        assert message["recipients"][0]["delivery_status"] == "DEFERRED"
    assert not health(service, "mailgun")["healthy"]
    assert not health(service, "smarthost")["healthy"]
    stats = await service.store.stats(now=utcnow())
    assert stats.counts.get("failed", 0) == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_workspace_provider_order_is_honoured(
    start_relay: StartRelay, api: LocalApi, mailgun: FakeMailgun, smtp_sink: SmtpSink
) -> None:
    config = routed(api, smtp_sink.port)
    service = await start_relay(
        **config, workspaces={"default": {"providers": ["smarthost", "mailgun"]}}
    )
    [found] = await settle(service, await send(service))
    assert found["recipients"][0]["provider"] == "smarthost"
    assert mailgun.queued == []


async def test_provider_limits_bound_concurrency(
    start_relay: StartRelay, api: LocalApi, mailgun: FakeMailgun
) -> None:
    in_flight = 0
    peak = 0

    def counting(request: Any) -> Reply:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        time.sleep(0.1)
        in_flight -= 1
        return mailgun.messages_mime(request)

    api.route("POST", f"/v3/{DOMAIN}/messages.mime", counting)
    config = routed(api, free_port())
    config["delivery"]["providers"] = ["mailgun"]
    config["delivery"]["provider_limits"] = {"mailgun": {"max_concurrency": 2}}
    service = await start_relay(**config)
    await settle(service, await send(service, 8))
    assert peak == 2


def test_providers_validate_checks_credentials_without_sending(
    api: LocalApi, mailgun: FakeMailgun, smtp_sink: SmtpSink, tmp_path: Any
) -> None:
    import json
    import os
    import subprocess
    import sys

    import yaml

    config = routed(api, smtp_sink.port)
    path = tmp_path / "relay.yaml"
    path.write_text(
        yaml.safe_dump(
            {"providers": config["providers"], "delivery": {"providers": ["mailgun", "smarthost"]}}
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "--config",
                str(path),
                "providers",
                "validate",
                "--json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    good = validate()
    assert good.returncode == 0, good.stderr
    assert {e["provider"]: e["ok"] for e in json.loads(good.stdout)} == {
        "mailgun": True,
        "smarthost": True,
    }
    assert mailgun.queued == [] and smtp_sink.messages() == []

    mailgun.keys = {"key-rotated-elsewhere"}
    bad = validate()
    assert bad.returncode == 1
    report = {e["provider"]: e for e in json.loads(bad.stdout)}
    assert report["mailgun"]["kind"] == "credentials" and report["smarthost"]["ok"]
    assert API_KEY not in bad.stdout + bad.stderr


def test_provider_rate_is_paced_by_reservation() -> None:
    from relay.limits import TokenBucket

    bucket = TokenBucket(capacity=2, refill_per_s=2, tokens=2, updated=0.0)
    waits = [bucket.reserve(now=0.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 0.5, 1.0, 1.5]
