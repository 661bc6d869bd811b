"""Which children the resync applies again: only those that moved on either side.

The whole loop, with a real API server, is in test_cluster.py
(test_the_resync_repairs_only_children_changed_outside).
"""

from __future__ import annotations

import copy
from typing import Any

from relay_operator.drift import Applied, fingerprint

URL = "/apis/apps/v1/namespaces/mail/deployments/relay"


def manifest(image: str = "smtp-relay:1") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "relay", "namespace": "mail", "labels": {"app": "relay"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"image": image}]}}},
    }


def stored(sent: dict[str, Any], version: str = "10", **status: Any) -> dict[str, Any]:
    """The child as the API server answers an apply of `sent`: bookkeeping added."""
    obj = copy.deepcopy(sent)
    obj["metadata"].update(resourceVersion=version, uid="u-1", generation=1)
    obj["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "1"}
    obj["status"] = status
    return obj


def test_nothing_moved_means_no_apply() -> None:
    applied = Applied()
    applied.record(manifest(), stored(manifest()))
    assert applied.verdict(manifest(), {URL: fingerprint(stored(manifest()))}) == "unchanged"


def test_status_and_the_controllers_bookkeeping_are_not_a_change() -> None:
    applied = Applied()
    applied.record(manifest(), stored(manifest()))
    later = stored(manifest(), version="57", readyReplicas=2)
    later["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    assert applied.verdict(manifest(), {URL: fingerprint(later)}) == "unchanged"


def test_a_new_manifest_is_applied() -> None:
    applied = Applied()
    applied.record(manifest(), stored(manifest()))
    live = {URL: fingerprint(stored(manifest()))}
    assert applied.verdict(manifest(image="smtp-relay:2"), live) == "ours"
    # Never applied by this operator (it just started): applied once, without blame.
    assert Applied().verdict(manifest(), live) == "ours"


def test_an_edit_or_a_deletion_by_someone_else_is_theirs() -> None:
    applied = Applied()
    applied.record(manifest(), stored(manifest()))
    scaled = stored(manifest())
    scaled["spec"]["replicas"] = 5  # kubectl scale
    assert applied.verdict(manifest(), {URL: fingerprint(scaled)}) == "theirs"
    relabelled = stored(manifest())
    relabelled["metadata"]["labels"]["app"] = "other"
    assert applied.verdict(manifest(), {URL: fingerprint(relabelled)}) == "theirs"
    assert applied.verdict(manifest(), {}) == "theirs"


def test_a_pass_forgets_children_neither_listed_nor_applied() -> None:
    applied = Applied()
    applied.record(manifest(), stored(manifest()))
    applied.begin_pass()
    # Deleted by someone this pass, and applied again by it: remembered.
    applied.record(manifest(), stored(manifest()))
    applied.end_pass({})
    assert applied.verdict(manifest(), {URL: fingerprint(stored(manifest()))}) == "unchanged"
    # The relay is gone: its children were neither listed nor applied.
    applied.begin_pass()
    applied.end_pass({})
    assert applied.verdict(manifest(), {URL: fingerprint(stored(manifest()))}) == "ours"
