"""Mailgun's webhooks: signature, freshness, replay, and what each event means.

Mailgun ("Securing Webhooks") signs every call: the JSON body carries
`signature: {timestamp, token, signature}`, where `signature` is the hex HMAC-SHA256 of
`timestamp + token` (no separator) under the account's webhook signing key; calls for a
subaccount may carry `parent-signature`, the same under the primary account's key. A
call is accepted only when a signature matches, its timestamp is within 15 minutes of our
clock, and its token has not been seen before by any replica (webhook_events).

Mailgun ("Automatic Retries") retries any answer but 200 and 406 for 8 hours, so a call
we will never accept is answered 406 and one we failed to process is answered 503.

Events (Mailgun "Event Types"): `failed` with severity permanent is a bounce - hard unless
the remote's code says the address is fine (see classify) - and severity temporary a soft
one that Mailgun itself keeps retrying; `complained` suppresses the address; `delivered`
confirms it. Other events are acknowledged and ignored. Mailgun adds fields over time:
only the ones read here are looked at, and each is optional.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from relay.bounces.classify import classify, find_status, tidy
from relay.bounces.model import BounceEvent, EventKind, OnceKey, Source

MAX_SKEW = timedelta(minutes=15)
# A token need only be remembered while a replay of it could still look fresh.
_TOKEN_TTL = 2 * MAX_SKEW
# Mailgun retries for 8 hours; its event ids are unique within a day.
_EVENT_TTL = timedelta(hours=12)
_QUEUE_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_BODY = 1024 * 1024


class WebhookRejected(Exception):
    """A call that is never accepted; args[0] is the outcome (the metric label)."""


@dataclass(frozen=True)
class SignedCall:
    token: str
    timestamp: int
    event: dict[str, Any]


def verify(body: bytes, key: str, *, now: datetime) -> SignedCall:
    """Parse and authenticate a webhook body, or raise WebhookRejected."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected("malformed") from None
    signature = payload.get("signature") if isinstance(payload, dict) else None
    if not isinstance(signature, dict):
        raise WebhookRejected("malformed")
    timestamp, token = str(signature.get("timestamp", "")), str(signature.get("token", ""))
    if not timestamp.isdigit() or not token or len(token) > 512:
        raise WebhookRejected("malformed")

    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    offered = [str(signature.get(name, "")).lower() for name in ("signature", "parent-signature")]
    # Both are compared, always, so the time taken does not say which one was present.
    matches = [hmac.compare_digest(expected, o) for o in offered if _HEX.match(o)]
    if not any(matches):
        raise WebhookRejected("bad_signature")

    if abs(now.timestamp() - int(timestamp)) > MAX_SKEW.total_seconds():
        raise WebhookRejected("stale")
    event = payload.get("event-data")
    if not isinstance(event, dict):
        raise WebhookRejected("malformed")
    return SignedCall(token, int(timestamp), event)


def once_keys(call: SignedCall, *, now: datetime) -> list[OnceKey]:
    """The token (a replay is refused) and the event id (a retry is not applied twice)."""
    keys = [OnceKey("mailgun-token", _digest(call.token), now + _TOKEN_TTL)]
    event_id = call.event.get("id")
    if isinstance(event_id, str) and event_id:
        keys.append(OnceKey("mailgun-event", _digest(event_id), now + _EVENT_TTL))
    return keys


def to_bounce_event(event: dict[str, Any]) -> BounceEvent | None:
    """The relay's reading of an event, or None when it says nothing about bounces."""
    name = str(event.get("event", "")).lower()
    variables = event.get("user-variables")
    message_id = variables.get("relay-message-id") if isinstance(variables, dict) else None
    recipient = event.get("recipient")
    if not isinstance(message_id, str) or not _QUEUE_ID.match(message_id.upper()):
        return None
    if not isinstance(recipient, str) or "@" not in recipient:
        return None
    message_id = message_id.upper()

    def make(kind: EventKind, reason: str, **extra: Any) -> BounceEvent:
        return BounceEvent(
            source=Source.MAILGUN,
            kind=kind,
            address=recipient,
            message_id=message_id,
            reason=reason,
            **extra,
        )

    if name == "delivered":
        return make(EventKind.DELIVERED, "")
    if name == "complained":
        return make(EventKind.COMPLAINT, "spam complaint (Mailgun)")
    if name != "failed":
        return None

    text, status = _delivery_status(event)
    reason = str(event.get("reason", "")).lower()
    severity = str(event.get("severity", "")).lower()
    said = tidy(text or f"Mailgun: {reason or 'failed'}", address=recipient)
    if severity == "temporary":
        # Mailgun is still trying: the address is marked, the message left to Mailgun.
        return make(EventKind.SOFT, said, status=status, touch_message=False)
    if reason == "suppress-complaint":
        return make(EventKind.COMPLAINT, said, status=status)
    verdict = classify(status, text, failed=True)
    kind = EventKind(verdict.bounce_type.value)
    return make(kind, said, status=verdict.status, retry=verdict.retry)


def _delivery_status(event: dict[str, Any]) -> tuple[str, str | None]:
    delivery = event.get("delivery-status")
    if not isinstance(delivery, dict):
        return "", None
    parts = [delivery.get("code"), delivery.get("message"), delivery.get("description")]
    text = " ".join(str(p) for p in parts if p not in (None, "", 0))
    enhanced = delivery.get("enhanced-code")
    status = find_status(str(enhanced)) if enhanced else None
    return text, status or find_status(text)


def _digest(value: str) -> str:
    # Fixed length and charset for the key column, whatever Mailgun sends.
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()
