"""Prometheus metrics, named as the runbook names them (sections 1.2, 3.1, 3.2).

Labels stay bounded: workspace (from configuration), provider (from configuration), an
outcome or error kind from a fixed list, a reply class. Never an address, a message id or
free text. Queue gauges are read from the shared database by every replica, so any one
replica's scrape shows the whole queue, not its own share.

With `smtp.processes` or `delivery.processes` above 1 the processes of one relay write their
samples to files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode,
chosen before this module is imported) and /metrics adds them up. Each gauge says how:
figures read from the database or about the whole relay take the latest value written
(`mostrecent`), per-process counts add up over the processes alive (`livesum`), and a
provider is healthy only while every delivery process finds it so (`livemin`). Counters
and histograms always add up.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

emails_processed_total = Counter(
    "emails_processed_total",
    "Delivery attempts finished, by outcome (sent, deferred, failed).",
    ["workspace", "outcome"],
)
emails_delivered_total = Counter(
    "emails_delivered_total",
    "Messages delivered to every recipient.",
    ["workspace"],
)
email_processing_duration_seconds = Histogram(
    "email_processing_duration_seconds",
    "Time for one delivery attempt of one message, all providers tried included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
provider_requests_total = Counter(
    "provider_requests_total",
    "Sends handed to a provider, by status: success, or the failure kind.",
    ["provider", "status"],
)
provider_health = Gauge(
    "provider_health",
    "1 while the provider's circuit is closed (in rotation), 0 while open or probing.",
    ["provider"],
    # With delivery.processes above 1 each process has its own breaker: 0 if any is open.
    multiprocess_mode="livemin",
)
errors_total = Counter(
    "errors_total",
    "Errors inside the relay, by type (enqueue, store, provider, crash).",
    ["type"],
)
email_queue_depth = Gauge(
    "email_queue_depth",
    "Messages queued or being delivered, across all replicas.",
    multiprocess_mode="mostrecent",
)
email_queue_messages = Gauge(
    "email_queue_messages",
    "Messages in the queue database by status; queued and processing every 5 s, the"
    " finished statuses (sent, failed, bounced) every 5 minutes.",
    ["status"],
    multiprocess_mode="mostrecent",
)
email_queue_oldest_age_seconds = Gauge(
    "email_queue_oldest_age_seconds",
    "Age of the oldest message not yet delivered.",
    multiprocess_mode="mostrecent",
)
rate_limit_remaining = Gauge(
    "rate_limit_remaining",
    "Tokens left in the workspace's per-second bucket on this replica (all its processes).",
    ["workspace"],
    multiprocess_mode="livesum",
)
rate_limit_burst = Gauge(
    "rate_limit_burst",
    "The workspace's bucket size (with any override).",
    ["workspace"],
    multiprocess_mode="mostrecent",
)
rate_limit_rejections_total = Counter(
    "rate_limit_rejections_total",
    "Submissions refused by a rate limit or daily quota.",
    ["workspace", "limit"],
)
smtp_replies_total = Counter(
    "smtp_replies_total", "SMTP replies sent, by class (2xx, 4xx, 5xx).", ["class"]
)
smtp_sessions = Gauge(
    "smtp_sessions", "Open SMTP sessions on this replica.", multiprocess_mode="livesum"
)
smtp_messages_accepted_total = Counter(
    "smtp_messages_accepted_total",
    "Messages committed to the queue and answered 250.",
    ["workspace"],
)
maintenance_mode = Gauge(
    "maintenance_mode",
    "1 while new SMTP sessions are refused for maintenance.",
    multiprocess_mode="mostrecent",
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: delivery asks for the same few on every
    message, and prometheus_client validates and locks on each call."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def provider_health_of_every_process() -> dict[str, float]:
    """provider -> the lowest `provider_health` of the relay's live processes, read from
    the multiprocess directory (multiprocess mode only)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return {
        sample.labels["provider"]: sample.value
        for family in registry.collect()
        if family.name == "provider_health"
        for sample in family.samples
    }
