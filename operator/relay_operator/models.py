"""The custom resources' schemas: one pydantic model per spec and status.

These models are the single source of truth for the API. `crdgen` turns them into the
CustomResourceDefinitions under crds/ (and the chart), and the handlers parse every spec
they receive with them, so the API server and the operator agree on fields, defaults and
bounds by construction. Field descriptions become `kubectl explain` text: each one says
what the field does, its unit and, where it matters, the runbook section it comes from.

Only SmtpRelay and RelayProvider are reconciled so far. MaintenanceWindow, BackupPolicy
and SmtpRelay.spec.strategy are designed here so that the schemas hold together when the
controllers for them arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "relay.smtp-relay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "smtp-relay"


def _cron_field(number: str, names: tuple[str, ...] = ()) -> str:
    atom = number if not names else "(?:" + "|".join((number, *names)) + ")"
    step = "(?:/[0-9]{1,2})?"
    item = f"(?:[*]{step}|{atom}(?:-{atom})?{step})"
    return f"{item}(?:,{item})*"


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")

# Standard five-field cron (minute hour day-of-month month day-of-week), as CronJob reads
# it. Written without backslashes or look-arounds so that the same text is a Python
# regex, an RE2 regex for the API server's CEL `matches()`, and a CEL string literal.
CRON_PATTERN = (
    "^"
    + "[ ]+".join(
        (
            _cron_field("[0-5]?[0-9]"),
            _cron_field("(?:[01]?[0-9]|2[0-3])"),
            _cron_field("(?:0?[1-9]|[12][0-9]|3[01])"),
            _cron_field("(?:0?[1-9]|1[0-2])", _MONTHS + tuple(m.lower() for m in _MONTHS)),
            _cron_field("[0-7]", _DAYS + tuple(d.lower() for d in _DAYS)),
        )
    )
    + "$"
)
CRON_MESSAGE = (
    "must be a standard five-field cron expression "
    "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'"
)

# The relay's own duration spelling (relay/config.py parse_duration), so that a value can
# be copied into relay.yaml unchanged.
DURATION_PATTERN = "^[0-9]+(ms|s|m|h|d)$"

# RFC 1123 DNS label / subdomain, as Kubernetes names objects.
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = "^[+]?[0-9.]+([eE][0-9]+|[numkKMGTPE]i?)?$"


def cel(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry: a CEL rule and the message the API returns."""
    return {"rule": rule, "message": message, **extra}


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


Cron = Annotated[
    str,
    Field(
        max_length=100,
        json_schema_extra=validations(cel(f"self.matches('{CRON_PATTERN}')", CRON_MESSAGE)),
    ),
]
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=16)]
Percent = Annotated[float, Field(ge=0, le=100)]
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]
Url = Annotated[str, Field(max_length=2048, json_schema_extra={"format": "uri"})]
Cidr = Annotated[str, Field(max_length=43, json_schema_extra={"format": "cidr"})]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$")]


class Schema(BaseModel):
    """Base of every model here: camelCase on the wire, snake_case in Python."""

    # Unknown fields are ignored rather than refused: the API server has already pruned
    # them against the CRD, and an operator one version behind must not crash on a field
    # added by a newer CRD.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


def section(model: type[Schema], description: str) -> Any:
    """A nested object that always exists, defaulted as a whole when absent.

    The default is written out in full (not `{}`) because the API server checks CEL rules
    against a default without first applying the defaults nested inside it.
    """
    default = model().model_dump(mode="json", by_alias=True, exclude_none=True)
    return Field(
        default_factory=model, description=description, json_schema_extra={"default": default}
    )


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


class SecretRef(Schema):
    """A Secret in the resource's own namespace."""

    name: ObjectName = Field(description="Name of the Secret, in the same namespace.")


class SecretKeyRef(Schema):
    """One key of a Secret in the resource's own namespace."""

    name: ObjectName = Field(description="Name of the Secret, in the same namespace.")
    key: SecretKey = Field("password", description="Key within the Secret's data.")


class LocalObjectRef(Schema):
    """Another object of this API in the same namespace, by name."""

    name: ObjectName = Field(description="Name of the object, in the same namespace.")


class LabelSelector(Schema):
    """Selects objects by their labels (all pairs must match)."""

    match_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Label pairs an object must carry to be selected. Empty selects none.",
    )


ConditionType = Literal["Ready", "Progressing", "Degraded", "Promoted"]


class Condition(Schema):
    """One aspect of the resource's observed state, as `kubectl wait --for=condition` reads."""

    type: ConditionType = Field(
        description="Ready: serving as specified. Progressing: a change is being rolled "
        "out. Degraded: something needs attention (see reason and message). Promoted "
        "(SmtpRelays with a strategy): the spec's revision is the stable one."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern="^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="One CamelCase word for the condition's last transition, for machines.",
    )
    message: str = Field("", max_length=32768, description="What happened and why, for people.")
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When status last changed (RFC 3339).",
    )
    observed_generation: int = Field(
        0, ge=0, description="metadata.generation the condition was computed for."
    )


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        max_length=8,
        description="Ready, Progressing, Degraded (and Promoted), each with a reason and a "
        "message.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


