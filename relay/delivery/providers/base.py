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


class ProviderError(Exception):
    """The attempt failed as a whole (connection refused, timeout, credentials rejected).

    `transient` says whether the same provider may succeed later. A provider-wide failure is
    never a verdict on the recipients: routing tries the next provider.
    """

    def __init__(self, detail: str, *, transient: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.transient = transient


class Provider(Protocol):
    name: str

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        """Deliver content to every envelope recipient; one result per recipient."""

    async def check(self) -> None:
        """Verify reachability and credentials without sending mail; raise ProviderError."""

    async def close(self) -> None: ...
