"""A small Kubernetes REST client: plain dicts in and out, server-side apply, in threads.

The official client's typed models would turn every manifest the builders produce into
generated classes and back; this keeps them as the plain data they are and uses only the
client's connection handling and authentication (kubeconfig or in-cluster token, with
its refresh). Every call is blocking, so the operator's coroutines go through `Kube`'s
async methods, which run the request in a worker thread and keep kopf's event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kubernetes

from relay_operator.models import API_VERSION

FIELD_MANAGER = "smtp-relay-operator"
_T = TypeVar("_T")

# apiVersion, kind -> URL prefix and plural, for the kinds the operator touches.
_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("apps/v1", "ReplicaSet"): ("/apis/apps/v1", "replicasets"),
    ("apps/v1", "ControllerRevision"): ("/apis/apps/v1", "controllerrevisions"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    (API_VERSION, "SmtpRelay"): (f"/apis/{API_VERSION}", "smtprelays"),
    (API_VERSION, "RelayProvider"): (f"/apis/{API_VERSION}", "relayproviders"),
}


# The order in which waiting requests get a thread: (class, ticket), lowest first. Requests
# that make a relay's children exist are class 0, ticketed by when their reconcile began,
# so that in a burst the relays finish in the order they came, each soon after its turn.
# Everything else (status patches, Events, resync listings) is class 1, first come first
# served, and waits while any class-0 request waits or is in flight (up to a patience,
# see Turns): bookkeeping, which a burst can postpone by a few seconds. Without this, 200
# relays created at once shared the threads round-robin and all finished together,
# seconds after most of them could have.
CHILDREN, BOOKKEEPING = 0, 1
_turn: contextvars.ContextVar[tuple[int, float] | None] = contextvars.ContextVar(
    "kube_turn", default=None
)


@contextlib.contextmanager
def children_first(since: float) -> Iterator[None]:
    """Requests made in this block (and in tasks it starts) go before bookkeeping, and
    before those of reconciles that began after `since` (a time.monotonic())."""
    token = _turn.set((CHILDREN, since))
    try:
        yield
    finally:
        _turn.reset(token)


@contextlib.contextmanager
def bookkeeping() -> Iterator[None]:
    """Requests made in this block are class 1 again, inside a children_first block."""
    token = _turn.set(None)
    try:
        yield
    finally:
        _turn.reset(token)


class Turns:
    """At most `slots` requests in flight; waiting ones are let in by (class, ticket).

    Bookkeeping also waits while children work is in flight, not only while it waits for
    a thread: its requests would take the API server's CPU from the children (a burst of
    20 relays, with threads to spare, finished 0.3 s later at P95 for them). It waits
    `patience_s` at most, so that a stream of children work cannot hold a status back
    for good: longer than a burst of 200 relays takes on two cores, since with 5 s the
    first relays' bookkeeping joined the burst's last seconds and slowed its tail.

    Used from the event loop only. A ThreadPoolExecutor's own queue is first come first
    served, so the order is decided here, before a request reaches it.
    """

    def __init__(self, slots: int, *, patience_s: float = 15.0) -> None:
        self._free = slots
        self._patience = patience_s
        self._children = 0  # children requests in flight
        self._waiting: list[tuple[tuple[int, float], int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, turn: tuple[int, float]) -> AsyncIterator[None]:
        await self._acquire(turn)
        try:
            yield
        finally:
            self._release(turn)

    def _may_start(self, turn: tuple[int, float]) -> bool:
        # Asked only of the first in line: when that is bookkeeping, no children wait.
        if turn[0] == CHILDREN:
            return True
        return self._children == 0 or time.monotonic() - turn[1] >= self._patience

    async def _acquire(self, turn: tuple[int, float]) -> None:
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiting, (turn, next(self._arrivals), granted))
        self._let_in()
        if not granted.done() and turn[0] != CHILDREN:
            # Its patience may run out while nothing is released.
            loop.call_later(max(0.0, turn[1] + self._patience - time.monotonic()), self._let_in)
        try:
            await granted  # at once when let in above
        except asyncio.CancelledError:
            # Granted just before the cancellation landed: the slot is ours to give back.
            if granted.done() and not granted.cancelled():
                self._release(turn)
            raise

    def _release(self, turn: tuple[int, float]) -> None:
        self._free += 1
        if turn[0] == CHILDREN:
            self._children -= 1
        self._let_in()

    def _let_in(self) -> None:
        """Grant free slots to waiters in order; bookkeeping only while it may start."""
        while self._free > 0 and self._waiting:
            turn, _, granted = self._waiting[0]
            if granted.done():  # cancelled while waiting
                heapq.heappop(self._waiting)
                continue
            if not self._may_start(turn):
                return  # the oldest bookkeeping may not: no later one may either
            heapq.heappop(self._waiting)
            self._free -= 1
            if turn[0] == CHILDREN:
                self._children += 1
            granted.set_result(None)


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = _KINDS[api_version, kind]
    result = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{result}/{name}" if name else result


class ApiError(Exception):
    """A non-2xx answer, with the API server's own message (never the request body)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Kube:
    """Blocking requests behind async methods; one instance per operator process."""

    def __init__(
        self, api: kubernetes.client.ApiClient, *, timeout_s: float = 30, concurrency: int = 16
    ) -> None:
        self._api = api
        self._timeout = (min(10.0, timeout_s), timeout_s)
        # A pool of our own: asyncio's default one has min(32, cores + 4) threads, six on
        # two cores, and 200 relays reconciled at once queued behind six requests.
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kube")
        self._turns = Turns(concurrency)

    @classmethod
    def from_environment(cls, *, timeout_s: float = 30, concurrency: int = 16) -> Kube:
        """In a pod: its ServiceAccount. Elsewhere: $KUBECONFIG or ~/.kube/config."""
        configuration = kubernetes.client.Configuration()
        # One connection per thread; urllib3 would otherwise open and drop extra ones.
        configuration.connection_pool_maxsize = concurrency
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        return cls(
            kubernetes.client.ApiClient(configuration), timeout_s=timeout_s, concurrency=concurrency
        )

    async def _in_thread(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        # A request cancelled while in its thread gives its slot back at once, though the
        # thread finishes the call: the pool may then briefly hold one more than `slots`,
        # which waits in the pool's own queue.
        async with self._turns.slot(_turn.get() or (BOOKKEEPING, time.monotonic())):
            return await loop.run_in_executor(
                self._threads, functools.partial(call, *args, **kwargs)
            )

    def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One request; None for 404 on a GET, ApiError for any other failure."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, full_url, headers, body, _ = self._api.param_serialize(
            method=method,
            resource_path=url,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(
            method, full_url, header_params=headers, body=body, _request_timeout=self._timeout
        )
        response.read()  # type: ignore[no-untyped-call]
        text = (response.data or b"").decode("utf-8", "replace")
        if 200 <= response.status < 300:
            return json.loads(text) if text else {}
        if response.status == 404 and method == "GET":
            return None
        raise _error(response.status, text)

    async def get(self, url: str) -> dict[str, Any] | None:
        return await self._in_thread(self.request, "GET", url)

    async def list(self, url: str, **query: str) -> list[dict[str, Any]]:
        found = await self._in_thread(self.request, "GET", url, query=query)
        return list((found or {}).get("items", []))

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager, taking over conflicts.

        Apply is idempotent: the same manifest twice changes nothing (no new revision, no
        event), so a reconcile interrupted anywhere can simply be run again.
        """
        meta = manifest["metadata"]
        url = path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])

        async def once() -> dict[str, Any]:
            result = await self._in_thread(
                self.request,
                "PATCH",
                url,
                body=manifest,
                query={"fieldManager": FIELD_MANAGER, "force": "true"},
                content_type="application/apply-patch+yaml",
            )
            assert result is not None
            return result

        try:
            return await once()
        except ApiError as exc:
            if exc.status != 422 or manifest["kind"] != "Service":
                raise
        # Someone changed a port's number. Service ports are keyed by port and protocol,
        # so the apply adds ours beside theirs under the same name, and is refused
        # (Duplicate value). Ours replace the list whole first (a merge patch replaces
        # lists), then the apply takes the fields back as before.
        await self.merge_patch(url, {"spec": {"ports": manifest["spec"]["ports"]}})
        return await once()

    async def delete(self, url: str) -> bool:
        """Delete in the background (dependents go with it); False when already gone."""
        try:
            await self._in_thread(
                self.request,
                "DELETE",
                url,
                body={"propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def post_event(self, event: dict[str, Any]) -> None:
        url = f"/api/v1/namespaces/{event['metadata']['namespace']}/events"
        await self._in_thread(self.request, "POST", url, body=event)

    async def merge_patch(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch as the operator's field manager: lists in it replace the
        stored lists whole, where an apply would merge them by their keys."""
        result = await self._in_thread(
            self.request,
            "PATCH",
            url,
            body=body,
            query={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )
        assert result is not None
        return result

    async def patch_status(self, url: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; the object as stored afterwards."""
        result = await self._in_thread(
            self.request,
            "PATCH",
            f"{url}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )
        assert result is not None
        return result


def _error(status: int, text: str) -> ApiError:
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {}
    return ApiError(
        status=status,
        reason=str(payload.get("reason", "")),
        message=str(payload.get("message", text[:300])),
    )


def event(
    obj: dict[str, Any], *, warning: bool, reason: str, message: str, now: str
) -> dict[str, Any]:
    """A core/v1 Event about `obj`, as `kubectl describe` lists them."""
    meta = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": "Warning" if warning else "Normal",
        "reason": reason,
        "message": message[:1024],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