class Status(Schema):
    observed_generation: int = Field(
        0, ge=0, description="metadata.generation of the spec the operator last acted on."
    )
    conditions: list[Condition] = conditions_field()


# ---------------------------------------------------------------------------------------
# RelayProvider
# ---------------------------------------------------------------------------------------

ProviderType = Literal["smtp", "gmail", "mailgun", "outbox"]


class SmtpProvider(Schema):
    """An SMTP smarthost (submission with STARTTLS by default)."""

    host: str = Field(
        min_length=1,
        max_length=253,
        description="Smarthost name or address, e.g. smtp.example.org.",
    )
    port: int = Field(587, ge=1, le=65535, description="Smarthost port (587 submission).")
    tls: Literal["starttls", "implicit", "opportunistic", "none"] = Field(
        "starttls",
        description="starttls: STARTTLS required. implicit: TLS from the first byte (465). "
        "opportunistic: STARTTLS when offered. none: plaintext, for trusted local peers only.",
    )
    verify_certificate: bool = Field(True, description="Check the smarthost's certificate.")
    username: str | None = Field(
        None,
        max_length=320,
        description="AUTH user name. Needs credentials.secretRef with the key `password`.",
    )
    timeout: Duration = Field("30s", description="Per-command timeout (runbook provider_timeout).")


class GmailProvider(Schema):
    """The Gmail API (users.messages.send) as one Google Workspace mailbox."""

    user: str = Field(
        max_length=320,
        pattern="^(me|[^ /@]+@[^ /@]+)$",
        description="Mailbox that sends: its address (the delegated subject for a service "
        "account), or 'me' for the refresh token's own user.",
    )
    credentials_kind: Literal["refreshToken", "serviceAccount"] = Field(
        "refreshToken",
        description="refreshToken: the Secret holds client_id, client_secret and "
        "refresh_token. serviceAccount: the Secret holds key.json, a service-account key "
        "with domain-wide delegation for the gmail.send scope.",
    )
    timeout: Duration = Field("30s", description="Per-request timeout (runbook provider_timeout).")


class MailgunProvider(Schema):
    """Mailgun's sending API. The Secret holds the private key as `api_key`."""

    domain: str = Field(
        max_length=253,
        pattern="^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="Sending domain as registered at Mailgun.",
    )
    region: Literal["us", "eu"] = Field(
        "us", description="us: api.mailgun.net. eu: api.eu.mailgun.net (EU data residency)."
    )
    timeout: Duration = Field("30s", description="Per-request timeout (runbook provider_timeout).")


class ProviderCredentials(Schema):
    """Where the provider's credentials live. They reach relay pods as mounted files only."""

    secret_ref: SecretRef = Field(
        description="Secret with the keys the provider type needs: smtp `password`; gmail "
        "`client_id`, `client_secret`, `refresh_token` (refreshToken) or `key.json` "
        "(serviceAccount); mailgun `api_key`."
    )


class CredentialRotation(Schema):
    """When rotated credentials are checked for and rolled out (runbook 4.4, 5.3)."""

    schedule: Cron = Field(
        description="When to re-read the credentials Secret and roll relays onto a rotated "
        "one (five-field cron, UTC)."
    )
    max_age_days: int = Field(
        90,
        ge=1,
        le=3650,
        description="Credentials unchanged for longer than this are reported as due for "
        "rotation, in days.",
    )


class RelayProviderSpec(Schema):
    """A delivery provider the relay hands mail to, and where its credentials are."""

    type: ProviderType = Field(
        description="smtp (a smarthost), gmail (Gmail API), mailgun (Mailgun API) or outbox "
        "(writes .eml files into the pod; for tests and demonstrations)."
    )
    smtp: SmtpProvider | None = Field(None, description="Settings for type smtp.")
    gmail: GmailProvider | None = Field(None, description="Settings for type gmail.")
    mailgun: MailgunProvider | None = Field(None, description="Settings for type mailgun.")
    credentials: ProviderCredentials | None = Field(
        None, description="The credentials Secret; required for gmail and mailgun."
    )
    rotation: CredentialRotation | None = Field(
        None,
        description="Credential rotation schedule. Unset: changes are picked up by "
        "the operator's periodic resync only.",
    )

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.type != 'smtp' || has(self.smtp)", "spec.smtp is required for type smtp"),
            cel("self.type != 'gmail' || has(self.gmail)", "spec.gmail is required for type gmail"),
            cel(
                "self.type != 'mailgun' || has(self.mailgun)",
                "spec.mailgun is required for type mailgun",
            ),
            cel(
                "!(self.type in ['gmail', 'mailgun']) || has(self.credentials)",
                "spec.credentials.secretRef is required for types gmail and mailgun",
            ),
            cel(
                "self.type != 'smtp' || !has(self.smtp.username) || has(self.credentials)",
                "spec.credentials.secretRef (key password) is required when "
                "spec.smtp.username is set",
            ),
            cel(
                "self.type != 'outbox' || !has(self.credentials)",
                "spec.credentials must not be set for type outbox",
            ),
        )
    )


