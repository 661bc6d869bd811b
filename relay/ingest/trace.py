"""The Received: trace header (RFC 5321 section 4.4) and cheap reads of the header block."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import policy
from email.parser import BytesHeaderParser
from email.utils import format_datetime

_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def protocol_name(*, extended: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    """The `with` clause keyword, per RFC 3848 and RFC 6531."""
    if utf8:
        base = "UTF8SMTP"
    else:
        base = "ESMTP" if extended else "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return base + suffix


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: tuple[str, ...],
    when: datetime | None = None,
) -> bytes:
    # The HELO argument is the client's to choose: only harmless characters reach the header.
    safe_helo = _HELO_SAFE.sub("?", helo or "")[:255] or "unknown"
    stamp = format_datetime((when or datetime.now(UTC)).astimezone(UTC))
    lines = [
        f"Received: from {safe_helo} ([{peer_ip}])",
        f"\tby {hostname} (smtp-relay) with {protocol} id {queue_id}",
    ]
    # Naming the recipient only when there is one, as Postfix does: with several it would
    # tell each recipient who else got the message.
    if len(recipients) == 1 and "\r" not in recipients[0] and "\n" not in recipients[0]:
        lines.append(f"\tfor <{recipients[0]}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def subject_of(content: bytes, limit: int = 998) -> str | None:
    """The decoded Subject, for the runbook's queries; None when absent or unreadable."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 4]
    try:
        headers = BytesHeaderParser(policy=policy.default).parsebytes(head)
        subject = headers.get("subject")
    except Exception:
        return None
    if subject is None:
        return None
    return " ".join(str(subject).split())[:limit]
