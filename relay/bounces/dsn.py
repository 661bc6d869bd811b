"""Reading bounces: RFC 3464 delivery status notifications, and the prose ones.

A report arrives at a VERP address, so the relay already knows the message and usually
the recipient; what it needs from the report is *what happened*: failed or only
delayed, the status code, the diagnostic. `parse_report` returns one entry per recipient
the report speaks of.

RFC 3464 reports (multipart/report; report-type=delivery-status) carry a
message/delivery-status part: a per-message block, then one block per recipient with
Final-Recipient, Action (failed, delayed, delivered, relayed, expanded), Status (RFC 3463,
e.g. 5.1.1 or 5.7.133) and optionally Diagnostic-Code, whose type may be `smtp` with a
reply code or not (Postfix writes `X-Postfix; unknown user`). Python's `email` package
parses the part into its blocks; RFC 6533's message/global-delivery-status is parsed here.

MTAs that send no report (qmail, old Exchange, some Exim set-ups) write prose. For those
the relay looks for the addresses it sent to - it knows them - in the human-readable text
before the returned message, and reads the status code near each; this beats guessing
which addresses in a text are recipients. A text that does not read like a bounce at all
(an out-of-office reply sent to the return path) yields nothing.

flufl.bounce was evaluated for this and not used: it returns only addresses, without the
status or the diagnostic that decide hard or soft and fill `bounce_reason`; it counts an
`Action: failed` with a 4.x.x status as permanent; and it missed Exchange 2003's prose.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from typing import Literal

from relay.bounces.classify import classify, find_status, tidy
from relay.bounces.model import Verdict

_REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
_QUOTED_TYPES = ("message/rfc822", "text/rfc822-headers", "message/global", *_REPORT_TYPES)
# Where the returned message starts in prose bounces; nothing after it is the report.
_RETURNED = re.compile(
    r"^\s*(?:-+\s*)?(?:below this line is a copy of the message|this is a copy of the message|"
    r"original message follows|-+ ?original message ?-+|the original message was:|"
    r"original message headers:|returned message|undelivered message headers)",
    re.IGNORECASE | re.MULTILINE,
)
_BOUNCE_WORDS = re.compile(
    r"undeliver|delivery status notification|failure notice|returned mail|"
    r"delivery (?:has )?failed|mail delivery failed|could not be delivered|"
    r"couldn't be delivered|cannot be reached|could not be reached|wasn't able to deliver|"
    r"permanent error|not be delivered|delivery to the following recipient",
    re.IGNORECASE,
)
_DELAY_WORDS = re.compile(
    r"warning only|still being retried|will be retried|will retry|delayed mail|"
    r"not yet been delivered|delivery (?:status notification )?\(delay\)",
    re.IGNORECASE,
)
_CONTEXT = 1200


@dataclass(frozen=True)
class RecipientReport:
    """What a report says about one recipient."""

    address: str | None  # Final-Recipient; None: a prose bounce naming no address we sent to
    original: str | None  # Original-Recipient (the ORCPT we sent), when given
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str | None
    diagnostic: str
    verdict: Verdict | None  # set for failures only

    @property
    def failed(self) -> bool:
        return self.verdict is not None

    def names(self, address: str) -> bool:
        wanted = address.lower()
        return any(a is not None and a.lower() == wanted for a in (self.address, self.original))


@dataclass(frozen=True)
class Report:
    format: Literal["dsn", "prose", "none"]
    recipients: tuple[RecipientReport, ...] = ()

    def failures(self) -> list[RecipientReport]:
        return [r for r in self.recipients if r.failed]


def parse_report(raw: bytes, candidates: Sequence[str] = ()) -> Report:
    """Parse a bounce. `candidates` are the addresses the bounced message was sent to."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    blocks = [block for part in _report_parts(message) for block in _blocks(part)]
    recipients = tuple(r for block in blocks if (r := _from_block(block)) is not None)
    if recipients:
        return Report("dsn", recipients)
    return _prose(message, candidates)


# RFC 3464


def _report_parts(message: Message) -> Iterator[Message]:
    for part in message.walk():
        if part.get_content_type() in _REPORT_TYPES:
            yield part