class RelayProviderStatus(Status):
    """What the operator found when it validated the provider."""

    credentials_version: str | None = Field(
        None,
        max_length=128,
        description="resourceVersion of the credentials Secret last validated (never its data).",
    )


# ---------------------------------------------------------------------------------------
# SmtpRelay
# ---------------------------------------------------------------------------------------


class MysqlQueue(Schema):
    """A MySQL 8 / MariaDB 10.6+ server holding the queue; replicas share it safely."""

    host: str = Field(min_length=1, max_length=253, description="Server host name.")
    port: int = Field(3306, ge=1, le=65535, description="Server port.")
    database: str = Field(
        "relay", min_length=1, max_length=64, description="Schema (database) name."
    )
    user: str = Field("relay", min_length=1, max_length=80, description="User name.")
    password_secret_ref: SecretKeyRef = Field(
        description="Secret key holding the password; mounted as a file, never copied."
    )
    max_connections: int = Field(
        50, ge=1, le=1000, description="Connection pool size per replica (runbook 7.2)."
    )


class SqliteQueue(Schema):
    """An SQLite file in the pod: one replica only."""

    claim_name: ObjectName | None = Field(
        None,
        description="PersistentVolumeClaim holding the database. Unset: an emptyDir, so "
        "mail still queued is LOST when the pod is deleted (tests and demonstrations only).",
    )


class Queue(Schema):
    """Where accepted mail is stored until delivered."""

    backend: Literal["sqlite", "mysql"] = Field(
        "sqlite",
        description="mysql: a shared MySQL/MariaDB server, any number of replicas. sqlite: "
        "a file in the pod, exactly one replica.",
    )
    mysql: MysqlQueue | None = Field(None, description="Settings for backend mysql.")
    sqlite: SqliteQueue | None = Field(None, description="Settings for backend sqlite.")

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.backend != 'mysql' || has(self.mysql)",
                "spec.queue.mysql is required for backend mysql",
            )
        )
    )


