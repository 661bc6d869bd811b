"""Rate limits and quotas (runbook 4.7 and 7.2).

Two kinds, with different guarantees:

- The per-second token bucket (burst 100, refill 10/s by default) lives in each relay
  process. With N replicas behind one Service a workspace can therefore send up to N times
  the configured rate; configure `rate_limit_refill` as the per-replica share if the total
  matters. It exists to absorb bursts cheaply, without a database round trip per message.
- Daily quotas (`workspace_daily`, `per_user_daily`, counted in recipients per UTC day)
  are kept in the database and charged in the same transaction that accepts the message,
  so they are exact across any number of replicas.

Temporary overrides (the runbook's "temporarily increase limits") are stored in the
database too, with an expiry: every replica applies them, and they lapse by themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from relay.config import RateLimits

_OVERRIDE_CACHE_S = 5.0


@dataclass
class TokenBucket:
    capacity: float
    refill_per_s: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def reserve(self, now: float | None = None) -> float:
        """Take a token now, going into debt if need be; returns the seconds to wait."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now
        self.tokens -= 1
        return max(0.0, -self.tokens / self.refill_per_s)

    def remaining(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)


@dataclass(frozen=True)
class Override:
    """A temporary raise of a workspace's limits; None fields keep the configured value."""

    workspace_id: str
    expires_at: datetime
    workspace_daily: int | None = None
    per_user_daily: int | None = None
    rate_limit_burst: int | None = None
    rate_limit_refill: float | None = None
    created_by: str | None = None

    def apply(self, limits: RateLimits) -> RateLimits:
        changes = {
            name: getattr(self, name)
            for name in (
                "workspace_daily",
                "per_user_daily",
                "rate_limit_burst",
                "rate_limit_refill",
            )
            if getattr(self, name) is not None
        }
        return limits.model_copy(update=changes)


@dataclass(frozen=True)
class QuotaCharge:
    """What accepting one message costs against the daily quotas (checked at commit)."""

    workspace_id: str
    user_key: str
    day: str
    recipients: int
    workspace_daily: int | None
    per_user_daily: int | None


class QuotaExceeded(Exception):
    """The daily quota would be passed; args[0] says which."""


class RateLimiter:
    """The in-process buckets, one per workspace and one per sender within it.

    `share` is the number of processes of one relay accepting mail (`smtp.processes`):
    each holds that fraction of every bucket, so that together they allow the configured
    rate. A client whose sessions all land on one process meets its limit early.
    """

    def __init__(self, share: int = 1) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.share = share

    def take(self, limits: RateLimits, workspace_id: str, sender_key: str) -> str | None:
        """None when allowed; otherwise which bucket is empty."""
        for key in ((workspace_id, ""), (workspace_id, sender_key)):
            bucket = self._bucket(key, limits)
            if not bucket.take():
                return "workspace" if key[1] == "" else "sender"
        return None

    def remaining(self, workspace_id: str) -> float | None:
        bucket = self._buckets.get((workspace_id, ""))
        return bucket.remaining() if bucket else None

    def _bucket(self, key: tuple[str, str], limits: RateLimits) -> TokenBucket:
        # At least one token per process, or a burst smaller than the process count
        # would refuse everything.
        capacity = max(1.0, limits.rate_limit_burst / self.share)
        refill = limits.rate_limit_refill / self.share
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(capacity, refill, capacity)
            self._buckets[key] = bucket
        elif (bucket.capacity, bucket.refill_per_s) != (capacity, refill):
            # An override started or lapsed: keep the tokens, change the shape.
            bucket.capacity = capacity
            bucket.refill_per_s = refill
        if len(self._buckets) > 100_000:
            # Sender buckets are per address: bound the memory an abusive client can claim.
            self._buckets = {k: v for k, v in self._buckets.items() if k[1] == ""}
            self._buckets[key] = bucket
        return bucket


class OverrideCache:
    """Overrides read from the database at most every few seconds per replica."""

    def __init__(self) -> None:
        self._overrides: dict[str, Override] = {}
        self._loaded_at = -_OVERRIDE_CACHE_S

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at > _OVERRIDE_CACHE_S

    def invalidate(self) -> None:
        """Read again at the next use (this replica just changed them)."""
        self._loaded_at = -_OVERRIDE_CACHE_S

    def current(self) -> list[Override]:
        return list(self._overrides.values())

    def load(self, overrides: list[Override]) -> None:
        self._overrides = {o.workspace_id: o for o in overrides}
        self._loaded_at = time.monotonic()

    def effective(self, workspace_id: str, limits: RateLimits, now: datetime) -> RateLimits:
        override = self._overrides.get(workspace_id)
        if override is None or override.expires_at <= now:
            return limits
        return override.apply(limits)
