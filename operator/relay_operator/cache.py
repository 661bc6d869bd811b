"""The newest version the operator has seen of each watched object.

kopf already streams every SmtpRelay, RelayProvider and relay Deployment to the operator,
and every write the operator makes (apply, status patch) answers with the object as
stored. Reading those instead of GETting the object again saves the API server a request
per read; on a two-core test control plane with 200 relays created at once, the API
server's CPU is what every relay waits for (docs/benchmarks.md, Operator).

Watch events and write answers arrive in no fixed order relative to each other, so an
object is replaced only by a newer one, judged by resourceVersion. The API server calls
it opaque; it is etcd's revision, a number that only grows, and a value that does not
parse as one simply replaces what was there. A deletion is kept as a tombstone with the
deletion's version, so a late write answer cannot bring the object back.
"""

from __future__ import annotations

import time
from typing import Any

from relay_operator.kube import path

# An object known not to exist; older than anything the API server can answer.
_UNKNOWN_VERSION = -1


def url_of(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


def _version(obj: dict[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


class ObjectCache:
    """Objects by URL; `None` for one known to be absent. Used from the event loop only."""

    def __init__(self) -> None:
        # url -> (version, object or None, monotonic time of a tombstone)
        self._entries: dict[str, tuple[int | None, dict[str, Any] | None, float]] = {}

    def lookup(self, url: str) -> tuple[bool, dict[str, Any] | None]:
        """(known, object): known is False when only the API server can tell."""
        entry = self._entries.get(url)
        if entry is None:
            return False, None
        return True, entry[1]

    def seen(self, obj: dict[str, Any], *, url: str | None = None) -> None:
        """A watch event or a write's answer: keep it unless something newer is known."""
        self._keep(url or url_of(obj), _version(obj), obj)

    def gone(self, obj: dict[str, Any]) -> None:
        """A DELETED watch event: the object is absent from its version on."""
        self._keep(url_of(obj), _version(obj), None)

    def absent(self, url: str) -> None:
        """A GET answered 404: absent until any event or write says otherwise."""
        if url not in self._entries:
            self._entries[url] = (_UNKNOWN_VERSION, None, time.monotonic())

    def prune(self, older_than_s: float) -> None:
        """Forget tombstones older than that: deleted objects must not pile up."""
        limit = time.monotonic() - older_than_s
        for url in [u for u, (_, obj, at) in self._entries.items() if obj is None and at < limit]:
            del self._entries[url]

    def _keep(self, url: str, version: int | None, obj: dict[str, Any] | None) -> None:
        old = self._entries.get(url)
        if old is not None and old[0] is not None and version is not None and old[0] > version:
            return
        self._entries[url] = (version, obj, time.monotonic())