class SmtpListener(Schema):
    """The SMTP side that client applications submit to."""

    hostname: str | None = Field(
        None,
        max_length=253,
        description="Name in the greeting and the Received: header. Unset: the pod's name.",
    )
    max_message_size: int = Field(
        26214400, ge=1024, description="Largest message accepted, in bytes (552 past it)."
    )
    max_recipients: int = Field(1000, ge=1, description="Recipients per message (452 past it).")
    trusted_networks: list[Cidr] = Field(
        default_factory=list,
        max_length=64,
        description="Client networks that may relay without AUTH (CIDR). Empty: none, so the "
        "relay is never open.",
    )
    tls_secret_name: ObjectName | None = Field(
        None,
        description="A kubernetes.io/tls Secret (tls.crt, tls.key) that enables STARTTLS.",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes per pod accepting SMTP (the relay's smtp.processes), one per "
        "core of resources.limits.cpu is the rule of thumb. More than 1 needs queue.backend "
        "mysql.",
    )


class AdminToken(Schema):
    """A bearer token for the relay's admin API."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern="^[A-Za-z0-9._-]+$",
        description="Who holds the token; the audit log's user.",
    )
    secret_key_ref: SecretKeyRef = Field(description="Secret key holding the token.")


class HttpListener(Schema):
    """Health, metrics and the admin API (port 8080 in the pod)."""

    admin_tokens: list[AdminToken] = Field(
        default_factory=list,
        max_length=16,
        description="Bearer tokens for /api. None: the admin API refuses every call.",
    )


class Delivery(Schema):
    """Delivery workers per replica (runbook 7.2)."""

    worker_count: int = Field(10, ge=1, le=1000, description="Concurrent deliveries.")
    batch_size: int = Field(50, ge=1, le=1000, description="Messages claimed per query.")
    process_interval: Duration = Field(
        "10s", description="Poll period for mail other replicas queued."
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes per pod running delivery workers (the relay's "
        "delivery.processes); worker_count and the provider limits are split between them. "
        "Worth it only when one process's event loop is the limit and the pod has a core "
        "to spare. More than 1 needs queue.backend mysql.",
    )
    shutdown_grace: Duration = Field(
        "25s",
        description="Time sessions and deliveries get to finish on SIGTERM; the pod's "
        "termination grace period is 15s longer.",
    )


class Logging(Schema):
    """The relay's logs."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["json", "text"] = Field("json", description="json: one event per line.")


class ServiceSpec(Schema):
    """The Service in front of the relay pods."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Service type."
    )
    smtp_port: int = Field(2525, ge=1, le=65535, description="Service port for SMTP.")
    http_port: int = Field(8080, ge=1, le=65535, description="Service port for HTTP.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations for the Service (load balancer hints)."
    )


class ResourceList(Schema):
    """CPU and memory quantities."""

    cpu: Quantity | None = Field(None, description="CPU, e.g. 500m or 1.")
    memory: Quantity | None = Field(None, description="Memory, e.g. 256Mi.")


def _requests() -> ResourceList:
    return ResourceList(cpu="100m", memory="128Mi")


def _limits() -> ResourceList:
    return ResourceList(memory="512Mi")


class Resources(Schema):
    """Compute resources for each relay container."""

    requests: ResourceList = Field(
        default_factory=_requests,
        description="Guaranteed resources.",
        json_schema_extra={"default": {"cpu": "100m", "memory": "128Mi"}},
    )
    limits: ResourceList = Field(
        default_factory=_limits,
        description="Ceilings; no CPU limit by default, so SMTP bursts are not throttled.",
        json_schema_extra={"default": {"memory": "512Mi"}},
    )


class Disruption(Schema):
    """The PodDisruptionBudget that keeps voluntary evictions (node drains) gradual."""

    max_unavailable: int = Field(
        1, ge=0, description="Pods that may be evicted at once. 0 blocks drains entirely."
    )


class BlueGreen(Schema):
    """Blue-green rollout (runbook 2.2): a full preview copy, then a traffic switch."""

    preview_service: ObjectName | None = Field(
        None, description="Service for the preview (candidate) pods. Unset: <name>-preview."
    )
    observe_window: Duration = Field(
        "5m", description="How long the new version is watched after the switch (runbook 2.2)."
    )
    error_rate_threshold: Percent = Field(
        5,
        description="Share of the new pods' delivery attempts that may end other than sent, "
        "in percent, during the observe window; above it traffic is switched back. Needs "
        "spec.strategy.analysis (the Prometheus to ask).",
    )
    scale_down_delay: Duration = Field(
        "10m",
        description="How long the old pods are kept running after a successful switch, so that "
        "a rollback is a selector change rather than a new deployment.",
    )


class Canary(Schema):
    """Canary rollout (runbook 2.4): traffic moved to the new version in steps.

    SMTP is plain TCP, so the weight is the canary's share of the pods behind the one
    Service: at weight w of n replicas the canary gets round(n*w/100) pods (at least 1) and
    the stable version the rest (at least 1). status.rollout.actualWeight says what that
    came to.
    """

    step_weight: int = Field(10, ge=1, le=100, description="Traffic share added per step, percent.")
    max_weight: int = Field(
        50, ge=1, le=100, description="Share at which the canary is promoted, percent."
    )
    interval: Duration = Field("1m", description="Time between steps (and analyses).")
    threshold: int = Field(
        10, ge=1, le=100, description="Failed analyses after which the canary is rolled back."
    )

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.stepWeight <= self.maxWeight",
                "spec.strategy.canary.stepWeight must not exceed maxWeight",
            )
        )
    )


class SuccessRate(Schema):
    """Share of the new pods' delivery attempts that ended sent."""

    enabled: bool = Field(True, description="Run this check.")
    min: Percent = Field(99, description="Lowest acceptable success rate, percent (runbook 2.4).")


class Latency(Schema):
    """P95 of the new pods' delivery attempt duration (email_processing_duration_seconds)."""

    enabled: bool = Field(True, description="Run this check.")
    p95_max_ms: int = Field(
        500, ge=1, le=600000, description="Highest acceptable P95, milliseconds (runbook 2.4)."
    )


class RateCheck(Schema):
    """A share that must stay below a ceiling."""

    enabled: bool = Field(True, description="Run this check.")
    max_percent: Percent = Field(description="Highest acceptable share, percent.")


def _rate(default: float, description: str) -> Any:
    value = RateCheck(max_percent=default)
    return Field(
        default_factory=lambda: value,
        description=description,
        json_schema_extra={"default": {"enabled": True, "maxPercent": default}},
    )


class QueueAge(Schema):
    """Age of the oldest message waiting (email_queue_oldest_age_seconds)."""

    enabled: bool = Field(True, description="Run this check.")
    max_seconds: int = Field(
        300, ge=1, description="Highest acceptable age of the oldest queued message, seconds."
    )


class Prometheus(Schema):
    """Where analysis metrics are queried."""

    address: Url = Field(description="Prometheus base URL, e.g. http://prometheus.monitoring:9090.")
    timeout: Duration = Field("10s", description="Timeout of one query.")


class Analysis(Schema):
    """Metric checks that gate each rollout step (runbook 2.4 canary analysis).

    Every check looks only at the new version's pods (by pod name) over the last interval.
    A check whose query returns nothing or NaN (no traffic, no scrape yet) is inconclusive:
    never a pass.
    """

    prometheus: Prometheus = Field(description="The Prometheus that holds the relay metrics.")
    interval: Duration = Field(
        "1m",
        description="Blue-green: time between analyses in the observe window, and the "
        "range each rate is taken over, so keep it at least four scrape intervals. Canary: "
        "spec.strategy.canary.interval is used instead.",
    )
    success_rate: SuccessRate = section(SuccessRate, "Delivery success-rate check.")
    latency: Latency = section(Latency, "P95 delivery-latency check.")
    smtp_errors: RateCheck = _rate(
        5, "Share of SMTP replies that were 4xx or 5xx (clients refused or deferred)."
    )
    bounce_rate: RateCheck = _rate(
        5, "Bounces recorded per delivery attempt (a bad version sending malformed mail)."
    )
    provider_failures: RateCheck = _rate(
        10, "Share of provider requests that failed (credentials, API changes, timeouts)."
    )
    queue_age: QueueAge = section(QueueAge, "Oldest queued message check.")
    inconclusive_limit: int = Field(
        3,
        ge=1,
        le=100,
        description="Inconclusive analyses in a row after which the rollout pauses (a "
        "condition says why); resume, promote or abort it by hand.",
    )


class Webhook(Schema):
    """An HTTP endpoint asked before a step is taken; any non-2xx answer holds the step."""

    url: Url = Field(description="URL called with a POST describing the rollout.")
    timeout: Duration = Field("5s", description="How long to wait for the answer.")


class SmokeTest(Schema):
    """The check a new version passes before it gets traffic (runbook 2.2 step 3).

    The operator runs it itself, against the preview Service: an SMTP greeting, EHLO, NOOP
    and QUIT, then HTTP GET /health. (From the operator rather than a Job: no image to
    pull or pod to schedule, and the result lands directly in the status.)
    """

    enabled: bool = Field(True, description="Run the smoke test.")
    timeout: Duration = Field("10s", description="Time allowed for the whole test.")


class Strategy(Schema):
    """How a new version or configuration replaces the running one. Unset: a rolling update.

    Controls that name a revision act only while that revision is the candidate, so a
    control left behind in Git never touches the next rollout. Each may also be given as
    an annotation (rollout.relay.smtp-relay.dev/promote, /abort, /rollback, /resume, /paused,
    /retry).
    """

    type: Literal["BlueGreen", "Canary"] = Field(description="BlueGreen or Canary.")
    blue_green: BlueGreen | None = Field(
        None, description="Settings for BlueGreen (defaults apply when unset)."
    )
    canary: Canary | None = Field(
        None, description="Settings for Canary (defaults apply when unset)."
    )
    analysis: Analysis | None = Field(
        None, description="Metric checks gating each step. Unset: steps advance on time."
    )
    smoke_test: SmokeTest = section(SmokeTest, "The smoke test before traffic moves.")
    progress_deadline: Duration = Field(
        "10m",
        description="Time the new version's pods get to become ready; past it the rollout "
        "is rolled back.",
    )
    paused: bool = Field(False, description="Hold the rollout where it is.")
    promote_revision: str | None = Field(
        None,
        max_length=64,
        description="Set to status.rollout.candidateRevision to promote that revision now, "
        "skipping the remaining checks and steps (its pods must still become ready).",
    )
    abort_revision: str | None = Field(
        None,
        max_length=64,
        description="Set to status.rollout.candidateRevision to abort that rollout and "
        "return all traffic to the stable revision.",
    )
    rollback_revision: str | None = Field(
        None,
        max_length=64,
        description="Set to status.rollout.stableRevision to roll back to the revision "
        "promoted before it (runbook 2.3). The rolled-back revision is not rolled out again "
        "until the spec changes or it is retried.",
    )
    resume: str | None = Field(
        None,
        max_length=64,
        description="Any new value resumes a rollout that paused itself (inconclusive "
        "analysis); e.g. the current time. A refused promotion is not a pause: the "
        "webhook is asked again every 15 s.",
    )
    retry_revision: str | None = Field(
        None,
        max_length=64,
        description="Set to a rolled-back or aborted revision to roll it out again.",
    )
    confirm_promotion_webhook: Webhook | None = Field(
        None,
        description="Asked before traffic is moved for good (blue-green: before the switch; "
        "canary: before promotion at maxWeight); unset: promote without asking.",
    )

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.type == 'BlueGreen' || !has(self.blueGreen)",
                "spec.strategy.blueGreen is only read with type BlueGreen",
                fieldPath=".blueGreen",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.type == 'Canary' || !has(self.canary)",
                "spec.strategy.canary is only read with type Canary",
                fieldPath=".canary",
                reason="FieldValueInvalid",
            ),
        )
    )


