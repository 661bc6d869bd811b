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
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "RELAY_"
CONFIG_PATH_ENV = "RELAY_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _parse_duration(value: Any) -> Any:
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


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    data_timeout: Duration = Field(
        timedelta(minutes=5), description="Idle time allowed in a session before it is closed."
    )
    workspace: str = Field(
        "default", min_length=1, max_length=255, description="Workspace that mail is filed under."
    )


class HttpSettings(_Section):
    """The HTTP port: health probes now, metrics and the admin API later."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    enabled: bool = Field(True, description="Serve HTTP at all.")


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


class DeliverySettings(_Section):
    """Delivery workers (runbook 7.2) and the retry policy."""

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


ProviderSettings = Annotated[
    OutboxProviderSettings | SmtpProviderSettings, Field(discriminator="type")
]


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field("json", description="json in production.")


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
        default_factory=lambda: {"outbox": OutboxProviderSettings(type="outbox")},
        description="Named delivery providers.",
    )
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _providers_exist(self) -> Settings:
        missing = [name for name in self.delivery.providers if name not in self.providers]
        if missing:
            raise ValueError(
                f"delivery.providers names {', '.join(missing)}, not defined under providers"
            )
        return self

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


class ConfigError(Exception):
    """Start-up must stop: the message names the key and the reason."""


def load_settings(path: Path | str | None = None) -> Settings:
    """Read the YAML file (if any) and the environment, or raise ConfigError."""
    path = path or os.environ.get(CONFIG_PATH_ENV) or None
    data: dict[str, Any] = {}
    source = "environment and defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded or {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        env = ENV_PREFIX + "__".join(str(p) for p in error["loc"]).upper()
        lines.append(f"  {key}: {error['msg']} (or environment {env})")
    return "\n".join(lines)
