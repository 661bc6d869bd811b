"""Health, metrics and the authenticated admin API, against a running relay."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from relay import metrics
from relay.clock import utcnow
from relay.service import RelayService
from tests.conftest import StartRelay
from tests.servers import free_port, wait_for_port
from tests.test_delivery import plain_message

TOKEN = "oncall-token-" + "x" * 24
TOKENS = [{"name": "oncall", "token": TOKEN}]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MONITORING = Path(__file__).parent.parent / "monitoring"


def http(service: RelayService) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}", timeout=10)


async def submit(service: RelayService, n: int = 1, sender: str = "a@example.org") -> list[str]:
    def run() -> list[str]:
        ids = []
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
            for i in range(n):
                client.ehlo("app")
                code, _ = client.mail(sender)
                if code != 250:
                    client.rset()
                    continue
                client.rcpt(f"p{i}@example.net")
                code, reply = client.data(b"Subject: x\r\n\r\nx\r\n")
                if code == 250:
                    ids.append(reply.decode().rsplit(" ", 1)[1])
        return ids

    return await asyncio.to_thread(run)


async def until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_health_follows_the_runbook_structure(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    service = await start_relay(
        providers={
            "primary": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": free_port(),
                "tls": "none",
                "timeout": "1s",
            },
            "outbox": {"type": "outbox", "directory": str(tmp_path / "outbox")},
        },
        delivery={"providers": ["primary", "outbox"], "breaker": {"failure_threshold": 1}},
        http={"port": 0, "admin_tokens": TOKENS},
    )
    async with http(service) as client:
        body = (await client.get("/health")).json()
        assert body["status"] == "healthy" and body["version"]
        assert set(body["checks"]) == {"database", "primary", "outbox", "queue"}
        assert body["checks"]["queue"] == {"status": "healthy", "message": "Queue depth: 0"}

        # The primary fails: the message goes out through the backup; health degrades.
        await submit(service)
        await until(lambda: _is_sent(service))
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json()["status"] == "degraded"
        assert response.json()["checks"]["primary"]["status"] == "unhealthy"


async def _is_sent(service: RelayService) -> bool:
    return (await service.store.stats(now=utcnow())).counts.get("sent", 0) >= 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_backup_down_does_not_degrade(start_relay: StartRelay, tmp_path: Path) -> None:
    service = await start_relay(
        providers={
            "outbox": {"type": "outbox", "directory": str(tmp_path / "o")},
            "backup": {"type": "smtp", "host": "127.0.0.1", "port": free_port(), "tls": "none"},
        },
        delivery={"providers": ["outbox", "backup"]},
    )
    service.router.routes["backup"].breaker.state = "open"
    service.router.routes["backup"].breaker.opened_until = time.monotonic() + 60
    async with http(service) as client:
        body = (await client.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["checks"]["backup"]["status"] == "unhealthy"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_every_admin_endpoint_refuses_and_audits_missing_or_wrong_tokens(
    start_relay: StartRelay,
) -> None:
    service = await start_relay(http={"port": 0, "admin_tokens": TOKENS})
    async with http(service) as client:
        schema = (await client.get("/openapi.json")).json()
        admin_calls = [
            (method.upper(), path.replace("{provider}", "outbox").replace("{message_id}", "X"))
            for path, methods in schema["paths"].items()
            for method in methods
            if path.startswith("/api") or path == "/validate"
        ]
        assert len(admin_calls) >= 14
        for headers in ({}, {"Authorization": "Bearer wrong-token-" + "y" * 20}):
            for method, path in admin_calls:
                response = await client.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
    entries = await service.store.audit_entries(limit=1000)
    denied = [e for e in entries if e["outcome"] == "denied"]
    assert len(denied) == 2 * len(admin_calls)
    assert {e["ip_address"] for e in denied} == {"127.0.0.1"}
    assert TOKEN not in json.dumps(entries, default=str)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_admin_api_is_disabled_without_tokens(start_relay: StartRelay) -> None:
    service = await start_relay()
    async with http(service) as client:
        response = await client.get("/api/stats", headers=AUTH)
    assert response.status_code == 401
    assert "no http.admin_tokens configured" in response.json()["detail"]


async def test_stats_limits_and_message_lookup(start_relay: StartRelay) -> None:
    service = await start_relay(http={"port": 0, "admin_tokens": TOKENS})
    [queue_id] = await submit(service)
    await until(lambda: _is_sent(service))
    async with http(service) as client:
        stats = (await client.get("/api/stats", headers=AUTH)).json()
        assert stats["counts"] == {"sent": 1}
        assert stats["delivered"] == 1 and stats["delivery_rate"] == 100.0
        assert stats["error_rate"] == 0.0

        found = (await client.get(f"/api/messages/{queue_id}", headers=AUTH)).json()
        assert found["status"] == "sent"
        assert found["recipients"][0]["delivery_status"] == "SENT"
        missing = await client.get("/api/messages/01NOSUCHMESSAGE", headers=AUTH)
        assert missing.status_code == 404

        limits = (await client.get("/api/rate-limit", headers=AUTH)).json()
        assert limits[0]["workspace"] == "default" and limits[0]["rate_limit_burst"] == 100


async def test_rate_limit_override_round_trip_is_audited(start_relay: StartRelay) -> None:
    service = await start_relay(
        http={"port": 0, "admin_tokens": TOKENS},
        workspaces={"default": {"limits": {"workspace_daily": 1}}},
    )
    await service.engine.stop()
    assert len(await submit(service, 2)) == 1
    async with http(service) as client:
        # Runbook 4.7's body, as is.
        response = await client.post(
            "/api/admin/rate-limit",
            headers=AUTH,
            json={"workspace_daily": 10000, "per_user_daily": 1000, "emergency_mode": True},
        )
        assert response.status_code == 200 and response.json()["ok"]
        assert len(await submit(service, 2)) == 2
        limits = (await client.get("/api/rate-limit", headers=AUTH)).json()
        assert limits[0]["workspace_daily"] == 10000 and limits[0]["used_today"] == 3
        assert limits[0]["override_expires_at"] is not None

        cleared = await client.delete("/api/admin/rate-limit", headers=AUTH)
        assert cleared.json()["ok"]
        assert await submit(service, 1) == []
    actions = [(e["action"], e["user_id"]) for e in await service.store.audit_entries()]
    assert ("api POST /api/admin/rate-limit", "oncall") in actions
    assert ("api DELETE /api/admin/rate-limit", "oncall") in actions


async def test_process_requeue_and_cleanup(start_relay: StartRelay) -> None:
    service = await start_relay(
        http={"port": 0, "admin_tokens": TOKENS},
        providers={
            "down": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": free_port(),
                "tls": "none",
                "timeout": "1s",
            }
        },
        delivery={"providers": ["down"], "min_backoff": "1h", "max_backoff": "2h"},
    )
    [queue_id] = await submit(service)

    async def deferred() -> bool:
        found = await service.store.message_status(queue_id)
        return bool(found and found["retry_count"] == 1 and found["status"] == "queued")

    await until(deferred)
    async with http(service) as client:
        # Runbook 4.2 "force reprocess": the deferred message becomes due and is tried again.
        response = await client.post("/api/process", headers=AUTH)
        assert response.json()["count"] == 1

        async def retried() -> bool:
            found = await service.store.message_status(queue_id)
            return bool(found and found["retry_count"] == 2)

        await until(retried)

        stuck = await client.post(
            "/api/admin/requeue-stuck", headers=AUTH, json={"older_than_minutes": 30}
        )
        assert stuck.json() == {"ok": True, "detail": None, "count": 0}

        async with service.store.transaction() as tx:
            await tx.execute(
                "INSERT INTO recipients (workspace_id, email_address, status, bounce_type,"
                " bounce_count, created_at, updated_at) VALUES"
                " ('default', 'gone@example.net', 'BOUNCED', 'HARD', 3, ?, ?),"
                " ('default', 'once@example.net', 'BOUNCED', 'HARD', 1, ?, ?)",
                [service.store.to_db_time(utcnow())] * 4,
            )
        cleanup = await client.post(
            "/api/admin/recipients/cleanup", headers=AUTH, json={"threshold": 3}
        )
        assert cleanup.json()["count"] == 1


async def test_maintenance_mode_refuses_sessions_but_keeps_delivering(
    start_relay: StartRelay,
) -> None:
    service = await start_relay(http={"port": 0, "admin_tokens": TOKENS})
    async with http(service) as client:
        response = await client.post(
            "/api/admin/maintenance",
            headers=AUTH,
            json={"enabled": True, "message": "Scheduled maintenance until 14:00 UTC"},
        )
        assert response.status_code == 200
        assert (await client.get("/readyz")).status_code == 503

        def greeting() -> bytes:
            with __import__("socket").create_connection(
                ("127.0.0.1", service.smtp_port), timeout=5
            ) as sock:
                return sock.recv(200)

        assert await asyncio.to_thread(greeting) == (
            b"421 4.3.2 Scheduled maintenance until 14:00 UTC\r\n"
        )
        # Workers keep delivering what is queued (here: queued by another replica).
        await service.store.enqueue(plain_message())
        service.wake()
        await until(lambda: _is_sent(service))

        await client.post("/api/admin/maintenance", headers=AUTH, json={"enabled": False})
        assert (await client.get("/readyz")).status_code == 200
        assert (await asyncio.to_thread(greeting)).startswith(b"220 ")


async def test_provider_checks(start_relay: StartRelay, tmp_path: Path) -> None:
    service = await start_relay(
        http={"port": 0, "admin_tokens": TOKENS},
        providers={
            "outbox": {"type": "outbox", "directory": str(tmp_path / "o")},
            "down": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": free_port(),
                "tls": "none",
                "timeout": "1s",
            },
        },
    )
    async with http(service) as client:
        ok = await client.post("/api/test/outbox", headers=AUTH, json={"workspace": "default"})
        assert ok.json()["ok"] is True
        bad = await client.post("/api/test/down", headers=AUTH, json={})
        assert bad.json()["ok"] is False and bad.json()["kind"] == "unavailable"
        assert (await client.post("/api/test/nope", headers=AUTH)).status_code == 404
        validate = await client.get("/validate", headers=AUTH)
        assert validate.status_code == 503
        assert {e["provider"]: e["ok"] for e in validate.json()} == {"outbox": True, "down": False}


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    wanted = labels or {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if all(found.get(k) == v for k, v in wanted.items()):
            return float(value)
    return 0.0


async def test_metrics_after_real_traffic_match_what_happened(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    async def scrape(service: RelayService) -> str:
        async with http(service) as client:
            return (await client.get("/metrics")).text

    service = await start_relay(
        providers={
            "flaky": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": free_port(),
                "tls": "none",
                "timeout": "1s",
            },
            "outbox": {"type": "outbox", "directory": str(tmp_path / "o")},
        },
        delivery={"providers": ["flaky", "outbox"], "breaker": {"failure_threshold": 100}},
        workspaces={"metered": {"limits": {"rate_limit_burst": 3, "rate_limit_refill": 0.01}}},
        smtp={"port": 0, "hostname": "relay.test", "workspace": "metered"},
    )
    before = await scrape(service)
    accepted = await submit(service, 5)
    assert len(accepted) == 3  # the bucket held three

    async def all_sent() -> bool:
        return (await service.store.stats(now=utcnow())).counts.get("sent", 0) == 3

    await until(all_sent)
    await service._observe()
    after = await scrape(service)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    assert delta("emails_processed_total", workspace="metered", outcome="sent") == 3
    assert delta("emails_delivered_total", workspace="metered") == 3
    assert delta("provider_requests_total", provider="flaky", status="unavailable") == 3
    assert delta("provider_requests_total", provider="outbox", status="success") == 3
    assert delta("rate_limit_rejections_total", workspace="metered", limit="workspace") == 2
    assert delta("smtp_messages_accepted_total", workspace="metered") == 3
    assert delta("email_processing_duration_seconds_count") == 3
    assert delta("errors_total", type="provider") == 3
    assert sample(after, "email_queue_depth") == 0
    assert sample(after, "rate_limit_burst", {"workspace": "metered"}) == 3
    assert sample(after, "rate_limit_remaining", {"workspace": "metered"}) < 1
    assert sample(after, "provider_health", {"provider": "outbox"}) == 1
    assert "@" not in "".join(line for line in after.splitlines() if not line.startswith("#"))


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes from the Debian package prometheus (.ci/run installs it)"
    for command in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        result = subprocess.run(
            [promtool, *command], cwd=MONITORING, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    exported = {
        collector._name  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if hasattr(collector, "_name")
    }
    names = {f"{n}_total" for n in exported} | {f"{n}_bucket" for n in exported} | exported
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} == {
        "HighQueueDepth",
        "LowDeliveryRate",
        "AllProvidersDown",
        "HighErrorRate",
        "RateLimitExceeded",
    }
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Email Processing Rate",
        "Queue Depth",
        "Provider Success Rate",
        "Processing Latency",
    } <= titles
    keywords = {
        "sum",
        "max",
        "min",
        "by",
        "rate",
        "histogram_quantile",
        "le",
        "status",
        "provider",
        "outcome",
        "workspace",
        "class",
        "success",
    }
    for expr in exprs:
        for word in re.findall(r"[a-z_]+(?=[{\[( )/]|$)", expr):
            if word not in keywords:
                assert word in names, f"{word} in {expr!r} is not exported"


@pytest.mark.slow
def test_the_api_survives_fuzzing_against_its_own_schema(tmp_path: Path) -> None:
    """schemathesis generates requests from /openapi.json; no answer may be a 5xx."""
    st = Path(sys.executable).parent / "st"
    assert st.exists(), "schemathesis is in the test extra"
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "smtp": {"port": smtp_port, "hostname": "relay.test"},
                "http": {"port": http_port, "admin_tokens": TOKENS},
                "queue": {"sqlite": {"path": str(tmp_path / "q.db")}},
                "providers": {"outbox": {"type": "outbox", "directory": str(tmp_path / "o")}},
                "bounces": {"mailgun_webhook_signing_key": "webhook-signing-" + "z" * 20},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--config", str(config), "serve"],
        stdout=(tmp_path / "relay.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_for_port(http_port)
        result = subprocess.run(
            [
                str(st),
                "run",
                f"http://127.0.0.1:{http_port}/openapi.json",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "25",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("mode", ["hashed", "plain"])
async def test_logs_carry_addresses_only_as_configured(
    start_relay: StartRelay, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    from relay.logs import hash_address

    service = await start_relay(log={"addresses": mode})
    with caplog.at_level("INFO"):
        await submit(service, sender="patient.sender@example.org")
    queued = [r for r in caplog.records if r.getMessage() == "smtp.queued"]
    assert queued
    shown = queued[0].sender  # type: ignore[attr-defined]
    if mode == "plain":
        assert shown == "patient.sender@example.org"
    else:
        assert shown == hash_address("patient.sender@example.org")
        assert "patient.sender@example.org" not in caplog.text
    assert "p0@example.net" not in caplog.text


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_replies_written_while_hanging_up_are_counted(start_relay: StartRelay) -> None:
    def replies(text: str) -> float:
        return sample(text, "smtp_replies_total", {"class": "5xx"})

    service = await start_relay()
    async with http(service) as client:
        before = (await client.get("/metrics")).text
        reader, writer = await asyncio.open_connection("127.0.0.1", service.smtp_port)
        await reader.readline()
        writer.write(b"EHLO c\nMAIL FROM:<a@example.org>\r\n")
        assert (await reader.read()).endswith(b"(RFC 5321 section 2.3.8)\r\n")
        writer.close()
        after = (await client.get("/metrics")).text
    assert replies(after) - replies(before) == 1


def test_text_logs_carry_no_terminal_colour_codes() -> None:
    import logging

    from relay.logs import TextFormatter

    record = logging.LogRecord("uvicorn.error", 20, "", 0, "Started server", (), None)
    record.color_message = "Started server [\x1b[36m1\x1b[0m]"
    assert "\x1b" not in TextFormatter().format(record)