class SmtpRelaySpec(Schema):
    """A relay deployment: pods, configuration, queue, providers and Service."""

    image: str | None = Field(
        None,
        max_length=512,
        description="Relay image. Unset: the image the operator was installed with.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    replicas: int = Field(
        1, ge=0, le=100, description="Relay pods. More than 1 needs queue.backend mysql."
    )
    providers: list[ObjectName] = Field(
        min_length=1,
        max_length=16,
        description="RelayProvider names in this namespace, in priority order: the first is "
        "tried first, the next when it cannot place a recipient (runbook: Gmail, then Mailgun).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    queue: Queue = section(Queue, "Where accepted mail is stored until delivered.")
    smtp: SmtpListener = section(SmtpListener, "The SMTP listener (port 2525 in the pod).")
    http: HttpListener = section(HttpListener, "Health, metrics and admin API (port 8080).")
    delivery: Delivery = section(Delivery, "Delivery workers per replica (runbook 7.2).")
    log: Logging = section(Logging, "The relay's logs.")
    service: ServiceSpec = section(ServiceSpec, "The Service in front of the pods.")
    resources: Resources = section(Resources, "Compute resources per relay container.")
    disruption: Disruption = section(Disruption, "PodDisruptionBudget settings.")
    strategy: Strategy | None = Field(
        None,
        description="Progressive delivery (runbook 2.2, 2.4): blue-green or canary, judged "
        "by the relay's mail metrics, with automatic rollback. Unset: a rolling update.",
    )

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.queue.backend == 'mysql' || !has(self.strategy)",
                "spec.strategy needs spec.queue.backend mysql: two versions run side by side "
                "during a rollout, and with sqlite each pod would have its own queue file",
                fieldPath=".strategy",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.queue.backend == 'mysql' || self.smtp.processes <= 1",
                "spec.smtp.processes above 1 needs spec.queue.backend mysql: the processes "
                "share accepted mail through the queue database",
                fieldPath=".smtp.processes",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.queue.backend == 'mysql' || self.delivery.processes <= 1",
                "spec.delivery.processes above 1 needs spec.queue.backend mysql: the "
                "processes claim mail from the queue database",
                fieldPath=".delivery.processes",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.queue.backend != 'sqlite' || self.replicas <= 1",
                "spec.replicas must be 0 or 1 with spec.queue.backend sqlite: each pod would "
                "have its own queue file; use backend mysql to run more replicas",
                fieldPath=".replicas",
                reason="FieldValueInvalid",
            ),
        )
    )


