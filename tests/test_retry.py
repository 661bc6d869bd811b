"""The retry policy as pure functions: no clock, no database."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from relay.delivery.providers.base import Outcome, RecipientResult
from relay.delivery.retry import ProviderAttempt, RetryPolicy, decide
from relay.queue import ClaimedMessage, DeliveryStatus, MessageStatus, PendingRecipient

NOW = datetime(2026, 12, 4, 12, 0, 0)
POLICY = RetryPolicy(timedelta(minutes=1), timedelta(hours=1), timedelta(days=5))


def message(*addresses: str, retry_count: int = 0, age: timedelta = timedelta()) -> ClaimedMessage:
    return ClaimedMessage(
        id="M",
        workspace_id="default",
        from_email="a@example.org",
        retry_count=retry_count,
        queued_at=NOW - age,
        size_bytes=10,
        mail_options=(),
        recipients=tuple(PendingRecipient(n, a) for n, a in enumerate(addresses, 1)),
    )


def attempt(provider: str, *outcomes: tuple[int, Outcome, str]) -> ProviderAttempt:
    return ProviderAttempt(
        provider, {row: RecipientResult(f"r{row}", o, d, "pid") for row, o, d in outcomes}
    )


def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [POLICY.delay(n, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, 1):
        step = min(timedelta(minutes=1) * 2 ** (n - 1), timedelta(hours=1))
        assert step / 2 <= delay <= step
    assert max(delays) <= timedelta(hours=1)
    assert len({round(d.total_seconds()) for d in delays}) > 5, "jitter spreads retries"


def test_all_delivered_is_sent() -> None:
    result = decide(
        message("x", "y"),
        [attempt("p", (1, Outcome.DELIVERED, ""), (2, Outcome.DELIVERED, ""))],
        policy=POLICY,
        now=NOW,
    )
    assert result.status is MessageStatus.SENT
    assert [u.status for u in result.recipients] == [DeliveryStatus.SENT] * 2
    assert all(u.sent_at == NOW and u.provider == "p" for u in result.recipients)


def test_transient_failure_defers_only_that_recipient() -> None:
    result = decide(
        message("x", "y", retry_count=2),
        [attempt("p", (1, Outcome.DELIVERED, ""), (2, Outcome.TRANSIENT, "451 later"))],
        policy=POLICY,
        now=NOW,
        rng=random.Random(1),
    )
    assert result.status is MessageStatus.QUEUED
    assert result.retry_count == 3
    assert result.next_attempt_at is not None
    assert NOW + timedelta(minutes=2) <= result.next_attempt_at <= NOW + timedelta(minutes=4)
    assert [u.status for u in result.recipients] == [DeliveryStatus.SENT, DeliveryStatus.DEFERRED]
    assert "451 later" in (result.error or "")


def test_permanent_failure_fails_without_retry() -> None:
    result = decide(
        message("x"),
        [attempt("p", (1, Outcome.PERMANENT, "550 unknown user"))],
        policy=POLICY,
        now=NOW,
    )
    assert result.status is MessageStatus.FAILED
    assert result.next_attempt_at is None
    assert result.recipients[0].error == "550 unknown user"


def test_a_later_providers_answer_replaces_an_earlier_transient_one() -> None:
    result = decide(
        message("x"),
        [
            attempt("primary", (1, Outcome.TRANSIENT, "503")),
            attempt("backup", (1, Outcome.DELIVERED, "")),
        ],
        policy=POLICY,
        now=NOW,
    )
    assert result.status is MessageStatus.SENT
    assert result.recipients[0].provider == "backup"


def test_no_provider_answer_is_transient_with_the_provider_errors() -> None:
    result = decide(
        message("x"), [], policy=POLICY, now=NOW, provider_error="smarthost: cannot connect"
    )
    assert result.status is MessageStatus.QUEUED
    assert result.recipients[0].error == "smarthost: cannot connect"


def test_transient_failures_past_max_age_fail_for_good() -> None:
    result = decide(
        message("x", age=timedelta(days=5, seconds=1)),
        [attempt("p", (1, Outcome.TRANSIENT, "451 later"))],
        policy=POLICY,
        now=NOW,
    )
    assert result.status is MessageStatus.FAILED
    assert result.recipients[0].error.startswith("gave up after 5 days")  # type: ignore[union-attr]
