"""Bounces, provider events and the suppression list (runbook 4.3).

Reports are files in tests/data/bounces, written for these tests in the shapes real MTAs
send (RFC 3464 with several recipients, Postfix, Gmail, Office 365, old Exchange prose,
qmail, Exim, a delay warning, an out-of-office reply). Store tests run on SQLite and on
the private MariaDB; the SMTP tests drive a real relay with smtplib; the webhook tests go
through FastAPI with signatures made here under a test key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import smtplib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Header, HTTPException
from prometheus_client import REGISTRY

from relay import cli
from relay.api.bounces import bounce_router
from relay.bounces.classify import classify
from relay.bounces.dsn import parse_report
from relay.bounces.mailgun_events import WebhookRejected, to_bounce_event, verify
from relay.bounces.model import (
    BounceEvent,
    BounceType,
    EventKind,
    MessageBusy,
    OnceKey,
    Source,
    SuppressionReason,
)
from relay.bounces.suppression import BounceProcessor
from relay.bounces.verp import VerpCodec, parse_verp, verp_sender
from relay.clock import utcnow
from relay.config import BounceSettings, Settings
from relay.ids import new_queue_id
from relay.ingest.policy import hash_password
from relay.queue import AttemptResult, MessageStatus, NewMessage, RecipientUpdate, SqlStore
from relay.queue.model import DeliveryStatus
from relay.service import RelayService
from tests.conftest import StartRelay, relay_settings

DATA = Path(__file__).parent / "data" / "bounces"
VERP_KEY = "verp-test-key-0123456789abcdef"
MAILGUN_KEY = "mailgun-signing-key-for-tests-only"
BOUNCES = {
    "verp_domain": "bounce.relay.test",
    "verp_key": VERP_KEY,
    "mailgun_webhook_signing_key": MAILGUN_KEY,
}
SUPPRESSED_REPLY = (550, b"5.1.1 Recipient suppressed after repeated hard bounces")


# Reports: every file, attributed to the right recipient with the right type


# file -> {recipient: (bounce type or None for "not a failure", status, retried later)}
CORPUS: dict[str, dict[str, tuple[BounceType | None, str | None, bool]]] = {
    "rfc3464_multi.eml": {
        "ana.lima@example.net": (BounceType.HARD, "5.1.1", False),
        "ben.okafor@example.net": (BounceType.SOFT, "4.2.2", True),
        "chen.wu@example.net": (None, "4.4.1", False),
        "dara.singh@example.net": (BounceType.HARD, "5.0.0", False),
    },
    "postfix.eml": {
        "eli.novak@example.com": (BounceType.HARD, "5.1.1", False),
        "fay.moreau@clinic-mail.example": (BounceType.HARD, "5.4.4", False),
        "gus.berg@example.com": (BounceType.SOFT, "5.7.1", False),
    },
    "gmail_no_such_user.eml": {"hana.ito@gmail.example": (BounceType.HARD, "5.1.1", False)},
    "gmail_inbox_full.eml": {"ines.costa@gmail.example": (BounceType.SOFT, "4.2.2", True)},
    "office365_not_found.eml": {
        "ivan.petrov@contoso-health.example": (BounceType.HARD, "5.1.10", False)
    },
    "office365_group_restricted.eml": {
        "night-nurses@fabrikam-care.example": (BounceType.SOFT, "5.7.133", False)
    },
    "exchange_legacy.eml": {"jon.reyes@northwind.example": (BounceType.HARD, "5.1.1", False)},
    "qmail.eml": {
        "kim.lee@example.org": (BounceType.HARD, "5.1.1", False),
        "lou.garcia@remote.example": (BounceType.SOFT, "5.2.2", True),
    },
    "exim.eml": {"max.ortiz@example.com": (BounceType.HARD, "5.1.1", False)},
    "postfix_delayed.eml": {"omar.haddad@example.com": (None, "4.4.1", False)},
    "out_of_office.eml": {},
}
# Said in the diagnostics, so bounce_reason tells an operator what happened.
REASON_WORDS = {
    "eli.novak@example.com": "unknown user",
    "hana.ito@gmail.example": "does not exist",
    "ivan.petrov@contoso-health.example": "RecipientNotFound",
    "kim.lee@example.org": "no mailbox here",
    "lou.garcia@remote.example": "quota exceeded",
    "dara.singh@example.net": "mailbox unavailable",
    "gus.berg@example.com": "blocked",
}


def corpus(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_every_corpus_file_has_expectations() -> None:
    assert sorted(p.name for p in DATA.glob("*.eml")) == sorted(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_reports_are_attributed_per_recipient(name: str) -> None:
    expected = CORPUS[name]
    # The relay passes the addresses it sent to; a bystander must not be reported.
    candidates = [*expected, "bystander@example.org"]
    report = parse_report(corpus(name), candidates)

    if not expected:
        assert report.format == "none" and report.failures() == []
        return
    seen = {}
    for entry in report.recipients:
        assert entry.address is not None
        seen[entry.address.lower()] = entry
    assert set(seen) == set(expected)
    for address, (bounce_type, status, retry) in expected.items():
        entry = seen[address]
        assert entry.status == status, address
        if bounce_type is None:
            assert not entry.failed and entry.action == "delayed", address
            continue
        assert entry.verdict is not None, address
        assert entry.verdict.bounce_type is bounce_type, address
        assert entry.verdict.retry is retry, address
        if address in REASON_WORDS:
            assert REASON_WORDS[address].lower() in entry.diagnostic.lower()
        # The address itself is kept out of the reason, so reasons group across patients.
        assert address not in entry.diagnostic.lower()


def test_dsn_formats_are_read_as_reports_and_prose_as_prose() -> None:
    assert parse_report(corpus("office365_not_found.eml")).format == "dsn"
    assert parse_report(corpus("qmail.eml"), ["kim.lee@example.org"]).format == "prose"
    # A multi-line Gmail reply becomes one reason, its "550-5.1.1" prefixes folded.
    [gmail] = parse_report(corpus("gmail_no_such_user.eml")).recipients
    assert gmail.diagnostic.startswith("550 5.1.1 The email account")
    assert "550-5.1.1" not in gmail.diagnostic


def test_global_delivery_status_is_parsed() -> None:
    # RFC 6533: the same fields in a message/global-delivery-status part.
    raw = (
        b"From: MAILER-DAEMON@mx.example.org\r\nTo: x@bounce.relay.test\r\n"
        b"Subject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=global-delivery-status; boundary="b"\r\n'
        b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n"
        b"--b\r\nContent-Type: message/global-delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.org\r\n\r\n"
        b"Final-Recipient: utf-8; pat@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; quinn@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\n"
        b"\r\n--b--\r\n"
    )
    report = parse_report(raw)
    assert [(r.address, r.action, r.status) for r in report.recipients] == [
        ("pat@example.org", "failed", "5.1.1"),
        ("quinn@example.org", "delivered", "2.0.0"),
    ]
    assert [r.address for r in report.failures()] == ["pat@example.org"]


@pytest.mark.parametrize(
    ("status", "text", "expected", "retry"),
    [
        ("5.1.1", "", BounceType.HARD, False),
        ("5.1.10", "", BounceType.HARD, False),
        ("5.2.1", "mailbox disabled", BounceType.HARD, False),
        ("5.4.4", "", BounceType.HARD, False),
        ("5.1.8", "bad sender's system address", BounceType.SOFT, False),
        ("5.7.1", "blocked using bl.example.net", BounceType.SOFT, False),
        ("5.7.133", "", BounceType.SOFT, False),
        ("5.3.4", "message too big", BounceType.SOFT, False),
        ("5.2.2", "", BounceType.SOFT, True),
        ("4.4.1", "", BounceType.SOFT, True),
        ("5.0.0", "user unknown", BounceType.HARD, False),
        ("5.0.0", "Service unavailable; client blocked for spam", BounceType.SOFT, False),
        (None, "550 No such user here", BounceType.HARD, False),
        (None, "554 mailbox full", BounceType.SOFT, True),
        (None, "", BounceType.HARD, False),
    ],
)
def test_hard_or_soft(status: str | None, text: str, expected: BounceType, retry: bool) -> None:
    verdict = classify(status, text, failed=True)
    assert (verdict.bounce_type, verdict.retry) == (expected, retry)


# VERP


def test_verp_round_trip_and_forgery() -> None:
    verp = VerpCodec("bounce.relay.test", VERP_KEY.encode())
    queue_id = new_queue_id()
    address = verp.address(queue_id, 42)
    local = address.split("@")[0]
    assert address.endswith("@bounce.relay.test") and local == local.lower()
    target = verp.parse(address)
    assert target is not None and (target.message_id, target.row_id) == (queue_id, 42)
    # Some MTAs fold case; the address still reads back.
    assert verp.parse(address.upper()) == target
    assert verp.parse(verp.address(queue_id)) is not None
    assert verp.parse(verp.address(queue_id)).row_id is None  # type: ignore[union-attr]

    # Another row, another message, another key, another domain: all refused.
    tag = local.rsplit("-", 1)[1]
    assert verp.parse(address.replace("-42-", "-43-")) is None
    assert verp.parse(f"bounces+{new_queue_id().lower()}-42-{tag}@bounce.relay.test") is None
    other = VerpCodec("bounce.relay.test", b"another key, also long enough")
    assert other.parse(address) is None
    assert verp.parse(address.replace("bounce.relay.test", "elsewhere.test")) is None
    assert verp.parse("postmaster@bounce.relay.test") is None


def test_verp_sender_keeps_the_null_sender_and_fits_rfc5321() -> None:
    settings = BounceSettings(**BOUNCES)
    queue_id = new_queue_id()
    address = verp_sender(
        settings, message_id=queue_id, original="app@clinic.example", row_id=2**63 - 1
    )
    assert len(address.split("@")[0]) <= 64
    assert parse_verp(settings, address).row_id == 2**63 - 1  # type: ignore[union-attr]
    assert verp_sender(settings, message_id=queue_id, original="") == ""
    off = BounceSettings()
    assert verp_sender(off, message_id=queue_id, original="app@clinic.example") == (
        "app@clinic.example"
    )
    assert parse_verp(off, address) is None


def test_verp_domain_needs_a_key() -> None:
    with pytest.raises(ValueError, match="verp_key"):
        BounceSettings(verp_domain="bounce.relay.test")
    with pytest.raises(ValueError, match="16 characters"):
        BounceSettings(verp_domain="bounce.relay.test", verp_key="short")


# Mailgun: signatures and what each event means


def signed(
    event_data: dict[str, Any],
    *,
    key: str = MAILGUN_KEY,
    age_s: float = 0,
    token: str | None = None,
) -> dict[str, Any]:
    timestamp = str(int(time.time() - age_s))
    token = token or secrets.token_hex(25)
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event_data,
    }


def mailgun_event(name: str, message_id: str, recipient: str, **fields: Any) -> dict[str, Any]:
    event = {
        "event": name,
        "id": secrets.token_urlsafe(16),
        "timestamp": time.time(),
        "recipient": recipient,
        "recipient-domain": recipient.split("@")[1],
        "user-variables": {"relay-message-id": message_id},
        "message": {"headers": {"message-id": "20260203.abc@mg.clinic.example"}},
        # Fields Mailgun may add later are ignored, at every level.
        "storage": {"region": "us-east4", "future-field": [1, 2]},
        "shiny-new-field": {"nested": True},
    }
    return {**event, **fields}


def failed(message_id: str, recipient: str, severity: str = "permanent", **status: Any) -> dict:
    delivery = {
        "code": 550,
        "message": "5.1.1 The email account that you tried to reach does not exist.",
        "description": "",
        "attempt-no": 1,
        "mx-host": "mx.example.net",
        **status,
    }
    return mailgun_event(
        "failed",
        message_id,
        recipient,
        severity=severity,
        reason="bounce" if severity == "permanent" else "generic",
        **{"delivery-status": delivery},
    )


def test_mailgun_signature_freshness_and_shape() -> None:
    now = utcnow()
    event = mailgun_event("delivered", new_queue_id(), "a@example.org")
    call = verify(json.dumps(signed(event)).encode(), MAILGUN_KEY, now=now)
    assert call.event["recipient"] == "a@example.org"

    def rejected(body: Any) -> str:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with pytest.raises(WebhookRejected) as caught:
            verify(raw, MAILGUN_KEY, now=now)
        return str(caught.value.args[0])

    assert rejected(signed(event, key="not the signing key")) == "bad_signature"
    unsigned = signed(event)
    del unsigned["signature"]["signature"]
    assert rejected(unsigned) == "bad_signature"
    assert rejected({"event-data": event}) == "malformed"
    assert rejected(b"not json") == "malformed"
    assert rejected(signed(event, age_s=16 * 60)) == "stale"
    assert rejected(signed(event, age_s=-16 * 60)) == "stale"
    # 14 minutes is still fresh: Mailgun's clock and ours need not agree to the second.
    verify(json.dumps(signed(event, age_s=14 * 60)).encode(), MAILGUN_KEY, now=now)
    # A subaccount's call verifies by its parent-signature.
    parent = signed(event)
    parent["signature"]["parent-signature"] = parent["signature"]["signature"]
    parent["signature"]["signature"] = "0" * 64
    verify(json.dumps(parent).encode(), MAILGUN_KEY, now=now)


def test_mailgun_event_mapping() -> None:
    queue_id = new_queue_id()
    to = "pat@example.org"

    hard = to_bounce_event(failed(queue_id, to))
    assert hard is not None
    assert (hard.kind, hard.status, hard.message_id, hard.touch_message) == (
        EventKind.HARD,
        "5.1.1",
        queue_id,
        True,
    )
    soft = to_bounce_event(failed(queue_id, to, "temporary", code=452, message="4.2.2 full"))
    assert soft is not None and soft.kind is EventKind.SOFT and not soft.touch_message
    blocked = to_bounce_event(
        failed(queue_id, to, code=554, message="5.7.1 rejected: listed at bl.example.net")
    )
    assert blocked is not None and blocked.kind is EventKind.SOFT and not blocked.retry
    bare = to_bounce_event(failed(queue_id, to, code=0, message=""))
    assert bare is not None and bare.kind is EventKind.HARD  # "permanent" taken at its word
    complaint = to_bounce_event(mailgun_event("complained", queue_id, to))
    assert complaint is not None and complaint.kind is EventKind.COMPLAINT
    delivered = to_bounce_event(mailgun_event("delivered", queue_id, to))
    assert delivered is not None and delivered.kind is EventKind.DELIVERED
    assert to_bounce_event(mailgun_event("opened", queue_id, to)) is None
    assert to_bounce_event(mailgun_event("delivered", "not-a-queue-id", to)) is None
    no_variables = mailgun_event("delivered", queue_id, to)
    del no_variables["user-variables"]
    assert to_bounce_event(no_variables) is None


# The store: the suppression lifecycle, on SQLite and MariaDB


@pytest.fixture
def settings(queue_settings: dict[str, Any], tmp_path: Path) -> Settings:
    return relay_settings(tmp_path, queue_settings, bounces=BOUNCES)


@pytest.fixture
def processor(store: SqlStore, settings: Settings) -> BounceProcessor:
    return BounceProcessor(store, settings)


def new_message(*recipients: str, queued_at: datetime | None = None) -> NewMessage:
    return NewMessage(
        id=new_queue_id(),
        workspace_id="default",
        from_email="reminders@clinic.example",
        recipients=recipients,
        subject="Your appointment",
        content=b"Subject: Your appointment\r\n\r\nThursday at 10:30.\r\n",
        queued_at=queued_at or utcnow(),
    )


async def delivered(
    store: SqlStore, *recipients: str, queued_at: datetime | None = None
) -> tuple[str, dict[str, int]]:
    """A message handed to a provider for every recipient: status sent, rows SENT."""
    message = new_message(*recipients, queued_at=queued_at)
    await store.enqueue(message)
    now = utcnow()
    [claimed] = await store.claim(worker_id="w", limit=1, lease=timedelta(minutes=5), now=now)
    assert claimed.id == message.id
    updates = tuple(
        RecipientUpdate(r.row_id, DeliveryStatus.SENT, None, "outbox", None, now)
        for r in claimed.recipients
    )
    result = AttemptResult(MessageStatus.SENT, None, 0, None, now, updates)
    assert await store.complete(worker_id="w", message_id=message.id, result=result)
    rows = await store.bounce_candidates(message.id)
    assert rows is not None
    return message.id, {address: row_id for row_id, address in rows}


def dsn_event(message_id: str, row_id: int, kind: EventKind, **extra: Any) -> BounceEvent:
    return BounceEvent(
        source=Source.DSN,
        kind=kind,
        address=None,
        message_id=message_id,
        row_id=row_id,
        status=extra.pop("status", "5.1.1" if kind is EventKind.HARD else "4.2.2"),
        reason=extra.pop("reason", "550 5.1.1 <recipient>: User unknown"),
        **extra,
    )


async def recipient(store: SqlStore, address: str, workspace: str = "default") -> dict | None:
    return await store.recipient_record(workspace_id=workspace, address=address)


async def test_three_hard_bounces_make_an_address_inactive(
    store: SqlStore, processor: BounceProcessor
) -> None:
    before = REGISTRY.get_sample_value("suppressions_total", {"reason": "hard_bounce"}) or 0
    statuses = []
    for _ in range(3):
        message_id, rows = await delivered(store, "gone@example.net", "fine@example.net")
        row = rows["gone@example.net"]
        await processor.apply([dsn_event(message_id, row, EventKind.HARD)])
        record = await recipient(store, "gone@example.net")
        assert record is not None
        statuses.append((record["status"], record["bounce_count"], record["bounce_type"]))
        found = await store.message_status(message_id)
        assert found is not None
        by_address = {r["email_address"]: r for r in found["recipients"]}
        assert by_address["gone@example.net"]["delivery_status"] == "BOUNCED"
        assert by_address["fine@example.net"]["delivery_status"] == "SENT"
        # One of two recipients bounced: the message failed (README "States").
        assert found["status"] == "failed"

    assert statuses == [("BOUNCED", 1, "HARD"), ("BOUNCED", 2, "HARD"), ("INACTIVE", 3, "HARD")]
    assert await store.suppressed_among("default", ["Gone@Example.net", "fine@example.net"]) == {
        "Gone@Example.net": SuppressionReason.HARD_BOUNCE
    }
    assert await store.suppressed_among("other-workspace", ["gone@example.net"]) == {}
    listed = await store.suppressions()
    assert [(s["email_address"], s["reason"]) for s in listed] == [
        ("gone@example.net", "hard_bounce")
    ]
    assert "3 hard bounces in a row" in (listed[0]["detail"] or "")
    after = REGISTRY.get_sample_value("suppressions_total", {"reason": "hard_bounce"})
    assert after == before + 1
    record = await recipient(store, "gone@example.net")
    assert record is not None and len(record["events"]) == 3
    assert {e["type"] for e in record["events"]} == {"HARD"}


async def test_message_whose_recipients_all_bounced_is_bounced(
    store: SqlStore, processor: BounceProcessor
) -> None:
    message_id, rows = await delivered(store, "a@example.net", "b@example.net")
    await processor.apply([dsn_event(message_id, rows["a@example.net"], EventKind.HARD)])
    await processor.apply([dsn_event(message_id, rows["b@example.net"], EventKind.HARD)])
    found = await store.message_status(message_id)
    assert found is not None and found["status"] == "bounced"
    stats = await store.bounce_stats(since=utcnow() - timedelta(hours=1))
    assert stats["reasons"] == [
        {"bounce_reason": "550 5.1.1 <recipient>: User unknown", "count": 2}
    ]


async def test_soft_bounce_sends_again_after_the_delay(
    store: SqlStore, processor: BounceProcessor, settings: Settings
) -> None:
    message_id, rows = await delivered(store, "full@example.net", "ok@example.net")
    now = utcnow()
    [applied] = (
        await processor.apply(
            [dsn_event(message_id, rows["full@example.net"], EventKind.SOFT, retry=True)], now=now
        )
    ).applied
    assert (applied.row_status, applied.message_status) == ("DEFERRED", "queued")
    record = await recipient(store, "full@example.net")
    assert record is not None and (record["status"], record["bounce_type"]) == ("BOUNCED", "SOFT")

    # Not before the runbook's 24 hours; then only the soft-bounced recipient is sent again.
    lease = timedelta(minutes=5)
    almost = now + settings.bounces.soft_bounce_retry - timedelta(minutes=1)
    assert await store.claim(worker_id="w2", limit=5, lease=lease, now=almost) == []
    later = now + settings.bounces.soft_bounce_retry + timedelta(seconds=1)
    [again] = await store.claim(worker_id="w2", limit=5, lease=lease, now=later)
    assert again.id == message_id
    assert [r.address for r in again.recipients] == ["full@example.net"]


async def test_a_hard_report_after_a_soft_one_settles_the_queued_message(
    store: SqlStore, processor: BounceProcessor
) -> None:
    message_id, rows = await delivered(store, "later.gone@example.net")
    row = rows["later.gone@example.net"]
    await processor.apply([dsn_event(message_id, row, EventKind.SOFT, retry=True)])
    [applied] = (await processor.apply([dsn_event(message_id, row, EventKind.HARD)])).applied
    assert (applied.row_status, applied.message_status) == ("BOUNCED", "bounced")
    # Nothing is left to send: the message is never claimed again.
    later = utcnow() + timedelta(days=2)
    assert await store.claim(worker_id="w", limit=5, lease=timedelta(minutes=5), now=later) == []


async def test_soft_bounce_of_old_mail_is_final(
    store: SqlStore, processor: BounceProcessor
) -> None:
    six_days_ago = utcnow() - timedelta(days=6)  # delivery.max_age is 5 days
    message_id, rows = await delivered(store, "full@example.net", queued_at=six_days_ago)
    event = dsn_event(message_id, rows["full@example.net"], EventKind.SOFT, retry=True)
    [applied] = (await processor.apply([event])).applied
    assert (applied.row_status, applied.message_status) == ("BOUNCED", "bounced")


async def test_soft_bounce_for_a_message_being_delivered_asks_to_retry(
    store: SqlStore, processor: BounceProcessor
) -> None:
    message_id, rows = await delivered(store, "full@example.net")
    await processor.apply(
        [dsn_event(message_id, rows["full@example.net"], EventKind.SOFT, retry=True)]
    )
    later = utcnow() + timedelta(days=2)
    [held] = await store.claim(worker_id="w3", limit=1, lease=timedelta(minutes=5), now=later)
    assert held.id == message_id
    event = dsn_event(message_id, rows["full@example.net"], EventKind.SOFT, retry=True)
    with pytest.raises(MessageBusy):
        await processor.apply([event], now=later)
    # Nothing of that transaction was written.
    record = await recipient(store, "full@example.net")
    assert record is not None and record["bounce_count"] == 1


async def test_counts_restart_after_a_delivery_or_the_other_kind(
    store: SqlStore, processor: BounceProcessor
) -> None:
    async def bounce(kind: EventKind) -> tuple[str, int, str | None]:
        message_id, rows = await delivered(store, "flaky@example.net")
        await processor.apply([dsn_event(message_id, rows["flaky@example.net"], kind)])
        record = await recipient(store, "flaky@example.net")
        assert record is not None
        return record["status"], record["bounce_count"], record["bounce_type"]

    assert await bounce(EventKind.HARD) == ("BOUNCED", 1, "HARD")
    assert await bounce(EventKind.HARD) == ("BOUNCED", 2, "HARD")
    assert await bounce(EventKind.SOFT) == ("BOUNCED", 1, "SOFT")
    assert await bounce(EventKind.HARD) == ("BOUNCED", 1, "HARD")
    assert await bounce(EventKind.DELIVERED) == ("ACTIVE", 0, "HARD")
    assert await bounce(EventKind.HARD) == ("BOUNCED", 1, "HARD")


async def test_a_complaint_suppresses_at_once(store: SqlStore, processor: BounceProcessor) -> None:
    message_id, rows = await delivered(store, "annoyed@example.net")
    complaint = dsn_event(message_id, rows["annoyed@example.net"], EventKind.COMPLAINT)
    [applied] = (await processor.apply([complaint])).applied
    assert applied.suppressed_now is SuppressionReason.COMPLAINT
    assert await store.suppressed_among("default", ["annoyed@example.net"]) == {
        "annoyed@example.net": SuppressionReason.COMPLAINT
    }
    found = await store.message_status(message_id)
    assert found is not None and found["status"] == "sent"  # it was delivered


async def test_once_keys_refuse_repeats_until_they_expire(
    store: SqlStore, processor: BounceProcessor
) -> None:
    message_id, rows = await delivered(store, "twice@example.net")
    event = dsn_event(message_id, rows["twice@example.net"], EventKind.HARD)
    now = utcnow()
    key = OnceKey("report", "abc123", now + timedelta(hours=1))
    assert (await processor.apply([event], once=[key], now=now)).duplicate is None
    assert (await processor.apply([event], once=[key], now=now)).duplicate == "report"
    record = await recipient(store, "twice@example.net")
    assert record is not None and record["bounce_count"] == 1
    # Past its expiry the key is forgotten (and the table does not grow forever).
    later = now + timedelta(hours=2)
    assert (await processor.apply([event], once=[key], now=later)).duplicate is None


async def test_send_time_rejections_count(store: SqlStore, processor: BounceProcessor) -> None:
    applied = await processor.record_send_failure(
        workspace_id="clinic",
        address="Nobody@Example.net",
        detail="550 5.1.1 <Nobody@Example.net>: Recipient address rejected: User unknown",
    )
    assert applied is not None and applied.event.kind is EventKind.HARD
    record = await recipient(store, "nobody@example.net", "clinic")
    assert record is not None and (record["bounce_type"], record["bounce_count"]) == ("HARD", 1)
    # An API refusing the message, or a transient reply, says nothing about the address.
    assert (
        await processor.record_send_failure(
            workspace_id="clinic",
            address="x@example.net",
            detail="Gmail API refused the message: 400 invalidArgument",
        )
        is None
    )
    assert (
        await processor.record_send_failure(
            workspace_id="clinic", address="x@example.net", detail="452 4.2.2 Mailbox full"
        )
        is None
    )
    assert await recipient(store, "x@example.net", "clinic") is None


async def test_manual_suppression_and_lifting_it(store: SqlStore) -> None:
    now = utcnow()
    args = {"workspace_id": "clinic", "address": "Opt.Out@Example.org", "now": now}
    assert await store.suppress(
        reason=SuppressionReason.MANUAL, detail="asked by phone", created_by="ops", **args
    )
    assert not await store.suppress(
        reason=SuppressionReason.MANUAL, detail=None, created_by="ops", **args
    )
    record = await recipient(store, "opt.out@example.org", "clinic")
    assert record is not None
    assert (record["status"], record["reason"], record["created_by"]) == (
        "INACTIVE",
        "manual",
        "ops",
    )
    assert await store.suppression_count() == 1
    assert await store.unsuppress(**args)
    assert not await store.unsuppress(**args)
    record = await recipient(store, "opt.out@example.org", "clinic")
    assert record is not None and (record["status"], record["reason"]) == ("ACTIVE", None)
    assert await store.suppressions(workspace_id="clinic") == []


async def test_bounce_statistics_are_the_runbooks_three_queries(
    store: SqlStore, processor: BounceProcessor
) -> None:
    for address, kind in (
        ("a@one.example", EventKind.HARD),
        ("b@one.example", EventKind.HARD),
        ("c@Two.example", EventKind.SOFT),
    ):
        message_id, rows = await delivered(store, address)
        row = rows[address]
        retry = kind is EventKind.SOFT
        event = dsn_event(message_id, row, kind, reason=f"{kind.value} reason", retry=retry)
        await processor.apply([event])
    stats = await store.bounce_stats(since=utcnow() - timedelta(hours=24))
    assert stats["by_workspace_and_type"] == [
        {"workspace_id": "default", "bounce_type": "HARD", "count": 2, "unique_emails": 2},
        {"workspace_id": "default", "bounce_type": "SOFT", "count": 1, "unique_emails": 1},
    ]
    assert stats["domains"] == [
        {"domain": "one.example", "bounce_count": 2},
        {"domain": "two.example", "bounce_count": 1},
    ]
    # The soft bounce was sent again (DEFERRED), so only the hard ones count as BOUNCED.
    assert stats["reasons"] == [{"bounce_reason": "HARD reason", "count": 2}]
    assert await store.bounce_stats(since=utcnow() - timedelta(hours=24), workspace_id="x") == {
        "by_workspace_and_type": [],
        "domains": [],
        "reasons": [],
    }
    later = await store.bounce_stats(since=utcnow() + timedelta(minutes=1))
    assert later["by_workspace_and_type"] == [] and later["reasons"] == []


# The webhook and the admin routes, through FastAPI


ADMIN = {"Authorization": "Bearer test-admin-token"}


def app_for(processor: BounceProcessor) -> FastAPI:
    def authorize(authorization: str | None = Header(None)) -> str:
        # Stands in for the app's bearer-token machinery.
        if authorization != ADMIN["Authorization"]:
            raise HTTPException(status_code=401, detail="no token")
        return "tester"

    app = FastAPI()
    app.include_router(bounce_router(processor, authorize=authorize))
    return app


@pytest.fixture
async def api(processor: BounceProcessor) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_for(processor))
    async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
        yield client


async def test_webhook_rejects_unsigned_stale_and_replayed_calls(
    store: SqlStore, api: httpx.AsyncClient
) -> None:
    message_id, _ = await delivered(store, "pat@example.org")
    event = failed(message_id, "pat@example.org")

    async def post(body: Any) -> tuple[int, str]:
        response = await api.post("/webhooks/mailgun", json=body)
        return response.status_code, response.json()["status"]

    unsigned = {"event-data": event}
    assert await post(unsigned) == (406, "rejected")
    assert await post(signed(event, key="someone else's key")) == (406, "rejected")
    assert await post(signed(event, age_s=20 * 60)) == (406, "rejected")
    assert await recipient(store, "pat@example.org") is None

    call = signed(event)
    assert await post(call) == (200, "accepted")
    assert await post(call) == (406, "rejected")  # the same token again: a replay
    # Mailgun's retry of the same event carries a new token: acknowledged, not re-counted.
    assert await post(signed(event)) == (200, "duplicate")
    record = await recipient(store, "pat@example.org")
    assert record is not None and (record["bounce_type"], record["bounce_count"]) == ("HARD", 1)
    outcome = REGISTRY.get_sample_value(
        "webhook_requests_total", {"provider": "mailgun", "outcome": "replay"}
    )
    assert outcome is not None and outcome >= 1


async def test_webhook_applies_every_event_type(store: SqlStore, api: httpx.AsyncClient) -> None:
    async def post(event: dict[str, Any]) -> str:
        response = await api.post("/webhooks/mailgun", json=signed(event))
        assert response.status_code == 200, response.text
        return str(response.json()["status"])

    async def rows_of(message_id: str) -> dict[str, str]:
        found = await store.message_status(message_id)
        assert found is not None
        return {r["email_address"]: r["delivery_status"] for r in found["recipients"]}

    # failed, permanent: a hard bounce; three make the address INACTIVE.
    for _ in range(3):
        message_id, _ = await delivered(store, "gone@example.org")
        assert await post(failed(message_id, "gone@example.org")) == "accepted"
        assert await rows_of(message_id) == {"gone@example.org": "BOUNCED"}
    assert await store.suppressed_among("default", ["gone@example.org"]) == {
        "gone@example.org": SuppressionReason.HARD_BOUNCE
    }

    # failed, temporary: a soft bounce on the address; Mailgun still has the message.
    message_id, _ = await delivered(store, "busy@example.org")
    event = failed(message_id, "busy@example.org", "temporary", code=452, message="4.2.2 full")
    assert await post(event) == "accepted"
    assert await rows_of(message_id) == {"busy@example.org": "SENT"}
    record = await recipient(store, "busy@example.org")
    assert record is not None and (record["status"], record["bounce_type"]) == ("BOUNCED", "SOFT")

    # delivered: the address works after all.
    assert await post(mailgun_event("delivered", message_id, "busy@example.org")) == "accepted"
    record = await recipient(store, "busy@example.org")
    assert record is not None and (record["status"], record["bounce_count"]) == ("ACTIVE", 0)

    # complained: suppressed at once.
    message_id, _ = await delivered(store, "annoyed@example.org")
    assert await post(mailgun_event("complained", message_id, "annoyed@example.org")) == (
        "accepted"
    )
    assert await store.suppressed_among("default", ["annoyed@example.org"]) == {
        "annoyed@example.org": SuppressionReason.COMPLAINT
    }

    # Events about nothing we track are acknowledged, so Mailgun stops sending them.
    assert await post(mailgun_event("opened", message_id, "annoyed@example.org")) == "ignored"
    assert await post(failed(new_queue_id(), "stranger@example.org")) == "ignored"
    assert await recipient(store, "stranger@example.org") is None


async def test_webhook_without_a_key_asks_mailgun_to_retry(
    store: SqlStore, settings: Settings
) -> None:
    unkeyed = settings.model_copy(
        update={"bounces": BounceSettings(**{**BOUNCES, "mailgun_webhook_signing_key": None})}
    )
    transport = httpx.ASGITransport(app=app_for(BounceProcessor(store, unkeyed)))
    async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
        event = mailgun_event("delivered", new_queue_id(), "a@example.org")
        response = await client.post("/webhooks/mailgun", json=signed(event))
    assert response.status_code == 503


async def test_admin_routes_list_add_show_remove_and_stats(
    store: SqlStore, api: httpx.AsyncClient
) -> None:
    assert (await api.get("/api/suppressions")).status_code == 401
    body = {"address": "Opt.Out@Example.org", "workspace": "clinic", "detail": "asked"}
    assert (await api.post("/api/suppressions", json=body)).status_code == 401

    added = await api.post("/api/suppressions", json=body, headers=ADMIN)
    assert added.status_code == 200 and added.json() == {"ok": True, "detail": "suppressed"}
    again = await api.post("/api/suppressions", json=body, headers=ADMIN)
    assert again.json()["detail"].startswith("already suppressed")
    listed = (await api.get("/api/suppressions?workspace=clinic", headers=ADMIN)).json()
    assert [(s["email_address"], s["reason"], s["created_by"]) for s in listed] == [
        ("opt.out@example.org", "manual", "tester")
    ]
    shown = await api.get("/api/suppressions/clinic/opt.out@example.org", headers=ADMIN)
    assert shown.status_code == 200 and shown.json()["status"] == "INACTIVE"
    missing = await api.get("/api/suppressions/clinic/nobody@example.org", headers=ADMIN)
    assert missing.status_code == 404
    bad = await api.post("/api/suppressions", json={"address": "not an address"}, headers=ADMIN)
    assert bad.status_code == 422

    removed = await api.delete("/api/suppressions/clinic/OPT.OUT@example.org", headers=ADMIN)
    assert removed.status_code == 200
    assert (
        await api.delete("/api/suppressions/clinic/opt.out@example.org", headers=ADMIN)
    ).status_code == 404
    assert (await api.get("/api/suppressions", headers=ADMIN)).json() == []

    audit = [e["action"] for e in await store.audit_entries()]
    assert audit[:3] == ["suppression.remove", "suppression.remove", "suppression.add"]

    stats = await api.get("/api/bounces/stats?hours=24", headers=ADMIN)
    assert stats.status_code == 200
    assert set(stats.json()) == {"since", "by_workspace_and_type", "domains", "reasons"}
    assert (await api.get("/api/bounces/stats")).status_code == 401


# Over SMTP: reports at VERP addresses, and RCPT for suppressed addresses


PASSWORD = "correct horse battery staple"
APP_USERS = {"default": {"users": {"clinic-app": {"password_hash": hash_password(PASSWORD)}}}}
# Nobody is trusted: the application authenticates, remote MTAs cannot.
SMTP_CLOSED = {"trusted_networks": [], "plaintext_auth_networks": ["127.0.0.0/8"]}

Reply = tuple[int, bytes]


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def submit(
    port: int, recipients: list[str], *, login: bool = True, sender: str = "app@clinic.example"
) -> tuple[list[Reply], Reply | None]:
    """One transaction; the RCPT replies and the DATA reply (None when nothing was accepted)."""

    def run() -> tuple[list[Reply], Reply | None]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("app.clinic.example")
            if login:
                client.login("clinic-app", PASSWORD)
            assert client.mail(sender)[0] == 250
            replies = [client.rcpt(address) for address in recipients]
            if not any(code == 250 for code, _ in replies):
                return replies, None
            body = b"Subject: Your appointment\r\n\r\nThursday at 10:30.\r\n"
            return replies, client.data(body)

    return await asyncio.to_thread(run)


async def send_report(port: int, verp: str, raw: bytes) -> list[Reply]:
    """A remote MTA delivering a report: no AUTH, the null sender."""

    def run() -> list[Reply]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("mx.example.net")
            return [client.mail(""), client.rcpt(verp), client.data(crlf(raw))]

    return await asyncio.to_thread(run)


def queue_id_of(reply: Reply | None) -> str:
    assert reply is not None and reply[0] == 250, reply
    return reply[1].decode().rsplit(" ", 1)[1]


async def sent(service: RelayService, queue_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        found = await service.store.message_status(queue_id)
        if found is not None and found["status"] == "sent":
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def verp_of(service: RelayService, queue_id: str, address: str | None = None) -> str:
    rows = await service.store.bounce_candidates(queue_id)
    assert rows is not None
    row = next(r for r, a in rows if a == address) if address else None
    return verp_sender(
        service.settings.bounces, message_id=queue_id, original="app@clinic.example", row_id=row
    )


def postfix_report(address: str) -> bytes:
    """A Postfix-style report whose diagnostic carries no SMTP code."""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\n"
        "To: bounces@bounce.relay.test\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n'
        "\n--B\nContent-Type: text/plain\n\n"
        f"<{address}>: unknown user\n"
        "\n--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example.net\n\n"
        f"Final-Recipient: rfc822; {address}\n"
        "Action: failed\nStatus: 5.1.1\n"
        f'Diagnostic-Code: X-Postfix; unknown user: "{address.split("@")[0]}"\n'
        "\n--B--\n"
    ).encode()


async def test_three_bounced_reports_then_rcpt_is_refused(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=SMTP_CLOSED, workspaces=APP_USERS, bounces=BOUNCES)
    port = service.smtp_port
    gone = "gone@example.net"

    for n in range(1, 4):
        _, data = await submit(port, [gone])
        queue_id = queue_id_of(data)
        await sent(service, queue_id)
        verp = await verp_of(service, queue_id, gone)
        mail, rcpt, taken = await send_report(port, verp, postfix_report(gone))
        assert (mail[0], rcpt[0], taken[0]) == (250, 250, 250), (mail, rcpt, taken)
        record = await recipient(service.store, gone)
        assert record is not None and record["bounce_count"] == n
        found = await service.store.message_status(queue_id)
        assert found is not None and found["status"] == "bounced"

    record = await recipient(service.store, gone)
    assert record is not None and (record["status"], record["reason"]) == (
        "INACTIVE",
        "hard_bounce",
    )

    # The next message: refused for the suppressed address, accepted for the other one.
    replies, data = await submit(port, [gone, "fine@example.net"])
    assert replies[0] == SUPPRESSED_REPLY
    assert replies[1][0] == 250
    found = await service.store.message_status(queue_id_of(data))
    assert found is not None
    assert [r["email_address"] for r in found["recipients"]] == ["fine@example.net"]


async def test_the_bounce_domain_takes_only_tagged_addresses(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=SMTP_CLOSED, workspaces=APP_USERS, bounces=BOUNCES)
    port = service.smtp_port
    _, data = await submit(port, ["someone@example.net"])
    queue_id = queue_id_of(data)
    await sent(service, queue_id)
    verp = await verp_of(service, queue_id, "someone@example.net")

    def probe() -> list[Reply]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("mx.example.net")
            return [
                client.mail(""),
                # Never an open relay: an unauthenticated client reaches no one else...
                client.rcpt("someone@example.net"),
                # ...nor a forged or tampered bounce address.
                client.rcpt("postmaster@bounce.relay.test"),
                client.rcpt(verp.replace("@", "x@")),
                client.rcpt(f"bounces+{new_queue_id().lower()}-1-abcdefghi@bounce.relay.test"),
                client.rcpt(verp),
            ]

    mail, other, postmaster, tampered, forged, ours = await asyncio.to_thread(probe)
    assert mail[0] == 250
    assert other == (530, b"5.7.0 Authentication required")
    for refused in (postmaster, tampered, forged):
        assert refused == (550, b"5.1.1 Unknown bounce address")
    assert ours[0] == 250
    counts = (await service.store.stats(now=utcnow())).counts
    assert counts == {"sent": 1}


async def test_corpus_reports_over_smtp(start_relay: StartRelay) -> None:
    service = await start_relay(smtp=SMTP_CLOSED, workspaces=APP_USERS, bounces=BOUNCES)
    port = service.smtp_port

    # Gmail's report, at the recipient's own VERP address.
    _, data = await submit(port, ["hana.ito@gmail.example"])
    gmail_id = queue_id_of(data)
    await sent(service, gmail_id)
    verp = await verp_of(service, gmail_id, "hana.ito@gmail.example")
    for _ in range(2):  # the second copy (a lost 250) is not counted again
        assert (await send_report(port, verp, corpus("gmail_no_such_user.eml")))[2][0] == 250
    record = await recipient(service.store, "hana.ito@gmail.example")
    assert record is not None and (record["bounce_type"], record["bounce_count"]) == ("HARD", 1)
    found = await service.store.message_status(gmail_id)
    assert found is not None and found["status"] == "bounced"

    # One RFC 3464 report for four recipients, at the message's VERP address.
    four = ["ana.lima@example.net", "ben.okafor@example.net", "chen.wu@example.net"]
    four.append("dara.singh@example.net")
    _, data = await submit(port, four)
    multi_id = queue_id_of(data)
    await sent(service, multi_id)
    message_verp = await verp_of(service, multi_id)
    assert (await send_report(port, message_verp, corpus("rfc3464_multi.eml")))[2][0] == 250
    found = await service.store.message_status(multi_id)
    assert found is not None
    assert {r["email_address"]: r["delivery_status"] for r in found["recipients"]} == {
        "ana.lima@example.net": "BOUNCED",
        "ben.okafor@example.net": "DEFERRED",  # 4.2.2: sent again in 24 h
        "chen.wu@example.net": "SENT",  # only delayed
        "dara.singh@example.net": "BOUNCED",
    }
    assert found["status"] == "queued"
    async with service.store.transaction() as tx:
        reasons = await tx.fetchall(
            "SELECT email_address, bounce_reason FROM message_recipients"
            " WHERE message_id = ? ORDER BY id",
            (multi_id,),
        )
    assert reasons[0][1] == "550 5.1.1 <recipient>... User unknown"

    # An out-of-office reply to a return path is taken and changes nothing.
    _, data = await submit(port, ["nia.brooks@example.com"])
    ooo_id = queue_id_of(data)
    await sent(service, ooo_id)
    verp = await verp_of(service, ooo_id, "nia.brooks@example.com")
    assert (await send_report(port, verp, corpus("out_of_office.eml")))[2][0] == 250
    assert await recipient(service.store, "nia.brooks@example.com") is None
    assert (await service.store.message_status(ooo_id) or {})["status"] == "sent"


async def test_suppressed_recipients_can_be_recorded_instead(start_relay: StartRelay) -> None:
    service = await start_relay(
        smtp=SMTP_CLOSED,
        workspaces=APP_USERS,
        bounces={**BOUNCES, "suppressed_action": "record"},
    )
    await service.store.suppress(
        workspace_id="default",
        address="opted.out@example.net",
        reason=SuppressionReason.MANUAL,
        detail="asked by phone",
        created_by="ops",
        now=utcnow(),
    )
    replies, data = await submit(service.smtp_port, ["opted.out@example.net"])
    assert replies == [(250, b"2.1.5 Recipient suppressed: recorded as bounced, not sent")]
    found = await service.store.message_status(queue_id_of(data))
    assert found is not None and found["status"] == "bounced"
    [row] = found["recipients"]
    assert row["delivery_status"] == "BOUNCED" and row["attempts"] == 0

    replies, data = await submit(service.smtp_port, ["opted.out@example.net", "ok@example.net"])
    found = await sent(service, queue_id_of(data))
    assert {r["email_address"]: r["delivery_status"] for r in found["recipients"]} == {
        "opted.out@example.net": "BOUNCED",
        "ok@example.net": "SENT",
    }


async def test_without_a_bounce_domain_strangers_are_refused_at_mail(
    start_relay: StartRelay,
) -> None:
    service = await start_relay(smtp=SMTP_CLOSED, workspaces=APP_USERS)

    def attempt() -> Reply:
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
            client.ehlo("mx.example.net")
            return client.mail("")

    assert await asyncio.to_thread(attempt) == (530, b"5.7.0 Authentication required")


# The CLI


def test_cli_suppressions_and_stats(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "queue": {"backend": "sqlite", "sqlite": {"path": str(tmp_path / "q.db")}},
                "log": {"level": "WARNING"},
            }
        )
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay.cli", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    added = run("suppressions", "add", "Opt.Out@Example.org", "--detail", "asked by phone")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "opt.out@example.org in default: suppressed"
    listed = run("suppressions", "list", "--json")
    [entry] = json.loads(listed.stdout)
    assert (entry["email_address"], entry["reason"], entry["detail"]) == (
        "opt.out@example.org",
        "manual",
        "asked by phone",
    )
    assert entry["created_by"].startswith("cli:")
    shown = json.loads(run("suppressions", "show", "opt.out@example.org").stdout)
    assert shown["status"] == "INACTIVE"
    assert run("suppressions", "remove", "opt.out@example.org").returncode == 0
    assert run("suppressions", "remove", "opt.out@example.org").returncode == 3
    assert run("suppressions", "show", "nobody@example.org").returncode == 3
    assert run("suppressions", "add", "not an address").returncode == cli.EXIT_CONFIG
    stats = json.loads(run("bounces", "stats", "--hours", "48").stdout)
    assert stats["by_workspace_and_type"] == [] and "since" in stats
