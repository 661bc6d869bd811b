"""The relay's configuration: environment variables and an optional YAML file.

Every key is validated at start-up. A bad key stops the relay with a message that names the
key, where it came from and why it is wrong; unknown keys are errors too, so a typo never
silently falls back to a default.

Precedence, highest first: environment (``RELAY_<SECTION>__<KEY>``), then the YAML file named
by ``--config`` or ``RELAY_CONFIG``, then the defaults below. The defaults are the embedded
mode: SQLite queue, outbox provider, SMTP on 127.0.0.1:2525, HTTP on 127.0.0.1:8080.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import idna
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "RELAY_"
CONFIG_PATH_ENV = "RELAY_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> Any:
    """Accept the runbook's spelling of durations ("10s", "5m", "5d") as well as numbers."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 2h, 5d)")
        return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    raise ValueError("not a duration")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Network = IPv4Network | IPv6Network


class TlsSettings(_Section):
    """Certificate for STARTTLS and the implicit-TLS port; files are re-read when they change."""

    cert_file: Path | None = Field(None, description="PEM certificate chain.")
    key_file: Path | None = Field(None, description="PEM private key.")
    implicit_port: int | None = Field(
        None, ge=0, le=65535, description="Also listen here with TLS from the first byte (465)."
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.implicit_port is not None and self.cert_file is None:
            raise ValueError("implicit_port needs cert_file and key_file")
        return self


def _loopback() -> list[Network]:
    return [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]


def _count_not_bool(value: Any) -> Any:
    # YAML's true would otherwise pass as 1: a typo must not start a different relay.
    if isinstance(value, bool):
        raise ValueError("must be a whole number of processes, not true/false")
    return value


# smtp.processes, delivery.processes
ProcessCount = Annotated[int, BeforeValidator(_count_not_bool), Field(ge=1, le=64)]


class SmtpSettings(_Section):
    """The SMTP listener that client applications submit mail to."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(2525, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    hostname: str = Field(
        default_factory=socket.getfqdn, description="Name used in the greeting and trace header."
    )
    max_message_size: int = Field(
        25 * 1024 * 1024,
        ge=1024,
        description="Largest message accepted, in bytes; advertised with SIZE, 552 past it.",
    )
    max_recipients: int = Field(1000, ge=1, description="Recipients per message; 452 past it.")
    idle_timeout: Duration = Field(
        timedelta(minutes=5),
        description="Time allowed between commands (and for DATA) before the session is closed.",
    )
    max_connections: int = Field(1000, ge=1, description="Concurrent sessions in all.")
    max_connections_per_ip: int = Field(50, ge=1, description="Concurrent sessions per client.")
    max_errors: int = Field(
        10, ge=1, description="Error replies in one session before it is disconnected."
    )
    workspace: str = Field(
        "default",
        min_length=1,
        max_length=255,
        description="Workspace for unauthenticated mail from trusted_networks.",
    )
    trusted_networks: list[Network] = Field(
        default_factory=lambda: _loopback(),
        description="Clients that may relay without AUTH. Everyone else must authenticate.",
    )
    plaintext_auth_networks: list[Network] = Field(
        default_factory=list,
        description="Clients offered AUTH without TLS. Elsewhere AUTH needs STARTTLS first.",
    )
    tls: TlsSettings = TlsSettings()
    processes: ProcessCount = Field(
        1,
        description=(
            "Processes accepting SMTP on the shared listening sockets (mysql queue only);"
            " connection limits count the sessions of all of them, rate buckets are split"
            " evenly between them."
        ),
    )


class RateLimits(_Section):
    """Per-workspace limits (runbook 4.7 and 7.2)."""

    rate_limit_burst: int = Field(100, ge=1, description="Token bucket size, in messages.")
    rate_limit_refill: float = Field(10, gt=0, description="Tokens added per second.")
    workspace_daily: int | None = Field(
        None, ge=0, description="Recipients per UTC day for the workspace, exact across replicas."
    )
    per_user_daily: int | None = Field(
        None, ge=0, description="Recipients per UTC day per sender (AUTH user or address)."
    )


class UserSettings(_Section):
    password_hash: str = Field(
        pattern=r"^\$argon2(id|i|d)\$",
        description="Argon2 hash from `smtp-relay hash-password`; plain passwords are refused.",
    )


class WorkspaceSettings(_Section):
    """A tenant: who may submit, from where, as whom, and how much."""

    users: dict[str, UserSettings] = Field(
        default_factory=dict, description="SMTP AUTH user names and their password hashes."
    )
    sender_domains: list[str] = Field(
        default_factory=list,
        description="Domains the envelope sender may use; '*.example.org' includes subdomains. "
        "Empty: any sender.",
    )
    client_networks: list[Network] = Field(
        default_factory=list,
        description="If set, this workspace's users may only connect from here.",
    )
    providers: list[str] | None = Field(
        None, description="Provider order for this workspace (default: delivery.providers)."
    )
    limits: RateLimits = RateLimits()

    @field_validator("sender_domains")
    @classmethod
    def _a_labels(cls, domains: list[str]) -> list[str]:
        # Compared with envelope domains, which ingest converts to IDNA2008 A-labels.
        result = []
        for domain in domains:
            wildcard, name = ("*.", domain[2:]) if domain.startswith("*.") else ("", domain)
            name = name.lower().rstrip(".")
            if not name.isascii():
                name = idna.encode(name, uts46=True).decode("ascii")
            result.append(wildcard + name)
        return result


class AdminToken(_Section):
    """A bearer token for the admin API; its name is what the audit log records."""

    name: str = Field(min_length=1, max_length=64, description="Who holds it (audit user).")
    token: SecretStr | None = Field(None, description="The token (prefer token_file).")
    token_file: Path | None = Field(None, description="File holding the token.")

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError("token must be at least 16 characters")
        return self

    def value(self) -> str:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        assert self.token is not None
        return self.token.get_secret_value()


class HttpSettings(_Section):
    """Health, metrics and the admin API."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    enabled: bool = Field(True, description="Serve HTTP at all.")
    admin_tokens: list[AdminToken] = Field(
        default_factory=list,
        description="Bearer tokens for /api and /validate. None: the admin API refuses all.",
    )


class SqliteSettings(_Section):
    path: Path = Field(Path("var/relay.db"), description="Database file (created if missing).")


class MysqlSettings(_Section):
    host: str = Field("127.0.0.1", description="Server host name.")
    port: int = Field(3306, ge=1, le=65535, description="Server port.")
    unix_socket: str | None = Field(None, description="Unix socket path, instead of host/port.")
    user: str = Field("relay", description="User name.")
    password: SecretStr | None = Field(None, description="Password (prefer password_file).")
    password_file: Path | None = Field(
        None, description="File holding the password, e.g. a mounted Kubernetes Secret."
    )
    database: str = Field("relay", description="Schema name.")
    max_connections: int = Field(
        50, ge=1, le=1000, description="Connection pool size (runbook 7.2: db_max_connections)."
    )
    min_connections: int = Field(1, ge=0, description="Connections kept open when idle.")
    conn_lifetime: Duration = Field(
        timedelta(seconds=300), description="Recycle connections older than this."
    )
    connect_timeout: Duration = Field(timedelta(seconds=5), description="Connect timeout.")

    def resolved_password(self) -> str:
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        return self.password.get_secret_value() if self.password else ""


class QueueSettings(_Section):
    """Where accepted mail is stored until it is delivered."""

    backend: Literal["sqlite", "mysql"] = Field(
        "sqlite", description="sqlite: embedded, one machine. mysql: MySQL 8 / MariaDB 10.6+."
    )
    sqlite: SqliteSettings = SqliteSettings()
    mysql: MysqlSettings = MysqlSettings()


class BreakerSettings(_Section):
    """When a provider is taken out of rotation, and when it is tried again."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    error_rate: float = Field(
        0.5, gt=0, le=1, description="Failure share over the window that opens it."
    )
    window: int = Field(20, ge=2, description="Recent attempts the error rate is taken over.")
    cooldown: Duration = Field(
        timedelta(seconds=30), description="Open time before a probe (doubles per failed probe)."
    )
    fatal_cooldown: Duration = Field(
        timedelta(minutes=5),
        description="Open time after rejected credentials or policy: a person must act.",
    )


class ProviderLimits(_Section):
    max_concurrency: int = Field(10, ge=1, description="Sends in flight to this provider.")
    rate_per_second: float | None = Field(
        None, gt=0, description="Sends started per second (the provider's published limit)."
    )


class DeliverySettings(_Section):
    """Delivery workers (runbook 7.2) and the retry policy."""

    enabled: bool = Field(
        True,
        description="Run delivery workers here. false: an ingest-only replica, or a relay "
        "holding all mail (Postfix's hold queue) while others deliver.",
    )
    worker_count: int = Field(10, ge=1, le=1000, description="Concurrent deliveries.")
    batch_size: int = Field(50, ge=1, le=1000, description="Messages claimed per query.")
    process_interval: Duration = Field(
        timedelta(seconds=10),
        description="Poll period for mail queued by other replicas; local mail wakes at once.",
    )
    lease: Duration = Field(
        timedelta(minutes=5),
        description="How long a claim lasts without renewal before another worker may retry it.",
    )
    max_age: Duration = Field(
        timedelta(days=5),
        description="A message still failing transiently after this long fails permanently.",
    )
    min_backoff: Duration = Field(timedelta(seconds=60), description="First retry delay.")
    max_backoff: Duration = Field(timedelta(hours=1), description="Longest retry delay.")
    providers: list[str] = Field(
        default_factory=lambda: ["outbox"],
        min_length=1,
        description="Provider names tried in order for each message.",
    )
    shutdown_grace: Duration = Field(
        timedelta(seconds=25),
        description="On SIGTERM, time allowed for sessions and deliveries in flight to finish.",
    )
    attempt_timeout: Duration = Field(
        timedelta(minutes=5),
        description="Hard limit on one provider send, over the provider's own timeouts.",
    )
    breaker: BreakerSettings = BreakerSettings()
    provider_limits: dict[str, ProviderLimits] = Field(
        default_factory=dict, description="Concurrency and rate per provider name."
    )
    processes: ProcessCount = Field(
        1,
        description=(
            "Processes running delivery workers (mysql queue only). worker_count, the"
            " provider limits and the providers' max_connections stay the relay's totals:"
            " each process gets its share."
        ),
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliverySettings:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff must not exceed max_backoff")
        return self


class OutboxProviderSettings(_Section):
    type: Literal["outbox"]
    directory: Path = Field(Path("var/outbox"), description="Where delivered .eml files go.")


class SmtpProviderSettings(_Section):
    type: Literal["smtp"]
    host: str = Field(description="Smarthost name or address.")
    port: int = Field(587, ge=1, le=65535, description="Smarthost port.")
    tls: Literal["starttls", "implicit", "opportunistic", "none"] = Field(
        "starttls",
        description="starttls: STARTTLS required (default). implicit: TLS from the first byte. "
        "opportunistic: STARTTLS when offered. none: plaintext (trusted local peers only).",
    )
    verify_certificate: bool = Field(True, description="Check the smarthost's certificate.")
    ca_file: Path | None = Field(None, description="CA bundle for the smarthost's certificate.")
    username: str | None = Field(None, description="AUTH user name.")
    password: SecretStr | None = Field(None, description="AUTH password (prefer password_file).")
    password_file: Path | None = Field(None, description="File holding the AUTH password.")
    timeout: Duration = Field(timedelta(seconds=30), description="Per-command timeout.")
    max_connections: int = Field(8, ge=1, le=256, description="Connections kept to the peer.")
    local_hostname: str | None = Field(None, description="Name sent in EHLO.")

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        return self.password.get_secret_value() if self.password else None


_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def _api_url(value: str) -> str:
    """Credentials travel to this URL: TLS required, plain http only to this machine (tests)."""
    parts = urlsplit(value)
    # The value is not quoted back: a URL with user:password@ in it would be a leak.
    if not parts.hostname or parts.query or parts.fragment:
        raise ValueError("not an API root URL (scheme://host[:port][/path])")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials; use the key and secret settings")
    if parts.scheme != "https" and not (
        parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS
    ):
        raise ValueError("must be https:// (plain http:// only to 127.0.0.1, for tests)")
    return value.rstrip("/")


ApiUrl = Annotated[str, AfterValidator(_api_url)]


class GmailProviderSettings(_Section):
    """The Gmail API (users.messages.send) as one Google Workspace mailbox."""

    type: Literal["gmail"]
    user: str = Field(
        pattern=r"^(me|[^\s/@]+@[^\s/@]+)$",
        description="Mailbox that sends: its address (the delegated subject for a service "
        "account), or 'me' for the refresh token's own user.",
    )
    credentials: Literal["refresh_token", "service_account"] = Field(
        description="refresh_token: an OAuth client and a user's refresh token. "
        "service_account: a key with domain-wide delegation for the gmail.send scope.",
    )
    client_id: str | None = Field(None, description="OAuth client id (refresh_token).")
    client_secret: SecretStr | None = Field(
        None, description="OAuth client secret (prefer client_secret_file)."
    )
    client_secret_file: Path | None = Field(None, description="File holding the client secret.")
    refresh_token: SecretStr | None = Field(
        None, description="The user's OAuth refresh token (prefer refresh_token_file)."
    )
    refresh_token_file: Path | None = Field(None, description="File holding the refresh token.")
    service_account_key: SecretStr | None = Field(
        None, description="Service-account JSON key, as Google issues it (prefer the file)."
    )
    service_account_key_file: Path | None = Field(
        None, description="Service-account JSON key file, e.g. a mounted Kubernetes Secret."
    )
    api_base: ApiUrl = Field(
        "https://gmail.googleapis.com", description="Gmail API root (changed only for tests)."
    )
    token_uri: ApiUrl = Field(
        "https://oauth2.googleapis.com/token",
        description="OAuth token endpoint, also the JWT audience. The key file's own "
        "token_uri is not followed: this setting says where assertions go.",
    )
    timeout: Duration = Field(
        timedelta(seconds=30), description="Per-request timeout (runbook: provider_timeout)."
    )
    max_connections: int = Field(8, ge=1, le=256, description="HTTP connections kept to Google.")

    @model_validator(mode="after")
    def _credentials_complete(self) -> GmailProviderSettings:
        if self.credentials == "refresh_token":
            missing = [
                name
                for name, present in (
                    ("client_id", self.client_id),
                    ("client_secret", self.client_secret or self.client_secret_file),
                    ("refresh_token", self.refresh_token or self.refresh_token_file),
                )
                if not present
            ]
            if missing:
                raise ValueError(f"refresh_token credentials need {', '.join(missing)}")
        else:
            if not (self.service_account_key or self.service_account_key_file):
                raise ValueError("service_account credentials need service_account_key_file")
            if self.user == "me":
                raise ValueError("a service account must name the user's address, not 'me'")
        return self

    def resolved_client_secret(self) -> str:
        return _secret(self.client_secret, self.client_secret_file)

    def resolved_refresh_token(self) -> str:
        return _secret(self.refresh_token, self.refresh_token_file)

    def resolved_service_account_key(self) -> str:
        return _secret(self.service_account_key, self.service_account_key_file)


class MailgunProviderSettings(_Section):
    """Mailgun's sending API (messages.mime): the envelope recipients, the MIME as a file."""

    type: Literal["mailgun"]
    domain: str = Field(
        pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="Sending domain as registered at Mailgun.",
    )
    api_key: SecretStr | None = Field(None, description="Private API key (prefer api_key_file).")
    api_key_file: Path | None = Field(None, description="File holding the API key.")
    region: Literal["us", "eu"] = Field(
        "us", description="us: api.mailgun.net. eu: api.eu.mailgun.net (EU data residency)."
    )
    base_url: ApiUrl | None = Field(None, description="API root instead of region's (tests).")
    timeout: Duration = Field(
        timedelta(seconds=30), description="Per-request timeout (runbook: provider_timeout)."
    )
    max_connections: int = Field(8, ge=1, le=256, description="HTTP connections kept to Mailgun.")

    @model_validator(mode="after")
    def _key_present(self) -> MailgunProviderSettings:
        if not (self.api_key or self.api_key_file):
            raise ValueError("mailgun needs api_key_file (or api_key)")
        return self

    def resolved_api_key(self) -> str:
        return _secret(self.api_key, self.api_key_file)

    def api_root(self) -> str:
        if self.base_url is not None:
            return self.base_url
        return {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}[self.region]


def _secret(value: SecretStr | None, file: Path | None) -> str:
    # Read at each use, not at start-up, so a rotated Kubernetes Secret takes effect.
    if file is not None:
        return file.read_text().rstrip("\r\n")
    return value.get_secret_value() if value else ""


ProviderSettings = Annotated[
    OutboxProviderSettings | SmtpProviderSettings | GmailProviderSettings | MailgunProviderSettings,
    Field(discriminator="type"),
]


class BounceSettings(_Section):
    """Bounce processing and the suppression list (runbook 4.3; relay/bounces)."""

    verp_domain: str | None = Field(
        None,
        description="Domain of the VERP return paths (bounces+<id>-<row>-<tag>@domain). Mail "
        "for it is accepted from anyone, but only to validly tagged addresses, and is "
        "processed as a bounce, never relayed. None: no VERP, no inbound bounces.",
    )
    verp_key: SecretStr | None = Field(
        None, description="HMAC key tagging VERP addresses (prefer verp_key_file)."
    )
    verp_key_file: Path | None = Field(None, description="File holding the VERP key.")
    hard_bounce_threshold: int = Field(
        3, ge=1, le=1000, description="Hard bounces in a row that make an address INACTIVE."
    )
    soft_bounce_retry: Duration = Field(
        timedelta(hours=24), description="A soft-bounced recipient is sent again after this."
    )
    suppressed_action: Literal["refuse", "record"] = Field(
        "refuse",
        description="Mail to an INACTIVE address: refuse at RCPT with 550, or accept and "
        "record the recipient as BOUNCED (suppressed) without sending.",
    )
    mailgun_webhook_signing_key: SecretStr | None = Field(
        None, description="Mailgun's webhook signing key (prefer the file)."
    )
    mailgun_webhook_signing_key_file: Path | None = Field(
        None, description="File holding Mailgun's webhook signing key."
    )

    @field_validator("verp_domain")
    @classmethod
    def _a_label(cls, domain: str | None) -> str | None:
        # Compared with RCPT domains, which ingest converts to lower-case IDNA2008 A-labels.
        if domain is None:
            return None
        name = domain.strip().lower().rstrip(".")
        if not name.isascii():
            name = idna.encode(name, uts46=True).decode("ascii")
        if "." not in name or not re.fullmatch(r"[a-z0-9.-]+", name):
            raise ValueError("not a domain name")
        return name

    @model_validator(mode="after")
    def _key_for_verp(self) -> BounceSettings:
        if self.verp_domain and not (self.verp_key or self.verp_key_file):
            raise ValueError("verp_domain needs verp_key_file (or verp_key)")
        if self.verp_key is not None and len(self.verp_key.get_secret_value()) < 16:
            raise ValueError("verp_key must be at least 16 characters")
        return self

    def resolved_verp_key(self) -> bytes:
        return _secret(self.verp_key, self.verp_key_file).encode()

    def resolved_mailgun_signing_key(self) -> str:
        return _secret(self.mailgun_webhook_signing_key, self.mailgun_webhook_signing_key_file)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field("json", description="json in production.")
    addresses: Literal["hashed", "plain"] = Field(
        "hashed",
        description="How mail addresses appear in logs: for health mail an address is "
        "health data, so a stable hash unless configured otherwise.",
    )


def _default_providers() -> dict[str, ProviderSettings]:
    return {"outbox": OutboxProviderSettings(type="outbox")}


class Settings(BaseSettings):
    """Everything the relay reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    smtp: SmtpSettings = SmtpSettings()
    http: HttpSettings = HttpSettings()
    queue: QueueSettings = QueueSettings()
    delivery: DeliverySettings = DeliverySettings()
    providers: dict[str, ProviderSettings] = Field(
        default_factory=lambda: _default_providers(),
        description="Named delivery providers.",
    )
    log: LogSettings = LogSettings()
    bounces: BounceSettings = BounceSettings()
    workspaces: dict[str, WorkspaceSettings] = Field(
        default_factory=dict, description="Tenants, by workspace id."
    )

    @model_validator(mode="after")
    def _providers_exist(self) -> Settings:
        missing = [name for name in self.delivery.providers if name not in self.providers]
        if missing:
            raise ValueError(
                f"delivery.providers names {', '.join(missing)}, not defined under providers"
            )
        for workspace_id, workspace in self.workspaces.items():
            missing = [n for n in workspace.providers or [] if n not in self.providers]
            if missing:
                raise ValueError(
                    f"workspaces.{workspace_id}.providers names {', '.join(missing)},"
                    " not defined under providers"
                )
        return self

    @model_validator(mode="after")
    def _users_unique(self) -> Settings:
        # A login names exactly one workspace.
        seen: dict[str, str] = {}
        for workspace_id, workspace in self.workspaces.items():
            for user in workspace.users:
                if user in seen:
                    raise ValueError(
                        f"user {user!r} is in workspaces {seen[user]} and {workspace_id}"
                    )
                seen[user] = workspace_id
        return self

    @model_validator(mode="after")
    def _processes_share_the_queue(self) -> Settings:
        # Processes share accepted mail through the queue database; the embedded SQLite
        # file takes one writer at a time, so more processes would only queue on its lock.
        counts = {"smtp": self.smtp.processes, "delivery": self.delivery.processes}
        for section, count in counts.items():
            if count > 1 and self.queue.backend != "mysql":
                raise ValueError(
                    f"{section}.processes (or environment RELAY_{section.upper()}__PROCESSES)"
                    " above 1 needs queue.backend: mysql"
                )
        return self

    @property
    def process_count(self) -> int:
        """All of this relay's processes: each ingests, delivers, or both."""
        delivering = self.delivery.processes if self.delivery.enabled else 1
        return max(self.smtp.processes, delivering)

    def ingests(self, index: int) -> bool:
        return index < self.smtp.processes

    def delivers(self, index: int) -> bool:
        return self.delivery.enabled and index < self.delivery.processes

    def delivery_share(self, index: int) -> Settings:
        """These settings as delivery process `index` applies them: its part of the totals.

        Workers, provider concurrency, send rates and provider connections are limits on the
        whole relay, so each of the `delivery.processes` gets an even part of them (at least
        one). Circuit breakers are each process's own: a failing provider opens every
        process's breaker after that process has seen the failures itself.
        """
        parts = self.delivery.processes
        if parts == 1:
            return self
        delivery = self.delivery
        limits = {}
        for name in self.providers:
            own = delivery.provider_limits.get(name, ProviderLimits())
            limits[name] = own.model_copy(
                update={
                    "max_concurrency": _part(own.max_concurrency, index, parts),
                    "rate_per_second": own.rate_per_second / parts if own.rate_per_second else None,
                }
            )
        providers: dict[str, ProviderSettings] = {}
        for name, spec in self.providers.items():
            connections = getattr(spec, "max_connections", None)
            providers[name] = (
                spec
                if connections is None
                else spec.model_copy(update={"max_connections": _part(connections, index, parts)})
            )
        shared = delivery.model_copy(
            update={
                "worker_count": _part(delivery.worker_count, index, parts),
                "provider_limits": limits,
            }
        )
        return self.model_copy(update={"delivery": shared, "providers": providers})

    def workspace(self, workspace_id: str) -> WorkspaceSettings:
        """A configured workspace, or the open default for one that is not configured."""
        return self.workspaces.get(workspace_id) or WorkspaceSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives through init_settings (see load_settings), below the
        # environment so that a Kubernetes env var can override one key of a mounted file.
        return env_settings, init_settings


def _part(total: int, index: int, parts: int) -> int:
    """Process `index`'s part of `total` split `parts` ways: the remainder to the first."""
    return max(1, total // parts + (1 if index < total % parts else 0))


class ConfigError(Exception):
    """Start-up must stop: the message names the key and the reason."""


def unreadable_files(settings: Settings) -> list[str]:
    """Every `*_file` setting in use that names no readable file, as "key: reason" lines.

    Checked when the relay starts and by `config check`, so that a missing secret file stops
    the start naming its key, rather than failing each delivery as if the provider were
    down. Settings not in use are left alone: the MySQL password with the sqlite queue, and
    providers on a replica that does not deliver or that no route names (an ingest-only
    replica need not mount the providers' secrets).
    """
    problems = []
    for key, path in _file_settings(settings, "", _unused(settings)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{key}: cannot read {path}: {exc.strerror or exc}")
    return problems


def _unused(settings: Settings) -> set[str]:
    unused = set()
    if settings.queue.backend != "mysql":
        unused.add("queue.mysql.")
    routed = set(settings.delivery.providers)
    for workspace in settings.workspaces.values():
        routed.update(workspace.providers or ())
    for name, provider in settings.providers.items():
        if not settings.delivery.enabled or name not in routed:
            unused.add(f"providers.{name}.")
        elif getattr(provider, "tls", None) == "none":
            unused.add(f"providers.{name}.ca_file")
    return unused


def _file_settings(model: BaseModel, prefix: str, unused: set[str]) -> list[tuple[str, Path]]:
    found = []
    for name, value in model:
        key = f"{prefix}{name}"
        if key.startswith(tuple(unused)):
            continue
        if isinstance(value, BaseModel):
            found += _file_settings(value, f"{key}.", unused)
        elif isinstance(value, dict | list):
            entries = value.items() if isinstance(value, dict) else enumerate(value)
            for entry, item in entries:
                if isinstance(item, BaseModel):
                    found += _file_settings(item, f"{key}.{entry}.", unused)
        elif name.endswith("_file") and isinstance(value, Path):
            found.append((key, value))
    return found


def load_settings(path: Path | str | None = None) -> Settings:
    """Read the YAML file (if any) and the environment, or raise ConfigError."""
    return load_config(path)[0]


def load_config(
    path: Path | str | None = None, *, files: bool = False
) -> tuple[Settings, str | None]:
    """The settings and the YAML text they came from (None: environment and defaults).

    The text is what extra ingest processes are started with, so that all of a relay's
    processes run one configuration even if the file changes under them. `files`: also
    require every `*_file` setting in use to name a readable file (see unreadable_files).
    """
    path = path or os.environ.get(CONFIG_PATH_ENV) or None
    if path is None:
        source, text = "environment and defaults", None
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    settings = parse_settings(text, source)
    if files and (missing := unreadable_files(settings)):
        lines = "".join(f"\n  {line}" for line in missing)
        raise ConfigError(f"invalid configuration ({source}):{lines}")
    return settings, text


def parse_settings(text: str | None, source: str) -> Settings:
    """Settings from YAML text (None: environment and defaults only), or raise ConfigError."""
    data: dict[str, Any] = {}
    if text is not None:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {source} must hold a mapping of sections")
        data = loaded or {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


_PROVIDER_TYPES = {"outbox", "smtp", "gmail", "mailgun"}


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors(include_url=False, include_input=False):
        if not error["loc"]:
            # A rule across sections: its message names the keys.
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
            continue
        loc = list(error["loc"])
        if len(loc) > 2 and loc[0] == "providers" and loc[2] in _PROVIDER_TYPES:
            # pydantic names the union member it tried ("smtp"); no key or variable does.
            del loc[2]
        key = ".".join(str(part) for part in loc)
        env = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
        lines.append(f"  {key}: {error['msg']} (or environment {env})")
    return "\n".join(lines)
