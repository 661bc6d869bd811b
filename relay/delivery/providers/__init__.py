"""Delivery providers, built by name from configuration."""

from __future__ import annotations

import asyncio

from relay.config import (
    GmailProviderSettings,
    MailgunProviderSettings,
    OutboxProviderSettings,
    Settings,
    SmtpProviderSettings,
)
from relay.delivery.providers.base import (
    Envelope,
    Outcome,
    Provider,
    ProviderError,
    RecipientResult,
)
from relay.delivery.providers.gmail import GmailProvider
from relay.delivery.providers.mailgun import MailgunProvider
from relay.delivery.providers.outbox import OutboxProvider
from relay.delivery.providers.smtp import SmtpProvider

__all__ = [
    "Envelope",
    "GmailProvider",
    "MailgunProvider",
    "OutboxProvider",
    "Outcome",
    "Provider",
    "ProviderError",
    "RecipientResult",
    "SmtpProvider",
    "build_providers",
    "validate_all",
]


def build_providers(settings: Settings) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, spec in settings.providers.items():
        if isinstance(spec, OutboxProviderSettings):
            providers[name] = OutboxProvider(name, spec.directory)
        elif isinstance(spec, SmtpProviderSettings):
            providers[name] = SmtpProvider(name, spec)
        elif isinstance(spec, GmailProviderSettings):
            providers[name] = GmailProvider(name, spec)
        elif isinstance(spec, MailgunProviderSettings):
            providers[name] = MailgunProvider(name, spec)
    return providers


async def validate_all(
    providers: dict[str, Provider], timeout_s: float = 30.0
) -> list[dict[str, object]]:
    """Check every provider's credentials and reachability at once, sending no mail."""

    async def one(name: str, provider: Provider) -> dict[str, object]:
        try:
            await asyncio.wait_for(provider.check(), timeout=timeout_s)
        except ProviderError as exc:
            return {"provider": name, "ok": False, "kind": exc.kind, "error": exc.detail}
        except TimeoutError:
            return {
                "provider": name,
                "ok": False,
                "kind": "unavailable",
                "error": f"no answer within {timeout_s:.0f}s",
            }
        return {"provider": name, "ok": True, "kind": None, "error": None}

    return list(await asyncio.gather(*(one(n, p) for n, p in providers.items())))
