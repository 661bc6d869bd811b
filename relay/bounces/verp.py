"""VERP return paths: the envelope sender says which message and recipient bounced.

Each message leaves with `bounces+<queue id>-<recipient row id>-<tag>@<verp_domain>` as
its MAIL FROM (or `bounces+<queue id>-<tag>@...` when one envelope carries several
recipients), so a delivery status notification is attributed by the address it is sent
to, not by guessing from its headers (Bernstein's VERP; RFC 3464 section 2 makes no
promise that a report names the recipient the way we sent it).

The tag is an HMAC of the ids under `bounces.verp_key`, 9 base32 characters (45 bits): an
outsider who has not seen the message cannot make an address that we accept, so cannot
suppress somebody else's address by mailing us fake bounces. Everything is lower case,
because some MTAs fold the case of return paths; queue ids are Crockford base32 and read
back in upper case. The longest address is 8 + 26 + 1 + 19 + 1 + 9 = 64 octets, RFC 5321's
limit for a local part, at the largest possible row id.

The key is read when a codec is made; a rotated key makes outstanding addresses invalid,
so bounces for mail sent before the rotation are refused (550) rather than misattributed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from relay.config import BounceSettings

PREFIX = "bounces"
_TAG_LENGTH = 9
# Crockford base32 in lower case, the decimal row id, base32 (RFC 4648) for the tag.
_LOCAL = re.compile(
    rf"^{PREFIX}\+(?P<id>[0-9a-hjkmnp-tv-z]{{26}})(?:-(?P<row>[0-9]{{1,19}}))?"
    rf"-(?P<tag>[a-z2-7]{{{_TAG_LENGTH}}})$"
)


@dataclass(frozen=True)
class VerpTarget:
    """What a VERP address names: a queued message, and one of its recipients if known."""

    message_id: str
    row_id: int | None


class VerpCodec:
    def __init__(self, domain: str, key: bytes) -> None:
        if not key:
            raise ValueError("a VERP key is required")
        self.domain = domain.lower()
        self._key = key

    def __repr__(self) -> str:
        return f"VerpCodec(domain={self.domain!r}, key=<hidden>)"

    def address(self, message_id: str, row_id: int | None = None) -> str:
        ids = message_id.lower() + ("" if row_id is None else f"-{row_id}")
        return f"{PREFIX}+{ids}-{self._tag(ids)}@{self.domain}"

    def owns(self, address: str) -> bool:
        """Whether `address` is in the bounce domain (valid or not)."""
        return address.rpartition("@")[2].lower().rstrip(".") == self.domain

    def parse(self, address: str) -> VerpTarget | None:
        """The target of a valid, correctly tagged address in our domain; else None."""
        local, _, domain = address.lower().rpartition("@")
        if domain.rstrip(".") != self.domain:
            return None
        match = _LOCAL.match(local)
        if match is None:
            return None
        ids = match["id"] + (f"-{match['row']}" if match["row"] else "")
        if not hmac.compare_digest(match["tag"], self._tag(ids)):
            return None
        return VerpTarget(match["id"].upper(), int(match["row"]) if match["row"] else None)

    def _tag(self, ids: str) -> str:
        digest = hmac.new(self._key, b"relay-verp-1\0" + ids.encode(), hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii").lower()[:_TAG_LENGTH]


def codec(settings: BounceSettings) -> VerpCodec | None:
    """The codec for the configured bounce domain, or None when VERP is off."""
    if settings.verp_domain is None:
        return None
    return VerpCodec(settings.verp_domain, settings.resolved_verp_key())


def verp_sender(
    settings: BounceSettings, *, message_id: str, original: str, row_id: int | None = None
) -> str:
    """The MAIL FROM a provider should use for this message (and recipient row).

    `original` is the sender the client gave. The null sender stays null: notifications
    must not have a return path (RFC 5321 section 4.5.5), or bounces could loop. Without
    `bounces.verp_domain` the original sender is used unchanged.
    """
    verp = codec(settings)
    if verp is None or not original or original == "<>":
        return original
    return verp.address(message_id, row_id)


def parse_verp(settings: BounceSettings, address: str) -> VerpTarget | None:
    """The message (and row) a bounce address names, if it is ours and correctly tagged."""
    verp = codec(settings)
    return verp.parse(address) if verp is not None else None
