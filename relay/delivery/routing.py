"""Priority routing with failover (runbook 1.3 and appendix B: Gmail first, Mailgun backup).

Each workspace has an ordered provider list. For each message the router walks it:
a provider whose circuit is open is skipped; a provider-wide failure, or recipients the
provider could only defer, move on to the next provider at once; a permanent answer for a
recipient stands (another provider would be refused the same way).

Every provider has a circuit breaker. It opens after `failure_threshold` consecutive
provider-wide failures, or when the share of failures among the last `window` attempts
passes `error_rate`; after `cooldown` it lets one probe through (half-open), and closes
again when the probe succeeds. Failures the provider explains are handled by kind:
throttling and spent quotas open the circuit until the provider's own retry time;
rejected credentials, a domain policy or a wrong endpoint open it for `fatal_cooldown`,
since only a person can fix them - the health report says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import metrics
from relay.config import BreakerSettings, ProviderLimits, Settings
from relay.delivery.providers.base import (
    Envelope,
    Outcome,
    Provider,
    ProviderError,
    RecipientResult,
)
from relay.delivery.retry import ProviderAttempt
from relay.limits import TokenBucket
from relay.logs import event
from relay.queue.model import ClaimedMessage

log = logging.getLogger("relay.routing")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_MAX_COOLDOWN_S = 600.0


@dataclass
class CircuitBreaker:
    settings: BreakerSettings
    clock: Callable[[], float] = time.monotonic
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_until: float = 0.0
    cooldown_s: float = 0.0
    probing: bool = False
    last_error: str | None = None
    last_error_kind: str | None = None
    recent: deque[bool] = field(default_factory=deque)

    def allow(self) -> bool:
        """Whether a send may go to this provider now (claims the probe when half-open)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() >= self.opened_until:
            self.state = HALF_OPEN
            self.probing = False
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self._remember(True)
        self.state = CLOSED
        self.consecutive_failures = 0
        self.cooldown_s = 0.0
        self.probing = False
        self.last_error_kind = None

    def failure(self, error: ProviderError) -> None:
        self._remember(False)
        self.consecutive_failures += 1
        self.last_error = error.detail[:300]
        self.last_error_kind = error.kind
        self.probing = False
        s = self.settings
        if error.retry_after is not None and error.kind in ("rate_limited", "quota"):
            self._open(max(error.retry_after, 1.0))
        elif not error.transient:
            self._open(s.fatal_cooldown.total_seconds())
        elif self.state == HALF_OPEN:
            # The probe failed: wait longer before the next one.
            self._open(min(max(self.cooldown_s * 2, s.cooldown.total_seconds()), _MAX_COOLDOWN_S))
        elif self.consecutive_failures >= s.failure_threshold or self._error_rate_exceeded():
            self._open(s.cooldown.total_seconds())

    def _open(self, seconds: float) -> None:
        self.state = OPEN
        self.cooldown_s = seconds
        self.opened_until = self.clock() + seconds

    def _remember(self, ok: bool) -> None:
        self.recent.append(ok)
        while len(self.recent) > self.settings.window:
            self.recent.popleft()

    def _error_rate_exceeded(self) -> bool:
        if len(self.recent) < self.settings.window:
            return False
        failures = sum(1 for ok in self.recent if not ok)
        return failures / len(self.recent) >= self.settings.error_rate

    def retry_in(self) -> float | None:
        if self.state != OPEN:
            return None
        return max(0.0, self.opened_until - self.clock())


class RoutedProvider:
    """A provider with its breaker, concurrency limit and send rate."""

    def __init__(self, provider: Provider, breaker: CircuitBreaker, limits: ProviderLimits) -> None:
        self.provider = provider
        self.breaker = breaker
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self.bucket = (
            TokenBucket(limits.rate_per_second, limits.rate_per_second, limits.rate_per_second)
            if limits.rate_per_second
            else None
        )
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None

    async def pace(self) -> None:
        """Wait for a token of this provider's send rate."""
        if self.bucket is not None:
            await asyncio.sleep(self.bucket.reserve())


@dataclass(frozen=True)
class RouteResult:
    attempts: list[ProviderAttempt]
    errors: list[str]
    tried: list[str]
    skipped: list[str]