RolloutPhase = Literal[
    "Stable",
    "Deploying",
    "SmokeTesting",
    "AwaitingConfirmation",
    "Observing",
    "CanaryStep",
    "Promoting",
    "RollingBack",
    "RolledBack",
    "Aborted",
]


class CheckResult(Schema):
    """One analysis check's last outcome."""

    name: str = Field(max_length=64, description="Check name, e.g. success-rate.")
    outcome: Literal["Pass", "Fail", "Inconclusive"] = Field(description="The verdict.")
    value: float | None = Field(None, description="The measured value; unset when none.")
    message: str = Field("", max_length=1024, description="The value against its limit.")


class RevisionRecord(Schema):
    """One revision the rollout history knows."""

    revision: str = Field(max_length=64, description="Pod-template hash naming the revision.")
    image: str = Field(max_length=512, description="Relay image of the revision.")
    config_hash: str = Field("", max_length=64, description="Hash of its relay.yaml.")
    outcome: Literal["Promoted", "RolledBack", "Aborted"] = Field(description="How it ended.")
    time: str = Field(json_schema_extra={"format": "date-time"}, description="When.")
    reason: str = Field("", max_length=1024, description="Why, for rollbacks and aborts.")


class RolloutStatus(Schema):
    """Where a blue-green or canary rollout stands; the operator resumes from here.

    The operator writes this before it acts (a Service switch, a scale), so an operator
    restarted at any point repeats at most an idempotent step, never a switch.
    """

    phase: RolloutPhase = Field("Stable", description="Current step of the rollout.")
    message: str = Field("", max_length=2048, description="What the rollout waits for, or why.")
    stable_revision: str | None = Field(
        None, max_length=64, description="Revision taking traffic when no rollout runs."
    )
    stable_colour: Literal["blue", "green"] | None = Field(
        None, description="Deployment (<name>-blue or <name>-green) of the stable revision."
    )
    stable_image: str | None = Field(None, max_length=512, description="Its image.")
    candidate_revision: str | None = Field(
        None, max_length=64, description="Revision being rolled out; unset when none."
    )
    candidate_colour: Literal["blue", "green"] | None = Field(
        None, description="Deployment of the candidate."
    )
    candidate_image: str | None = Field(None, max_length=512, description="Its image.")
    active_colour: Literal["blue", "green"] | None = Field(
        None, description="Blue-green: the colour the Service sends traffic to."
    )
    rollback: bool = Field(False, description="The candidate is a rollback to an older revision.")
    set_weight: int = Field(0, ge=0, le=100, description="Canary: weight of the current step.")
    actual_weight: int = Field(
        0, ge=0, le=100, description="Canary: the candidate's share of ready pods, percent."
    )
    paused: bool = Field(False, description="Held: by spec/annotation or by the operator.")
    pause_reason: str | None = Field(None, max_length=64, description="Why it is held.")
    phase_since: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the phase began."
    )
    switched_at: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="Blue-green: last switch."
    )
    next_analysis_at: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When checks run next."
    )
    next_confirmation_at: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="When the confirm-promotion webhook is asked again after a refusal.",
    )
    scale_down_colour: Literal["blue", "green"] | None = Field(
        None, description="The old colour kept for a fast rollback."
    )
    scale_down_at: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="When the old colour is scaled to zero.",
    )
    failed_checks: int = Field(0, ge=0, description="Failed analyses in this rollout.")
    inconclusive_checks: int = Field(
        0, ge=0, description="Inconclusive analyses in a row in this rollout."
    )
    analyses: int = Field(0, ge=0, description="Analyses run in this rollout (or step).")
    last_checks: list[CheckResult] = Field(
        default_factory=list, max_length=16, description="The last analysis, check by check."
    )
    rejected_revision: str | None = Field(
        None,
        max_length=64,
        description="Revision rolled back or aborted: not rolled out again until the spec "
        "changes or spec.strategy.retryRevision names it.",
    )
    handled_resume: str | None = Field(
        None, max_length=64, description="Last resume value acted on."
    )
    handled_retry: str | None = Field(
        None,
        max_length=64,
        description="Revision a retry control was last acted on for. A retry is used once: "
        "remove the control and set it again to retry the same revision again.",
    )
    history: list[RevisionRecord] = Field(
        default_factory=list, max_length=10, description="The last revisions, newest last."
    )