def _blocks(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks: list[Message] = []
        for block in payload:
            if not isinstance(block, Message):
                continue
            blocks.append(block)
            # message/global-delivery-status is parsed as one message: the per-message
            # block as its headers, the per-recipient blocks as its body.
            rest = block.get_payload()
            if isinstance(rest, str) and rest.strip():
                blocks.extend(_split_blocks(rest))
        return blocks
    body = part.get_payload(decode=True)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(payload)
    return _split_blocks(text)


def _split_blocks(text: str) -> list[Message]:
    parser = HeaderParser(policy=email.policy.compat32)
    chunks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [parser.parsestr(chunk.strip() + "\n") for chunk in chunks if chunk.strip()]


def _from_block(block: Message) -> RecipientReport | None:
    final = _address(block.get("Final-Recipient"))
    original = _address(block.get("Original-Recipient")) or _address(
        block.get("X-Actual-Recipient")
    )
    if final is None and original is None:
        return None  # the per-message block
    status_field = _flat(block.get("Status"))
    diagnostic = _flat(block.get("Diagnostic-Code"))
    # Some MTAs comment their actions ("failed (bad address)"); opensmtpd writes "error".
    action = _flat(block.get("Action")).lower().split(" ")[0] or "failed"
    if action == "error":
        action = "failed"
    diagnostic_text = diagnostic.partition(";")[2].strip() if ";" in diagnostic else diagnostic
    status = find_status(status_field) or find_status(diagnostic_text)
    verdict = None
    if action == "failed" or (action not in _NOT_FAILED and (status or "").startswith("5")):
        verdict = classify(status, diagnostic_text, failed=True)
        action = "failed"
    return RecipientReport(
        address=final or original,
        original=original,
        action=action,
        status=status,
        diagnostic=tidy(diagnostic_text, address=final or original),
        verdict=verdict,
    )


_NOT_FAILED = ("delayed", "delivered", "relayed", "expanded")


def _address(value: object) -> str | None:
    """The address of an `address-type; address` field (rfc822, utf-8, or none given)."""
    text = _flat(value)
    if not text:
        return None
    kind, semicolon, address = text.partition(";")
    address = (address if semicolon else kind).strip().strip("<>").strip()
    return address if "@" in address else None


def _flat(value: object) -> str:
    return " ".join(str(value).split()) if value is not None else ""


# Prose


def _prose(message: Message, candidates: Sequence[str]) -> Report:
    text = _readable_text(message)
    cut = _RETURNED.search(text)
    if cut is not None:
        text = text[: cut.start()]
    subject = _flat(message.get("Subject"))
    if not _BOUNCE_WORDS.search(subject + "\n" + text):
        return Report("none")
    delayed = bool(_DELAY_WORDS.search(subject + "\n" + text))

    found: list[RecipientReport] = []
    lowered = text.lower()
    starts = {c: lowered.find(c.lower()) for c in candidates}
    starts = {c: at for c, at in starts.items() if at >= 0}
    for address, start in starts.items():
        others = [at for c, at in starts.items() if at > start and c.lower() != address.lower()]
        end = min([*others, start + _CONTEXT, len(text)])
        # Up to where the next address's entry starts; qmail's "<a@b>:" brackets trimmed.
        context = text[start + len(address) : end].strip(" \t\r\n:<>")
        found.append(_prose_entry(address, context, delayed))
    if not found:
        found.append(_prose_entry(None, text, delayed))
    return Report("prose", tuple(found))


def _prose_entry(address: str | None, context: str, delayed: bool) -> RecipientReport:
    status = find_status(context)
    if delayed and not (status or "").startswith("5"):
        diagnostic = tidy(context, address=address)
        return RecipientReport(address, None, "delayed", status, diagnostic, None)
    verdict = classify(status, context, failed=True)
    return RecipientReport(
        address=address,
        original=None,
        action="failed",
        status=verdict.status,
        diagnostic=tidy(context, address=address),
        verdict=verdict,
    )


def _readable_text(message: Message) -> str:
    plain: list[str] = []
    html: list[str] = []
    for part in _readable_parts(message):
        body = part.get_payload(decode=True)
        if not isinstance(body, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = body.decode(charset, "replace")
        except LookupError:
            text = body.decode("utf-8", "replace")
        (html if part.get_content_type() == "text/html" else plain).append(text)
    if plain:
        return "\n".join(plain)
    return re.sub(r"<[^>]*>", " ", "\n".join(html))


def _readable_parts(part: Message) -> Iterator[Message]:
    if part.get_content_type() in _QUOTED_TYPES:
        return
    if part.is_multipart():
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from _readable_parts(sub)
    elif part.get_content_maintype() == "text":
        yield part
