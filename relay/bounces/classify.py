"""Hard or soft: one rule for every source (DSNs, Mailgun events, replies at send time).

The codes are RFC 3463's enhanced status codes, `class.subject.detail`, where subject and
detail may each have up to three digits (Microsoft sends 5.7.133; RFC 3463 section 2).
Class 4 is transient, class 5 permanent. A permanent failure is *hard* - it counts
towards suppressing the address - only when it is about the address: subject 1
(addressing, except 5.1.7 and 5.1.8, which are about *our* sender), a disabled mailbox
(5.2.1), a domain that does not route (5.4.4), or a reply that says so in words. Policy,
content and system failures (5.7.x spam blocks, 5.3.4 too big) are *soft*: the patient's
address is fine, and suppressing it because our IP was on a block list would lose their
next reminder. A permanent failure that says nothing more specific (5.0.0, or a provider's
bare "permanent") is taken at its word and counted hard.

A soft bounce is sent again after `bounces.soft_bounce_retry` when it may succeed later:
a transient class, or a full mailbox (5.2.2, which RFC 3463 allows for both).
"""

from __future__ import annotations

import re

from relay.bounces.model import BounceType, Verdict

STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An SMTP reply code at the start of a line or of a diagnostic, "550 " or "550-".
_REPLY_CODE = re.compile(r"^\s*([245][0-5]\d)(?:[ -]|$)", re.MULTILINE)

_UNKNOWN_USER = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address)|"
    r"(?:does not|doesn't|did not|not) exist|unknown (?:recipient|address)|"
    r"recipient not found|address not found|addressee unknown|no mailbox here|"
    r"mailbox (?:not found|disabled|deactivated)|invalid (?:recipient|mailbox)|"
    r"not a valid (?:mailbox|recipient)|account (?:is )?(?:disabled|deactivated|closed)|"
    r"recipientnotfound|unrouteable address|no longer (?:in use|active)",
    re.IGNORECASE,
)
_MAILBOX_FULL = re.compile(
    r"mailbox (?:is )?full|over ?quota|quota (?:exceeded|full)|out of storage|"
    r"insufficient (?:system )?storage|inbox is full|exceeded (?:its|the) storage",
    re.IGNORECASE,
)
_POLICY = re.compile(
    r"block(?:ed|list)|black ?list|spam|reputation|policy|rejected for policy|"
    r"not authori[sz]ed|authentication required|dmarc|spf|dkim",
    re.IGNORECASE,
)
_HARD_SPECIFIC = {(2, 1), (4, 4)}
_OUR_SENDER = {7, 8}  # 5.1.7 bad sender mailbox syntax, 5.1.8 bad sender's system address


def find_status(text: str) -> str | None:
    """The first enhanced status code in `text`, e.g. "5.1.10"."""
    match = STATUS.search(text)
    return ".".join(str(int(part)) for part in match.groups()) if match else None


def reply_class(text: str) -> str | None:
    """The class ("4" or "5") of an SMTP reply code opening a line of `text`, if any."""
    match = _REPLY_CODE.search(text)
    return match[1][0] if match and match[1][0] in "45" else None


def classify(status: str | None, text: str, *, failed: bool) -> Verdict:
    """The verdict on a failed delivery.

    `status` is the enhanced status the source gave (else one is looked for in `text`);
    `failed` says the source gave up on this message (a DSN's `Action: failed`, a
    provider's "permanent"), which decides when no code says otherwise.
    """
    status = _normal(status) or find_status(text)
    klass = status[0] if status else reply_class(text) or ("5" if failed else "4")
    if klass != "5":
        return Verdict(BounceType.SOFT, retry=True, status=status)
    subject, detail = _subject_detail(status)
    if (subject, detail) == (2, 2) or _MAILBOX_FULL.search(text):
        return Verdict(BounceType.SOFT, retry=True, status=status)
    if subject == 1 and detail not in _OUR_SENDER:
        return Verdict(BounceType.HARD, retry=False, status=status)
    if (subject, detail) in _HARD_SPECIFIC or _UNKNOWN_USER.search(text):
        return Verdict(BounceType.HARD, retry=False, status=status)
    if subject in (None, 0) and not _POLICY.search(text):
        return Verdict(BounceType.HARD, retry=False, status=status)
    return Verdict(BounceType.SOFT, retry=False, status=status)


def _normal(status: str | None) -> str | None:
    if not status:
        return None
    match = STATUS.fullmatch(status.strip())
    return ".".join(str(int(part)) for part in match.groups()) if match else None


def _subject_detail(status: str | None) -> tuple[int | None, int | None]:
    if status is None:
        return None, None
    _, subject, detail = status.split(".")
    return int(subject), int(detail)


def tidy(text: str, *, address: str | None = None, limit: int = 500) -> str:
    """A reason fit for message_recipients.bounce_reason, grouped by runbook 4.3's query 3.

    Whitespace is collapsed, the repeated code prefixes of a multi-line reply ("550-5.1.1")
    are dropped, and the recipient's own address is replaced, so that the same failure at
    different addresses reads the same (and the reason column does not repeat addresses).
    """
    flat = " ".join(text.split())
    seen = False

    def once(match: re.Match[str]) -> str:
        nonlocal seen
        if seen:
            return ""
        seen = True
        return f"{match[1]} {match[2]} "

    flat = re.sub(r"\b([245]\d\d)[ -]([245]\.\d{1,3}\.\d{1,3})\s+", once, flat)
    if address:
        pattern = f"<?{re.escape(address)}>?"
        flat = re.sub(pattern, "<recipient>", flat, flags=re.IGNORECASE)
    return flat.strip()[:limit]
