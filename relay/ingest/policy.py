"""The edge policy: who may relay, as which workspace, from which senders, to which addresses.

The relay is never an open relay: a client either authenticates as a workspace user or
connects from a network configured as trusted. Addresses that route mail onwards by
themselves (source routes, `%` and `!` hacks, quoted local parts hiding an `@`) are refused
the way Postfix refuses untrusted routing, since a downstream MTA might honour them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import idna
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from relay.config import Network, Settings, WorkspaceSettings
from relay.ingest.addresses import address_problem

_VERIFIED_TTL_S = 300.0


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@dataclass(frozen=True)
class Identity:
    """Who a session submits as."""

    workspace_id: str
    user: str | None  # the AUTH login; None for a trusted network

    def __str__(self) -> str:
        return self.user or f"trusted:{self.workspace_id}"


class Authenticator:
    """Checks SMTP AUTH credentials against the Argon2 hashes in configuration.

    Argon2 is deliberately slow and memory-hungry, so it runs in a thread, and a success is
    remembered for a few minutes (as an HMAC under a per-process key, never the password)
    so that applications opening a connection per message do not pay for it every time.
    """

    def __init__(self, settings: Settings) -> None:
        self._users: dict[str, tuple[str, str]] = {}
        for workspace_id, workspace in settings.workspaces.items():
            for login, user in workspace.users.items():
                self._users[login] = (workspace_id, user.password_hash)
        self._hasher = PasswordHasher()
        self._key = os.urandom(32)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._settings = settings

    async def verify(self, login: str, password: bytes) -> Identity | None:
        entry = self._users.get(login)
        if entry is None:
            # Spend the same time as for a real user, so user names cannot be probed.
            await asyncio.to_thread(self._burn)
            return None
        workspace_id, password_hash = entry
        mark = hmac.new(self._key, login.encode() + b"\0" + password, hashlib.sha256).digest()
        cached = self._verified.get(login)
        if cached and cached[1] > time.monotonic() and hmac.compare_digest(cached[0], mark):
            return Identity(workspace_id, login)
        if not await asyncio.to_thread(self._check, password_hash, password):
            return None
        self._verified[login] = (mark, time.monotonic() + _VERIFIED_TTL_S)
        return Identity(workspace_id, login)

    def _check(self, password_hash: str, password: bytes) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def _burn(self) -> None:
        self._check(_DUMMY_HASH, b"not the password")

    def workspace_of(self, login: str) -> str | None:
        entry = self._users.get(login)
        return entry[0] if entry else None


_DUMMY_HASH = PasswordHasher().hash("dummy-password-for-timing")


def hash_password(password: str) -> str:
    return PasswordHasher().hash(password)


class AddressError(Exception):
    """An address the relay refuses; args[0] is the SMTP reply."""


def check_routing(address: str) -> None:
    """Refuse addresses that smuggle their own routing (RFC 5321 appendix C, RFC 1123)."""
    local, _, _ = address.rpartition("@")
    if local.startswith('"'):
        inner = local.strip('"')
        if any(mark in inner for mark in "@%!"):
            raise AddressError(
                "553 5.7.1 Quoted local part hides a routing address; relaying denied"
            )
    if "%" in local or "!" in local:
        raise AddressError("553 5.7.1 Percent or bang routing is not allowed; relaying denied")
    if "@" in local.strip('"'):
        raise AddressError("553 5.7.1 Local part hides a routing address; relaying denied")


def normalise(address: str, *, smtputf8: bool, role: str) -> str:
    """Syntax-check an address and convert its domain to an IDNA2008 A-label.

    Python's built-in "idna" codec implements IDNA2003, which maps `straße.de` to
    `strasse.de` - a different domain, possibly someone else's. The `idna` package
    implements IDNA2008 with UTS #46 mapping: `xn--strae-oqa.de`.
    """
    detail = "5.1.7" if role == "sender" else "5.1.3"
    if problem := address_problem(address):
        raise AddressError(f"501 {detail} Bad {role} address syntax: {problem}")
    check_routing(address)
    local, _, domain = address.rpartition("@")
    if not local.isascii() and not smtputf8:
        raise AddressError(f"553 5.6.7 Non-ASCII {role} address requires SMTPUTF8")
    if domain.isascii() or domain.startswith("["):
        return f"{local}@{domain.lower()}"
    try:
        a_label = idna.encode(domain.rstrip("."), uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise AddressError(f"501 {detail} Bad {role} domain: {exc}") from None
    return f"{local}@{a_label}"


def sender_allowed(workspace: WorkspaceSettings, address: str) -> bool:
    if not workspace.sender_domains:
        return True
    domain = address.rpartition("@")[2].lower()
    for allowed in workspace.sender_domains:
        if allowed.startswith("*."):
            if domain.endswith(allowed[1:]) or domain == allowed[2:]:
                return True
        elif domain == allowed:
            return True
    return False
