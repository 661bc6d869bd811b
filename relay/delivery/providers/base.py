"""The provider seam: anything that can hand a message on (smarthost, outbox, HTTP APIs).

A provider reports one outcome per recipient. Outcomes are classified where the provider's
protocol is understood, in the provider, so that routing and retry decide on three words:
delivered, transient (try again later or elsewhere), permanent (this recipient will never
take this message).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RecipientResult:
    address: str
    outcome: Outcome
    detail: str = ""
    provider_message_id: str | None = None


@dataclass(frozen=True)
class Envelope:
    """What a provider needs besides the bytes: who from, who to, and the queue id."""

    message_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...] = ()


ERROR_KINDS = ("unavailable", "credentials", "rate_limited", "quota", "policy", "config")


class ProviderError(Exception):
    """The attempt failed as a whole (connection refused, timeout, credentials rejected).

    `transient` says whether the same provider may succeed later. A provider-wide failure is
    never a verdict on the recipients: routing tries the next provider.

    `kind` tells routing why, one of `ERROR_KINDS`: "unavailable" (network, timeouts, 5xx),
    "credentials" (rejected or expired; an operator must renew them), "rate_limited" (back
    off for `retry_after` seconds), "quota" (a daily allowance is spent; `retry_after` runs
    to its reset), "policy" (the provider's own rules forbid this sender or account),
    "config" (endpoint, domain or region wrong). `retry_after` is in seconds, when known.

    `maybe_delivered`: the failure came after the whole message reached the provider, which
    may have taken it. Routing then tries no other provider in this attempt: the message
    goes back to the queue, so that a copy is sent, if ever, after a backoff and on record.
    """

    def __init__(
        self,
        detail: str,
        *,
        transient: bool = True,
        kind: str = "unavailable",
        retry_after: float | None = None,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.transient = transient
        self.kind = kind
        self.retry_after = retry_after
        self.maybe_delivered = maybe_delivered


class Provider(Protocol):
    name: str

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        """Deliver content to every envelope recipient; one result per recipient."""

    async def check(self) -> None:
        """Verify reachability and credentials without sending mail; raise ProviderError."""

    async def close(self) -> None: ...
