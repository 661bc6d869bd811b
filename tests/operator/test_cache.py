"""The operator's object cache: newest version wins, whichever way it arrived."""

from __future__ import annotations

import time
from typing import Any

from relay_operator.cache import ObjectCache, url_of

URL = "/apis/apps/v1/namespaces/mail/deployments/relay"


def deployment(version: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "relay", "namespace": "mail", "resourceVersion": version},
        "spec": {"replicas": replicas},
    }


def test_an_unknown_object_is_left_to_the_api_server() -> None:
    assert ObjectCache().lookup(URL) == (False, None)


def test_the_url_is_the_one_kube_reads() -> None:
    assert url_of(deployment("1")) == URL


def test_an_older_version_never_replaces_a_newer_one() -> None:
    cache = ObjectCache()
    cache.seen(deployment("12", replicas=2))  # the answer to our apply
    cache.seen(deployment("11", replicas=1))  # the watch, catching up
    assert cache.lookup(URL) == (True, deployment("12", replicas=2))
    cache.seen(deployment("13", replicas=3))
    assert cache.lookup(URL)[1] == deployment("13", replicas=3)


def test_versions_compare_as_numbers() -> None:
    cache = ObjectCache()
    cache.seen(deployment("100"))
    cache.seen(deployment("99"))
    assert cache.lookup(URL)[1] == deployment("100")


def test_a_version_that_is_not_a_number_replaces() -> None:
    cache = ObjectCache()
    cache.seen(deployment("12"))
    cache.seen(deployment("opaque"))
    assert cache.lookup(URL)[1] == deployment("opaque")


def test_a_deletion_is_not_undone_by_a_late_answer() -> None:
    cache = ObjectCache()
    cache.seen(deployment("12"))
    cache.gone(deployment("14"))
    cache.seen(deployment("13"))
    assert cache.lookup(URL) == (True, None)
    cache.seen(deployment("15"))  # created again
    assert cache.lookup(URL)[1] == deployment("15")


def test_a_404_is_remembered_until_anything_is_seen() -> None:
    cache = ObjectCache()
    cache.absent(URL)
    assert cache.lookup(URL) == (True, None)
    cache.seen(deployment("1"))
    assert cache.lookup(URL)[1] == deployment("1")
    cache.absent(URL)  # a 404 never hides what a watch or write has shown
    assert cache.lookup(URL)[1] == deployment("1")


def test_prune_forgets_old_tombstones_only() -> None:
    cache = ObjectCache()
    cache.gone(deployment("3"))
    other = {**deployment("4"), "metadata": {**deployment("4")["metadata"], "name": "other"}}
    cache.seen(other)
    time.sleep(0.01)
    cache.prune(older_than_s=0)
    assert cache.lookup(URL) == (False, None)
    assert cache.lookup(url_of(other)) == (True, other)