class SmtpRelayStatus(Status):
    """What the operator last did and what it observed."""

    rollout: RolloutStatus | None = Field(
        None, description="Blue-green or canary progress; unset without spec.strategy."
    )

    replicas: int = Field(0, ge=0, description="Relay pods that exist.")
    ready_replicas: int = Field(0, ge=0, description="Relay pods that pass /readyz.")
    updated_replicas: int = Field(0, ge=0, description="Pods running the current configuration.")
    config_hash: str | None = Field(
        None, max_length=64, description="Hash of the rendered relay.yaml now rolled out."
    )
    secrets_hash: str | None = Field(
        None,
        max_length=64,
        description="Hash of the referenced Secrets' versions (never their data).",
    )


# ---------------------------------------------------------------------------------------
# MaintenanceWindow (designed; reconciled in a later issue)
# ---------------------------------------------------------------------------------------


class Drain(Schema):
    """How traffic leaves the relays before the window (runbook 6.1 step 3)."""

    enabled: bool = Field(
        True,
        description="Put the relays into maintenance mode (new sessions get 421, readiness "
        "fails, queued mail keeps being delivered) before the window starts.",
    )
    step_percent: int = Field(
        10, ge=1, le=100, description="Traffic share removed per step, percent (runbook 6.1)."
    )
    step_interval: Duration = Field("30s", description="Time between drain steps (runbook 6.1).")


class MaintenanceWindowSpec(Schema):
    """A recurring maintenance window for the selected relays (runbook 6.1)."""

    schedule: Cron = Field(description="When the window opens (five-field cron).")
    time_zone: str = Field(
        "UTC", max_length=64, description="IANA time zone the schedule is read in."
    )
    duration: Duration = Field("2h", description="How long the window stays open (runbook 6.1).")
    message: str = Field(
        "Service under maintenance",
        max_length=400,
        description="Text of the 421 reply clients get while the window is open.",
    )
    relay_selector: LabelSelector = Field(
        description="Labels of the SmtpRelays the window applies to."
    )
    drain: Drain = section(Drain, "How traffic is drained before the window.")
    suspend: bool = Field(False, description="Skip windows while true.")


class MaintenanceWindowStatus(Status):
    """When windows opened and will open."""

    active: bool = Field(False, description="A window is open now.")
    last_window_start: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="Start of the last window."
    )
    next_window_start: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="Start of the next window."
    )


# ---------------------------------------------------------------------------------------
# BackupPolicy (designed; reconciled in a later issue)
# ---------------------------------------------------------------------------------------


class S3Destination(Schema):
    """An S3-compatible bucket."""

    bucket: str = Field(
        min_length=3, max_length=63, pattern="^[a-z0-9][a-z0-9.-]*[a-z0-9]$", description="Bucket."
    )
    prefix: str = Field(
        "smtp-relay", max_length=512, description="Key prefix; each backup is <prefix>/<time>/."
    )
    endpoint: Url | None = Field(
        None, description="S3 API endpoint for non-AWS stores (MinIO, Ceph). Unset: AWS."
    )
    region: str = Field("us-east-1", max_length=64, description="Bucket region.")
    credentials_secret_ref: SecretRef = Field(
        description="Secret with access_key_id and secret_access_key."
    )


class BackupDestination(Schema):
    """Where backups are written."""

    s3: S3Destination = Field(description="An S3-compatible bucket (runbook 8.1).")


