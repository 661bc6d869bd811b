"""What an attempt's per-recipient results mean for the message: the retry policy.

Pure functions of (message, results, now), so the policy is tested without a clock or a
database. Transient failures back off exponentially with jitter, like Postfix's queue
manager, until the message is older than max_age; then they fail for good.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from relay.delivery.providers.base import Outcome, RecipientResult
from relay.queue.model import (
    AttemptResult,
    ClaimedMessage,
    DeliveryStatus,
    MessageStatus,
    RecipientUpdate,
)


@dataclass(frozen=True)
class RetryPolicy:
    min_backoff: timedelta
    max_backoff: timedelta
    max_age: timedelta

    def delay(self, retry_count: int, rng: random.Random | None = None) -> timedelta:
        """Backoff before retry number `retry_count` (1-based): doubling, capped, jittered.

        The jitter (between half and all of the step) spreads a provider outage's backlog so
        that every replica does not retry the same second the provider comes back.
        """
        step = self.min_backoff * (1 << min(max(retry_count - 1, 0), 30))
        step = min(step, self.max_backoff)
        factor = 0.5 + (rng or random).random() * 0.5
        return max(self.min_backoff / 2, step * factor)


@dataclass(frozen=True)
class ProviderAttempt:
    """The results one provider gave, keyed by recipient row."""

    provider: str
    results: dict[int, RecipientResult]


def decide(
    message: ClaimedMessage,
    attempts: Sequence[ProviderAttempt],
    *,
    policy: RetryPolicy,
    now: datetime,
    provider_error: str | None = None,
    rng: random.Random | None = None,
) -> AttemptResult:
    """Fold one delivery attempt (possibly over several providers) into the message's fate."""
    expired = now - message.queued_at >= policy.max_age
    final: dict[int, tuple[str, RecipientResult]] = {}
    for attempt in attempts:
        for row_id, result in attempt.results.items():
            # A later provider's answer for the same recipient replaces an earlier
            # transient one (failover); delivered and permanent answers stand.
            previous = final.get(row_id)
            if previous is None or previous[1].outcome is Outcome.TRANSIENT:
                final[row_id] = (attempt.provider, result)

    updates: list[RecipientUpdate] = []
    pending = failed = 0
    errors: list[str] = []
    for recipient in message.recipients:
        provider, result = final.get(
            recipient.row_id,
            ("", RecipientResult(recipient.address, Outcome.TRANSIENT, provider_error or "")),
        )
        if result.outcome is Outcome.DELIVERED:
            updates.append(
                RecipientUpdate(
                    recipient.row_id,
                    DeliveryStatus.SENT,
                    None,
                    provider,
                    result.provider_message_id,
                    now,
                )
            )
            continue
        detail = result.detail or "no detail given"
        if result.outcome is Outcome.PERMANENT or expired:
            if result.outcome is Outcome.TRANSIENT:
                detail = f"gave up after {policy.max_age}: {detail}"
            failed += 1
            errors.append(detail)
            updates.append(
                RecipientUpdate(recipient.row_id, DeliveryStatus.FAILED, detail, provider or None)
            )
        else:
            pending += 1
            errors.append(detail)
            updates.append(
                RecipientUpdate(recipient.row_id, DeliveryStatus.DEFERRED, detail, provider or None)
            )

    if pending:
        retry_count = message.retry_count + 1
        return AttemptResult(
            status=MessageStatus.QUEUED,
            error=_summary(errors, pending, "deferred"),
            retry_count=retry_count,
            next_attempt_at=now + policy.delay(retry_count, rng),
            finished_at=now,
            recipients=tuple(updates),
        )
    if failed:
        return AttemptResult(
            status=MessageStatus.FAILED,
            error=_summary(errors, failed, "failed"),
            retry_count=message.retry_count,
            next_attempt_at=None,
            finished_at=now,
            recipients=tuple(updates),
        )
    return AttemptResult(
        status=MessageStatus.SENT,
        error=None,
        retry_count=message.retry_count,
        next_attempt_at=None,
        finished_at=now,
        recipients=tuple(updates),
    )


def _summary(errors: list[str], count: int, word: str) -> str:
    first = errors[0] if errors else ""
    text = f"{count} recipient(s) {word}: {first}"
    return text[:2000]
