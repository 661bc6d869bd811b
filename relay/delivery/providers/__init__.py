"""Delivery providers, built by name from configuration."""

from __future__ import annotations

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