class BackupPolicySpec(Schema):
    """Scheduled backups of a relay's queue database and configuration (runbook 8.1)."""

    relay_ref: LocalObjectRef = Field(description="The SmtpRelay whose database is backed up.")
    schedule: Cron = Field(description="When backups run (five-field cron, UTC).")
    retention_days: int = Field(
        30, ge=1, le=3650, description="Backups older than this are deleted, in days (runbook 8.1)."
    )
    destination: BackupDestination = Field(description="Where backups are written.")
    suspend: bool = Field(False, description="Skip scheduled backups while true.")


class BackupPolicyStatus(Status):
    """Outcome of the recent backups."""

    last_backup_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="Start of the last backup."
    )
    last_successful_backup_time: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="Start of the last backup that completed and was verified.",
    )


# ---------------------------------------------------------------------------------------
# The kinds
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A `kubectl get` printer column."""

    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Kind:
    """One custom resource kind: names, schemas and how `kubectl get` prints it."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: type[Schema]
    status: type[Schema]
    columns: tuple[Column, ...] = ()
    rules: tuple[dict[str, Any], ...] = field(default=())

    @property
    def singular(self) -> str:
        return self.kind.lower()


_READY = '.status.conditions[?(@.type=="Ready")]'
_AGE = Column("Age", ".metadata.creationTimestamp", "date", "Time since creation.")

# The relay's Service is named after the SmtpRelay, and Service names are DNS-1035 labels.
_RELAY_NAME = cel(
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52",
    "metadata.name must be a DNS-1035 label (lower-case letters, digits, '-', starting "
    "with a letter) of at most 52 characters: it names the relay's Service",
)

SMTP_RELAY = Kind(
    kind="SmtpRelay",
    plural="smtprelays",
    short_names=("smr",),
    description="An SMTP relay deployment: the operator renders its configuration into a "
    "ConfigMap and runs it as a Deployment with a Service and a PodDisruptionBudget.",
    spec=SmtpRelaySpec,
    status=SmtpRelayStatus,
    columns=(
        Column("Replicas", ".spec.replicas", "integer", "Desired relay pods."),
        Column("Ready", ".status.readyReplicas", "integer", "Relay pods passing /readyz."),
        Column("Status", f"{_READY}.status", description="Ready condition."),
        Column("Reason", f"{_READY}.reason", description="Why, in one word."),
        Column("Rollout", ".status.rollout.phase", description="Rollout phase (spec.strategy)."),
        Column("Active", ".status.rollout.activeColour", description="Colour taking traffic."),
        Column(
            "Weight", ".status.rollout.setWeight", "integer", "Canary weight, percent.", priority=1
        ),
        Column("Backend", ".spec.queue.backend", description="Queue backend.", priority=1),
        _AGE,
    ),
    rules=(_RELAY_NAME,),
)

RELAY_PROVIDER = Kind(
    kind="RelayProvider",
    plural="relayproviders",
    short_names=("rpv",),
    description="A delivery provider (SMTP smarthost, Gmail API, Mailgun API, outbox) and "
    "the Secret holding its credentials, validated by the operator.",
    spec=RelayProviderSpec,
    status=RelayProviderStatus,
    columns=(
        Column("Type", ".spec.type", description="Provider type."),
        Column("Status", f"{_READY}.status", description="Ready condition."),
        Column("Reason", f"{_READY}.reason", description="Why, in one word."),
        _AGE,
    ),
)

MAINTENANCE_WINDOW = Kind(
    kind="MaintenanceWindow",
    plural="maintenancewindows",
    short_names=("mw",),
    description="A recurring maintenance window: the selected relays are drained and put "
    "into maintenance mode for its duration (runbook 6.1).",
    spec=MaintenanceWindowSpec,
    status=MaintenanceWindowStatus,
    columns=(
        Column("Schedule", ".spec.schedule", description="When windows open."),
        Column("Duration", ".spec.duration", description="How long they stay open."),
        Column("Active", ".status.active", "boolean", "A window is open now."),
        _AGE,
    ),
)

BACKUP_POLICY = Kind(
    kind="BackupPolicy",
    plural="backuppolicies",
    short_names=("bkp",),
    description="Scheduled backups of a relay's queue database and configuration to "
    "S3-compatible storage, with retention (runbook 8.1).",
    spec=BackupPolicySpec,
    status=BackupPolicyStatus,
    columns=(
        Column("Relay", ".spec.relayRef.name", description="The SmtpRelay backed up."),
        Column("Schedule", ".spec.schedule", description="When backups run."),
        Column("Retention", ".spec.retentionDays", "integer", "Days backups are kept."),
        Column("Last Backup", ".status.lastSuccessfulBackupTime", "date", "Last good backup."),
        _AGE,
    ),
)

KINDS: tuple[Kind, ...] = (SMTP_RELAY, RELAY_PROVIDER, MAINTENANCE_WINDOW, BACKUP_POLICY)