class Router:
    def __init__(self, providers: Mapping[str, Provider], settings: Settings) -> None:
        self.settings = settings
        delivery = settings.delivery
        self.routes = {
            name: RoutedProvider(
                provider,
                CircuitBreaker(delivery.breaker),
                delivery.provider_limits.get(name, ProviderLimits()),
            )
            for name, provider in providers.items()
        }
        self.attempt_timeout_s = delivery.attempt_timeout.total_seconds()

    def order_for(self, workspace_id: str) -> list[str]:
        workspace = self.settings.workspaces.get(workspace_id)
        if workspace is not None and workspace.providers:
            return list(workspace.providers)
        return list(self.settings.delivery.providers)

    async def route(
        self, message: ClaimedMessage, content: bytes, *, mail_from: str | None = None
    ) -> RouteResult:
        remaining = list(message.recipients)
        attempts: list[ProviderAttempt] = []
        errors: list[str] = []
        tried: list[str] = []
        skipped: list[str] = []
        for name in self.order_for(message.workspace_id):
            if not remaining:
                break
            route = self.routes[name]
            if not route.breaker.allow():
                skipped.append(name)
                continue
            envelope = Envelope(
                message_id=message.id,
                mail_from=message.from_email if mail_from is None else mail_from,
                rcpt_tos=tuple(r.address for r in remaining),
                mail_options=message.mail_options,
            )
            tried.append(name)
            try:
                results = await self._send(route, envelope, content)
            except ProviderError as exc:
                was = route.breaker.state
                route.breaker.failure(exc)
                if route.breaker.state == OPEN and was != OPEN:
                    # The reason's kind only: the detail may quote the provider's reply.
                    event(
                        log,
                        "provider.circuit_opened",
                        logging.WARNING,
                        provider=name,
                        kind=exc.kind,
                        retry_in_s=round(route.breaker.cooldown_s, 1),
                    )
                route.last_failure_at = time.time()
                metrics.provider_requests_total.labels(name, exc.kind).inc()
                metrics.errors_total.labels("provider").inc()
                metrics.provider_health.labels(name).set(int(route.breaker.state == CLOSED))
                errors.append(exc.detail)
                if exc.maybe_delivered:
                    break
                continue
            if route.breaker.state != CLOSED:
                event(log, "provider.circuit_closed", provider=name)
            route.breaker.success()
            route.last_success_at = time.time()
            metrics.child(metrics.provider_requests_total, name, "success").inc()
            metrics.child(metrics.provider_health, name).set(1)
            by_address = {result.address: result for result in results}
            outcome = {
                r.row_id: by_address[r.address] for r in remaining if r.address in by_address
            }
            attempts.append(ProviderAttempt(name, outcome))
            # Recipients this provider could only defer go to the next one at once.
            remaining = [
                r
                for r in remaining
                if r.row_id not in outcome or outcome[r.row_id].outcome is Outcome.TRANSIENT
            ]
        if remaining and skipped and not tried:
            errors.append(f"no provider available ({', '.join(skipped)}: circuit open)")
        return RouteResult(attempts, errors, tried, skipped)

    async def _send(
        self, route: RoutedProvider, envelope: Envelope, content: bytes
    ) -> Sequence[RecipientResult]:
        async with route.slots:
            await route.pace()
            # asyncio.timeout, not wait_for: wait_for (Python 3.11) runs the send as a task
            # of its own, a task and its scheduling for every message.
            try:
                async with asyncio.timeout(self.attempt_timeout_s):
                    return await route.provider.send(envelope, content)
            except TimeoutError:
                raise ProviderError(
                    f"{route.provider.name}: no answer within {self.attempt_timeout_s:.0f}s"
                ) from None

    def health(self) -> list[dict[str, Any]]:
        """One entry per provider, for /api/providers/health, /health and the metrics."""
        report = []
        for name, route in self.routes.items():
            breaker = route.breaker
            report.append(
                {
                    "provider": name,
                    "healthy": breaker.state == CLOSED,
                    "state": breaker.state,
                    "consecutive_failures": breaker.consecutive_failures,
                    "last_error": breaker.last_error,
                    "last_error_kind": breaker.last_error_kind,
                    "needs_attention": breaker.last_error_kind
                    in ("credentials", "policy", "config"),
                    "retry_in_seconds": breaker.retry_in(),
                    "last_success_at": route.last_success_at,
                    "last_failure_at": route.last_failure_at,
                }
            )
        return report

    async def close(self) -> None:
        for route in self.routes.values():
            await route.provider.close()
