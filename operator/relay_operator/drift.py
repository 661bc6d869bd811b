"""Which of a relay's children the periodic resync must apply again.

The resync is what repairs a child that someone else edited or deleted. Applying every
child of every relay each period did that, at four PATCH requests per relay per period
(800 a minute for 200 relays), nearly all of them changing nothing. Instead the resync
lists the children once per period (four requests in all, served from the API server's
watch cache) and applies a child only when one side moved:

- ours: the manifest the operator would apply now differs from the one it last applied
  (a new Secret version, a provider's change, a new operator release);
- theirs: the stored child no longer matches what our last apply left (an edit, a
  `kubectl scale`, a deletion).

A child's fingerprint covers what others could change and the operator sets: labels,
annotations, owner references, spec or data. Status and the server's own bookkeeping
move by themselves and are left out, or every Deployment would be re-applied whenever
its pods changed. An operator that has just started knows nothing of its last applies
and applies everything once, as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relay_operator.builders import digest
from relay_operator.kube import Kube, path

# The children's kinds: (apiVersion, kind), and the cluster-wide list of each.
CHILD_KINDS = (
    ("v1", "ConfigMap", "/api/v1/configmaps"),
    ("v1", "Service", "/api/v1/services"),
    ("apps/v1", "Deployment", "/apis/apps/v1/deployments"),
    ("policy/v1", "PodDisruptionBudget", "/apis/policy/v1/poddisruptionbudgets"),
)

# Annotations the API server's controllers write on our children: the Deployment
# controller numbers each revision of the pod template it rolls out.
_SERVER_ANNOTATIONS = frozenset({"deployment.kubernetes.io/revision"})


def fingerprint(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    kept = {
        "labels": meta.get("labels") or {},
        "annotations": {k: v for k, v in annotations.items() if k not in _SERVER_ANNOTATIONS},
        "ownerReferences": meta.get("ownerReferences") or [],
        "spec": obj.get("spec"),
        "data": obj.get("data"),
    }
    return digest(json.dumps(kept, sort_keys=True))


def _digest(manifest: Mapping[str, Any]) -> str:
    return digest(json.dumps(manifest, sort_keys=True))


def _url(api_version: str, kind: str, meta: Mapping[str, Any]) -> str:
    return path(api_version, kind, meta["namespace"], meta["name"])


async def live_children(kube: Kube, labels: Mapping[str, str]) -> dict[str, str]:
    """URL -> fingerprint of every child the operator manages, in four requests."""
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    found: dict[str, str] = {}
    for api_version, kind, url in CHILD_KINDS:
        # Listed items carry no apiVersion or kind: the list names them once.
        for child in await kube.list(url, labelSelector=selector):
            found[_url(api_version, kind, child["metadata"])] = fingerprint(child)
    return found


class Applied:
    """Per child URL: the digest of the manifest last applied, and the fingerprint of the
    child that apply left. Used from the event loop only."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, str]] = {}
        self._touched: set[str] = set()

    def record(self, manifest: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        url = _url(manifest["apiVersion"], manifest["kind"], manifest["metadata"])
        self._entries[url] = (_digest(manifest), fingerprint(result))
        self._touched.add(url)

    def verdict(self, manifest: Mapping[str, Any], live: Mapping[str, str]) -> str:
        """ "unchanged" (no apply needed), "ours" (the operator's manifest changed, or
        this operator never applied it), or "theirs" (someone else changed or deleted
        the child since the operator's last apply)."""
        url = _url(manifest["apiVersion"], manifest["kind"], manifest["metadata"])
        known = self._entries.get(url)
        if known is None or known[0] != _digest(manifest):
            return "ours"
        if live.get(url) != known[1]:
            return "theirs"
        return "unchanged"

    def begin_pass(self) -> None:
        self._touched.clear()

    def end_pass(self, live: Mapping[str, str]) -> None:
        """Forget the children of relays that are gone (neither listed nor applied in
        this pass), so the table does not grow with every relay ever deleted."""
        for url in [u for u in self._entries if u not in live and u not in self._touched]:
            del self._entries[url]
