"""Bounce and suppression metrics. Labels are bounded: types, sources and reasons from
fixed lists, never an address or a message id (see relay.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

bounces_total = Counter(
    "bounces_total",
    "Bounce, complaint and delivery events applied to a recipient, by type "
    "(hard, soft, complaint, delivered) and source (dsn, mailgun, send).",
    ["type", "source"],
)
suppressions_total = Counter(
    "suppressions_total",
    "Addresses made INACTIVE, by reason (hard_bounce, complaint, manual).",
    ["reason"],
)
suppressed_recipients = Gauge(
    "suppressed_recipients",
    "INACTIVE addresses in all workspaces, read from the shared database.",
    multiprocess_mode="mostrecent",
)
suppressed_rcpt_total = Counter(
    "suppressed_rcpt_total",
    "RCPTs naming a suppressed address, by action (refused, recorded).",
    ["action"],
)
inbound_reports_total = Counter(
    "inbound_reports_total",
    "Mail received at VERP addresses, by what it was (dsn, prose, none).",
    ["format"],
)
webhook_requests_total = Counter(
    "webhook_requests_total",
    "Provider webhook calls, by provider and outcome (accepted, ignored, duplicate, "
    "bad_signature, stale, replay, malformed, unconfigured, retry).",
    ["provider", "outcome"],
)
