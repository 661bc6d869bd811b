"""The operator benchmark's floor: what any operator could reach on this control plane.

`python -m bench.floor_operator` stands in for the operator in one extra round. It watches
SmtpRelays and, for each one created, applies the same four children the operator would
(built by `relay_operator.builders`, sent by `relay_operator.kube.Kube` with the same
thread pool and the same children-first order), and does nothing else: no GET of the
Deployment as it was, no status, no Events, no kopf (no per-object workers, no progress
annotations, no Deployment watch). Its burst P95 is the time the control plane itself
needs to take 200 relays' children on this machine: the part of the operator's figure no
change to the operator can remove.

Not an operator: no reconcile of anything but creation, no retries, no Secrets, one
image. It serves the liveness endpoint and the request counts the harness expects of
`counted_operator`, and only the bench starts it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import kubernetes
from relay_operator import builders
from relay_operator.builders import Provider, Relay
from relay_operator.kube import Kube, children_first, path
from relay_operator.models import API_VERSION, GROUP, VERSION, RelayProviderSpec, SmtpRelaySpec

IMAGE = "smtp-relay:bench"


async def _liveness(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(4096)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


def _watch(loop: asyncio.AbstractEventLoop, created: asyncio.Queue[dict[str, Any]]) -> None:
    """Every SmtpRelay ADDED, in the order the API server streams them (a thread)."""
    api = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    custom = kubernetes.client.CustomObjectsApi(api)
    watched = (custom.list_cluster_custom_object, GROUP, VERSION, "smtprelays")
    seen: set[str] = set()
    while True:
        # A fresh control plane refuses the first watches of a new CRD (429) for a moment.
        try:
            stream = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
            for event in stream.stream(*watched):  # type: ignore[no-untyped-call]
                uid = event["object"]["metadata"]["uid"]
                if event["type"] == "ADDED" and uid not in seen:
                    seen.add(uid)
                    loop.call_soon_threadsafe(created.put_nowait, event["object"])
        except Exception as exc:  # a bench stand-in: say it, try again
            print(f"floor applier: watch: {exc!r}", file=sys.stderr, flush=True)
            time.sleep(1)


class Applier:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.providers: dict[tuple[str, str], Provider] = {}

    async def provider(self, namespace: str, name: str) -> Provider:
        # Read once per round: every relay of the bench names the same one.
        key = (namespace, name)
        if key not in self.providers:
            found = await self.kube.get(path(API_VERSION, "RelayProvider", namespace, name))
            assert found is not None, f"RelayProvider {namespace}/{name} is missing"
            self.providers[key] = Provider(name, RelayProviderSpec.model_validate(found["spec"]))
        return self.providers[key]

    async def children(self, obj: dict[str, Any]) -> None:
        """The operator's order: ConfigMap, Service and PDB together, then the Deployment."""
        with children_first(since=time.monotonic()):
            meta = obj["metadata"]
            spec = SmtpRelaySpec.model_validate(obj["spec"])
            relay = Relay(meta["name"], meta["namespace"], meta["uid"], spec)
            found = [await self.provider(relay.namespace, name) for name in spec.providers]
            config_map = builders.config_map(relay, found)
            config_hash = builders.digest(config_map["data"]["relay.yaml"])
            await asyncio.gather(
                self.kube.apply(config_map),
                self.kube.apply(builders.service(relay)),
                self.kube.apply(builders.disruption_budget(relay)),
            )
            await self.kube.apply(
                builders.deployment(
                    relay, found, image=IMAGE, config_hash=config_hash, secret_versions={}
                )
            )


async def serve() -> None:
    endpoint = os.environ["RELAY_OPERATOR_LIVENESS_ENDPOINT"]  # http://127.0.0.1:<port>/...
    port = int(endpoint.rsplit(":", 1)[1].split("/", 1)[0])
    await asyncio.start_server(_liveness, "127.0.0.1", port)
    applier = Applier(Kube.from_environment())
    created: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_watch, args=(loop, created), daemon=True).start()
    running: set[asyncio.Task[None]] = set()

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The round then reports the relay incomplete; this says why.
            print(f"floor applier: {task.exception()!r}", file=sys.stderr, flush=True)

    while True:
        task = asyncio.create_task(applier.children(await created.get()))
        running.add(task)
        task.add_done_callback(finished)


def main() -> None:
    from bench.operator import count_requests

    count_requests()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
