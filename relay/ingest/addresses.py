"""Envelope address checks at MAIL and RCPT.

Syntax only (RFC 5321 section 4.1.2 and 4.5.3.1 limits); routing tricks that could turn the
relay into an open relay are refused separately by the edge policy.
"""

from __future__ import annotations

import re

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)$")
_ADDRESS_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|\d{1,3}(?:\.\d{1,3}){3})\]$")


def address_problem(address: str) -> str | None:
    """Why `address` is not a usable mailbox, or None when it is."""
    if not address.isascii() and not _is_utf8(address):
        # Bytes that are not UTF-8 come in kept as surrogates: no provider could send to
        # them, and the label pattern below would take them for letters.
        return "address is not valid UTF-8"
    if _CONTROL_OR_SPACE.search(address):
        return "address contains spaces or control characters"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "address must be local-part@domain"
    if len(local.encode("utf-8", "surrogateescape")) > 64:
        return "local part longer than 64 octets"
    if len(domain.encode("utf-8", "surrogateescape")) > 255:
        return "domain longer than 255 octets"
    if _ADDRESS_LITERAL.match(domain):
        return None
    labels = domain.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        return "domain is not a valid host name"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
