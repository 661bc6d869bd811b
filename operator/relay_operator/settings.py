"""The operator's own settings (environment `RELAY_OPERATOR_*`) and how kopf is tuned.

The Helm chart sets these from its values; `smtp-relay-operator run --help` lists them.
"""

from __future__ import annotations

import random
import time

import kopf
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay_operator.models import GROUP


class OperatorSettings(BaseSettings):
    """Everything the operator reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="RELAY_OPERATOR_", extra="forbid", frozen=True)

    relay_image: str = Field(
        "smtp-relay:0.1.0", description="Relay image for SmtpRelays that name none."
    )
    peering: str | None = Field(
        None,
        description="ClusterKopfPeering object shared by the operator's replicas; with it "
        "only one replica acts at a time. None: standalone (a developer's laptop).",
    )
    peering_lifetime_s: int = Field(
        60,
        ge=5,
        description="Seconds a replica's keep-alive is believed. A replica that dies "
        "without saying goodbye blocks the others for at most this long.",
    )
    liveness_endpoint: str = Field(
        "http://127.0.0.1:8081/healthz",
        description="Where kopf answers liveness probes (the chart binds 0.0.0.0 in the pod).",
    )
    resync_interval_s: float = Field(
        60,
        gt=0,
        description="Period of the full resync: referenced Secrets are re-read (a rotated "
        "one rolls the relays), every resource is reconciled again, and children changed "
        "or deleted by others are applied again.",
    )
    watch_server_timeout_s: int = Field(
        300,
        ge=10,
        description="Watch requests ask the API server to end them after this long.",
    )
    watch_client_timeout_s: int = Field(
        330,
        ge=10,
        description="...and the client gives up on a stream silent for this long.",
    )
    connect_timeout_s: float = Field(10, gt=0, description="TCP/TLS connect timeout.")
    request_timeout_s: float = Field(30, gt=0, description="Timeout of ordinary API calls.")
    api_concurrency: int = Field(
        16,
        ge=1,
        le=256,
        description="API requests in flight at once (threads of the blocking client).",
    )
    apply_pause_s: float = Field(
        0,
        ge=0,
        description="Pause after applying a relay's ConfigMap, Service and PDB, before its "
        "Deployment. Tests use it to stop the operator in the middle of a reconcile; leave 0 "
        "in production.",
    )
    log_format: str = Field("json", pattern="^(json|text)$", description="json or text.")
    service_host_override: str | None = Field(
        None,
        description="Host the smoke test connects to instead of the preview Service's "
        "cluster DNS name (<service>.<namespace>.svc), on the SmtpRelay's Service ports. "
        "For an operator run outside the cluster; leave unset in production.",
    )


def priority() -> int:
    """This process's peering priority: the newest replica wins.

    kopf pauses every operator that sees a live peer with a higher priority, and *all* of
    them when two share one (kopf/_core/engines/peering.py), so replicas must never tie.
    Start time in milliseconds makes a restarted or upgraded operator take over at once
    instead of waiting out its dead predecessor's keep-alive; three random digits break
    ties between replicas started in the same millisecond. The value stays below 2**53,
    so it survives the JSON round trip through the peering object.
    """
    return int(time.time() * 1000) * 1000 + random.randrange(1000)


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Tune kopf for a long-running, possibly replicated operator."""
    # Watch streams can go silent without the TCP connection breaking, and kopf then
    # waits forever (kopf issues #585, #810). A server-side timeout ends each watch
    # cleanly; the client timeout catches a stream the server never ends.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout_s
    kopf_settings.watching.client_timeout = settings.watch_client_timeout_s
    kopf_settings.watching.connect_timeout = settings.connect_timeout_s
    kopf_settings.networking.connect_timeout = settings.connect_timeout_s
    kopf_settings.networking.request_timeout = settings.request_timeout_s

    # Progress and the last-handled spec go into annotations under our group, not into
    # status: status belongs to our schema, which would prune kopf's fields anyway.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{GROUP}/kopf"

    # The peering object comes from the chart. Watching for CRDs appearing at runtime
    # would need cluster-wide read access to all CRDs; ours are installed first.
    kopf_settings.scanning.disabled = True
    kopf_settings.peering.lifetime = settings.peering_lifetime_s
    kopf_settings.peering.stealth = True

    # Events are the ones the handlers post on purpose (kopf.info/warn), which say what
    # changed and why; kopf's per-handler log lines stay in the log.
    kopf_settings.posting.reporting_component = "smtp-relay-operator"
    kopf_settings.posting.loggers = False
