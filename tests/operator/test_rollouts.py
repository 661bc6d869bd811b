"""Blue-green and canary rollouts on the real control plane, judged by scripted metrics.

What is real: the API server, the Deployment controller (kwok plays the kubelet, so pods
become ready without running), the operator process under the chart's ServiceAccount, a
relay process on 127.0.0.1 that the smoke test talks SMTP and HTTP to (the operator is
told to reach "the preview Service" there, as kwok pods have no network), and an HTTP
server speaking Prometheus's query API with results each test scripts. Durations are
seconds instead of minutes; the logic is the production one.

At each step the tests check what an on-call engineer would: where the Service points,
how many pods each colour runs, status.rollout and the conditions, and the Events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.local_http import LocalApi, Reply, Request
from tests.operator.cluster import Cluster, OperatorProcess, eventually
from tests.operator.local_prometheus import ScriptedPrometheus
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.cluster

COLOUR = "relay.smtp-relay.dev/colour"


# ---------------------------------------------------------------------------------------
# Local peers: the relay the smoke test reaches, a release gate, Prometheus
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A real `smtp-relay serve` standing in for the preview Service's pods."""
    directory = tmp_path_factory.mktemp("smoke-relay")
    smtp_port, http_port = free_port(), free_port()
    config = {
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "hostname": "preview.test"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "queue": {"backend": "sqlite", "sqlite": {"path": str(directory / "relay.db")}},
        "providers": {"outbox": {"type": "outbox", "directory": str(directory / "outbox")}},
    }
    (directory / "relay.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    with (directory / "relay.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "--config", str(directory / "relay.yaml"), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_port(smtp_port)
        wait_for_port(http_port)
        yield smtp_port, http_port
    finally:
        process.terminate()
        process.wait(timeout=30)


class ReleaseGate:
    """The confirm-promotion webhook: answers what the test says, records every call."""

    def __init__(self) -> None:
        self.status = 409
        self.calls: list[dict[str, Any]] = []
        self.api = LocalApi()
        self.api.route("POST", "/confirm", self._answer)
        self.url = self.api.url + "/confirm"
        self.api.start()

    def _answer(self, request: Request) -> Reply:
        self.calls.append(json.loads(request.body))
        return Reply(self.status)

    def close(self) -> None:
        self.api.stop()
        assert not self.api.errors, self.api.errors


@pytest.fixture
def prometheus() -> Iterator[ScriptedPrometheus]:
    with ScriptedPrometheus() as server:
        yield server


@pytest.fixture
def gate() -> Iterator[ReleaseGate]:
    server = ReleaseGate()
    yield server
    server.close()


# ---------------------------------------------------------------------------------------
# Looking at the cluster
# ---------------------------------------------------------------------------------------


class Relay:
    """One SmtpRelay under test, and what kubectl says about it."""

    def __init__(self, cluster: Cluster, namespace: str, name: str = "relay") -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name

    def get(self, what: str) -> Any:
        return self.cluster.get("-n", self.namespace, what)

    @property
    def rollout(self) -> dict[str, Any]:
        found = self.get(f"smtprelay/{self.name}") or {}
        return dict((found.get("status") or {}).get("rollout") or {})

    def condition(self, kind: str) -> tuple[str, str, str] | None:
        found = self.get(f"smtprelay/{self.name}") or {}
        for c in (found.get("status") or {}).get("conditions", []):
            if c["type"] == kind:
                return c["status"], c["reason"], c["message"]
        return None

    def selector(self, service: str | None = None) -> dict[str, str] | None:
        found = self.get(f"service/{service or self.name}")
        return None if found is None else dict(found["spec"]["selector"])

    def replicas(self) -> tuple[int | None, int | None]:
        counts = []
        for colour in ("blue", "green"):
            found = self.get(f"deployment/{self.name}-{colour}")
            counts.append(None if found is None else int(found["spec"]["replicas"]))
        return counts[0], counts[1]

    def reasons(self) -> list[str]:
        found = self.cluster.get(
            "events",
            "-n",
            self.namespace,
            "--field-selector",
            f"involvedObject.name={self.name},involvedObject.kind=SmtpRelay",
        )
        items = sorted(found["items"], key=lambda e: (e["firstTimestamp"], e["metadata"]["name"]))
        return [e["reason"] for e in items]

    def messages(self, reason: str) -> list[str]:
        found = self.cluster.get(
            "events", "-n", self.namespace, "--field-selector", f"reason={reason}"
        )
        return [e["message"] for e in found["items"]]

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        return dict(
            eventually(
                lambda: self.rollout if self.rollout.get("phase") == phase else None,
                timeout=timeout,
                what=f"phase {phase} (rollout {self.rollout}, events {self.reasons()})",
            )
        )

    def wait_for(self, check: Any, what: str, timeout: float = 60) -> Any:
        return eventually(check, timeout=timeout, what=f"{what} (rollout {self.rollout})")

    def patch_spec(self, spec: dict[str, Any]) -> None:
        self.cluster.kubectl(
            "patch",
            "-n",
            self.namespace,
            f"smtprelay/{self.name}",
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
        )

    def annotate(self, key: str, value: str) -> None:
        self.cluster.kubectl(
            "annotate",
            "-n",
            self.namespace,
            f"smtprelay/{self.name}",
            f"rollout.relay.smtp-relay.dev/{key}={value}",
            "--overwrite",
        )


class SelectorLog:
    """Every selector the Service had, polled in the background: a double switch shows."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.seen: list[str | None] = []
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            selector = self.relay.selector() or {}
            colour = selector.get(COLOUR)
            if not self.seen or self.seen[-1] != colour:
                self.seen.append(colour)
            time.sleep(0.2)

    def stop(self) -> list[str | None]:
        self.running = False
        self.thread.join(timeout=5)
        return self.seen


class ReplicaWatch:
    """Every (blue, green) replica count the Deployments go through, from a watch.

    Polling can miss a canary step the operator passes through within a poll or two;
    `kubectl get -w` reports every change of each Deployment in order.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.seen: set[tuple[int | None, int | None]] = set()
        self._current: dict[str, int] = {}
        self._watch = subprocess.Popen(
            [
                "kubectl",
                "get",
                "deployments",
                "-n",
                relay.namespace,
                "--watch",
                "-o",
                'jsonpath={.metadata.name} {.spec.replicas}{"\\n"}',
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=relay.cluster.env(),
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self._watch.stdout is not None
        for line in self._watch.stdout:
            name, _, replicas = line.strip().partition(" ")
            if not replicas:
                continue
            self._current[name] = int(replicas)
            self.seen.add(
                (
                    self._current.get(f"{self.relay.name}-blue"),
                    self._current.get(f"{self.relay.name}-green"),
                )
            )

    def stop(self) -> set[tuple[int | None, int | None]]:
        self._watch.terminate()
        self._watch.wait(timeout=10)
        self.thread.join(timeout=5)
        return self.seen


def setup(
    cluster: Cluster,
    namespace: str,
    ports: tuple[int, int],
    strategy: dict[str, Any],
    *,
    replicas: int = 2,
    image: str = "smtp-relay:1",
) -> Relay:
    smtp_port, http_port = ports
    cluster.apply(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "relay-db"},
            "stringData": {"password": "not-used-by-kwok-pods"},
        },
        {
            "apiVersion": "relay.smtp-relay.dev/v1alpha1",
            "kind": "RelayProvider",
            "metadata": {"name": "outbox"},
            "spec": {"type": "outbox"},
        },
        {
            "apiVersion": "relay.smtp-relay.dev/v1alpha1",
            "kind": "SmtpRelay",
            "metadata": {"name": "relay"},
            "spec": {
                "image": image,
                "replicas": replicas,
                "providers": ["outbox"],
                "queue": {
                    "backend": "mysql",
                    "mysql": {"host": "mariadb.db.svc", "passwordSecretRef": {"name": "relay-db"}},
                },
                "service": {"smtpPort": smtp_port, "httpPort": http_port},
                "strategy": strategy,
            },
        },
    )
    relay = Relay(cluster, namespace)
    relay.wait_for(
        lambda: (relay.condition("Promoted") or ("",))[0] == "True",
        "the first revision to be promoted",
    )
    assert relay.replicas() == (replicas, None)
    selector = relay.selector() or {}
    if strategy["type"] == "Canary":
        # Stable and canary pods share the Service: weight is the replica ratio.
        assert COLOUR not in selector and selector, selector
    else:
        assert selector[COLOUR] == "blue"
    return relay


def blue_green(prometheus: ScriptedPrometheus, **extra: Any) -> dict[str, Any]:
    strategy = {
        "type": "BlueGreen",
        "blueGreen": {"observeWindow": "6s", "scaleDownDelay": "4s"},
        "analysis": {"prometheus": {"address": prometheus.address}, "interval": "2s"},
        "progressDeadline": "60s",
    }
    strategy.update(extra)
    return strategy


def canary(prometheus: ScriptedPrometheus, **extra: Any) -> dict[str, Any]:
    strategy = {
        "type": "Canary",
        "canary": {"stepWeight": 25, "maxWeight": 50, "interval": "2s", "threshold": 2},
        "analysis": {"prometheus": {"address": prometheus.address}},
        "progressDeadline": "60s",
    }
    strategy.update(extra)
    return strategy


# ---------------------------------------------------------------------------------------
# Blue-green
# ---------------------------------------------------------------------------------------


def test_blue_green_promotes_after_smoke_test_and_observe_window(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    relay = setup(operator.cluster, namespace, smoke_relay, blue_green(prometheus), replicas=2)
    first = relay.rollout["stableRevision"]
    log = SelectorLog(relay)

    relay.patch_spec({"image": "smtp-relay:2"})
    observing = relay.wait_phase("Observing")
    assert observing["candidateColour"] == "green" and observing["candidateImage"] == "smtp-relay:2"
    assert relay.selector()[COLOUR] == "green"  # type: ignore[index]
    assert relay.selector(f"{relay.name}-preview")[COLOUR] == "green"  # type: ignore[index]
    assert relay.replicas() == (2, 2)  # blue stays up for a fast switch back
    assert relay.condition("Progressing")[:2] == ("True", "Observing")  # type: ignore[index]
    # `kubectl get` shows the rollout at a glance (printer columns).
    table = operator.cluster.kubectl("get", "-n", namespace, "smtprelay", relay.name).stdout
    header, row = table.splitlines()[:2]
    shown = dict(zip(header.split(), row.split(), strict=False))
    assert (shown["ROLLOUT"], shown["ACTIVE"]) == ("Observing", "green"), table

    stable = relay.wait_phase("Stable", timeout=30)
    assert stable["stableColour"] == "green" and stable["stableRevision"] != first
    assert stable["analyses"] >= 2
    assert relay.condition("Promoted")[:2] == ("True", "Promoted")  # type: ignore[index]
    relay.wait_for(lambda: relay.replicas() == (0, 2), "blue scaled down after the delay", 20)
    assert log.stop() == ["blue", "green"]

    reasons = relay.reasons()
    for reason in ("RolloutStarted", "SmokeTestPassed", "Switched", "AnalysisPassed", "Promoted"):
        assert reason in reasons
    assert reasons.count("Switched") == 1
    # Analysis asked about the green pods of this namespace only.
    queries = [q for q in prometheus.queries if "relay-green-" in q]
    assert queries and all(f'namespace="{namespace}"' in q for q in queries)
    assert [h["outcome"] for h in stable["history"]] == ["Promoted", "Promoted"]


def test_blue_green_switches_back_when_analysis_fails_in_the_window(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    strategy = blue_green(prometheus, blueGreen={"observeWindow": "60s"})
    relay = setup(operator.cluster, namespace, smoke_relay, strategy)
    prometheus.set(default="good")

    relay.patch_spec({"image": "smtp-relay:2"})
    relay.wait_phase("Observing")
    prometheus.set(default="good", error_rate="bad")
    rolled = relay.wait_phase("RolledBack", timeout=30)

    assert relay.selector()[COLOUR] == "blue"  # type: ignore[index]
    relay.wait_for(lambda: relay.replicas() == (2, 0), "green scaled away")
    assert rolled["rejectedRevision"] and rolled["stableColour"] == "blue"
    degraded = relay.condition("Degraded")
    assert degraded is not None and degraded[:2] == ("True", "RolledBack")
    assert "error-rate" in degraded[2]
    assert relay.condition("Promoted")[0] == "False"  # type: ignore[index]
    assert "AnalysisFailed" in relay.reasons()
    failed = [c for c in rolled["lastChecks"] if c["outcome"] == "Fail"]
    assert [c["name"] for c in failed] == ["error-rate"]


def test_smoke_test_failure_keeps_traffic_on_blue(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    relay = setup(operator.cluster, namespace, smoke_relay, blue_green(prometheus))
    log = SelectorLog(relay)
    # The new revision's Service port leads nowhere: the smoke test cannot connect.
    relay.patch_spec({"image": "smtp-relay:2", "service": {"smtpPort": free_port()}})
    rolled = relay.wait_phase("RolledBack")
    assert log.stop() == ["blue"]
    assert relay.replicas()[1] == 0 or relay.wait_for(
        lambda: relay.replicas()[1] == 0, "green scaled away"
    )
    degraded = relay.condition("Degraded")
    assert degraded is not None and degraded[1] == "RolledBack"
    assert "smoke test failed" in rolled["message"]
    assert "SmokeTestFailed" in relay.reasons() and "Switched" not in relay.reasons()


def test_confirmation_webhook_holds_the_switch(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
    gate: ReleaseGate,
) -> None:
    strategy = blue_green(prometheus, confirmPromotionWebhook={"url": gate.url})
    relay = setup(operator.cluster, namespace, smoke_relay, strategy)
    relay.patch_spec({"image": "smtp-relay:2"})
    waiting = relay.wait_phase("AwaitingConfirmation")
    assert "409" in waiting["message"] or relay.wait_for(
        lambda: "409" in relay.rollout["message"], "the refusal in the status"
    )
    assert relay.selector()[COLOUR] == "blue"  # type: ignore[index]
    assert gate.calls[0]["candidateImage"] == "smtp-relay:2"
    assert gate.calls[0]["name"] == "relay" and gate.calls[0]["namespace"] == namespace

    gate.status = 200
    relay.wait_phase("Observing", timeout=40)
    assert relay.selector()[COLOUR] == "green"  # type: ignore[index]


def test_inconclusive_analysis_pauses_until_resumed(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
    request: pytest.FixtureRequest,
) -> None:
    # A resync far beyond the test: only watch events and the rollout's own timers move it,
    # so the resume annotation below must wake the operator by itself.
    operator.stop()
    operator.start(resync_interval_s="3600")
    request.addfinalizer(operator.stop)  # the next test gets the usual operator
    strategy = blue_green(prometheus, blueGreen={"observeWindow": "6s"})
    strategy["analysis"]["inconclusiveLimit"] = 2
    relay = setup(operator.cluster, namespace, smoke_relay, strategy)
    prometheus.set(default="empty")
    relay.patch_spec({"image": "smtp-relay:2"})

    paused = relay.wait_for(
        lambda: relay.rollout if relay.rollout.get("paused") else None, "the pause"
    )
    assert paused["pauseReason"] == "InconclusiveAnalysis" and paused["phase"] == "Observing"
    # status.rollout is written ahead of acting; the conditions follow in the same pass.
    degraded = relay.wait_for(
        lambda: (c := relay.condition("Degraded")) and c[0] == "True" and c, "Degraded"
    )
    assert degraded[1] == "InconclusiveAnalysis" and "no data" in degraded[2], degraded
    assert relay.condition("Progressing")[:2] == ("False", "Paused")  # type: ignore[index]
    # Held: the observe window runs out, nothing moves.
    time.sleep(8)
    assert relay.rollout["phase"] == "Observing" and relay.rollout["paused"]

    prometheus.set(default="good")
    relay.annotate("resume", "after-checking-prometheus")
    stable = relay.wait_phase("Stable", timeout=40)
    assert stable["stableColour"] == "green"
    assert "Resumed" in relay.reasons()


def test_manual_abort_and_manual_rollback(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    strategy = blue_green(prometheus, blueGreen={"observeWindow": "120s", "scaleDownDelay": "120s"})
    relay = setup(operator.cluster, namespace, smoke_relay, strategy)

    # Abort a rollout in its observe window: traffic returns to blue at once.
    relay.patch_spec({"image": "smtp-relay:2"})
    observing = relay.wait_phase("Observing")
    relay.annotate("abort", observing["candidateRevision"])
    aborted = relay.wait_phase("Aborted")
    assert aborted["rejectedRevision"] == observing["candidateRevision"]
    assert relay.selector()[COLOUR] == "blue"  # type: ignore[index]

    # Promote the next by hand, then roll it back: blue is still up, so it is a switch.
    relay.patch_spec({"image": "smtp-relay:3"})
    observing = relay.wait_for(
        lambda: (
            relay.rollout
            if relay.rollout.get("phase") == "Observing"
            and relay.rollout.get("candidateImage") == "smtp-relay:3"
            else None
        ),
        "the second rollout",
    )
    relay.patch_spec({"strategy": {"promoteRevision": observing["candidateRevision"]}})
    promoted = relay.wait_phase("Stable")
    assert promoted["stableImage"] == "smtp-relay:3" and promoted["stableColour"] == "green"
    assert relay.replicas() == (2, 2)

    relay.annotate("rollback", promoted["stableRevision"])
    back = relay.wait_for(
        lambda: relay.rollout if relay.rollout.get("stableImage") == "smtp-relay:1" else None,
        "the rollback",
    )
    assert back["stableColour"] == "blue" and back["rejectedRevision"] == promoted["stableRevision"]
    assert relay.selector()[COLOUR] == "blue"  # type: ignore[index]
    assert relay.condition("Degraded")[:2] == ("True", "RolledBack")  # type: ignore[index]
    # The spec still names image 3: it stays rolled back, not rolled out again.
    time.sleep(5)
    assert relay.rollout["stableImage"] == "smtp-relay:1"
    outcomes = [(h["revision"], h["outcome"]) for h in relay.rollout["history"]]
    assert (promoted["stableRevision"], "RolledBack") in outcomes
    assert (observing["candidateRevision"], "Promoted") in outcomes


# ---------------------------------------------------------------------------------------
# Canary
# ---------------------------------------------------------------------------------------


def test_canary_promotes_through_every_step(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    relay = setup(operator.cluster, namespace, smoke_relay, canary(prometheus), replicas=4)
    watch = ReplicaWatch(relay)
    relay.patch_spec({"image": "smtp-relay:2"})

    # Stable with the new image: right after the patch the status may still show the first
    # revision's Stable, before the operator has started the canary.
    stable = relay.wait_for(
        lambda: (
            relay.rollout
            if relay.rollout.get("phase") == "Stable"
            and relay.rollout.get("stableImage") == "smtp-relay:2"
            else None
        ),
        "the canary's promotion",
        90,
    )
    assert stable["stableColour"] == "green"
    relay.wait_for(lambda: relay.replicas() == (0, 4), "blue scaled to zero")
    seen = watch.stop()
    # 25% and 50% of four pods, never fewer than four serving in all.
    assert (3, 1) in seen and (2, 2) in seen
    assert COLOUR not in (relay.selector() or {})  # both colours serve
    weights = relay.messages("CanaryWeight")
    assert any("25%" in m for m in weights) and any("50%" in m for m in weights)
    assert "Promoted" in relay.reasons()


def test_canary_rolls_back_on_a_failed_metric(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    relay = setup(operator.cluster, namespace, smoke_relay, canary(prometheus), replicas=4)
    prometheus.set(default="good", latency_p95="bad")
    relay.patch_spec({"image": "smtp-relay:2"})
    rolled = relay.wait_phase("RolledBack", timeout=60)
    relay.wait_for(lambda: relay.replicas() == (4, 0), "the canary scaled away")
    assert rolled["failedChecks"] == 2
    assert relay.reasons().count("AnalysisFailed") == 2
    assert relay.condition("Degraded")[:2] == ("True", "RolledBack")  # type: ignore[index]


# ---------------------------------------------------------------------------------------
# The operator dies mid-rollout
# ---------------------------------------------------------------------------------------


def test_operator_killed_while_observing_resumes_without_a_second_switch(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    strategy = blue_green(prometheus, blueGreen={"observeWindow": "10s", "scaleDownDelay": "2s"})
    relay = setup(operator.cluster, namespace, smoke_relay, strategy)
    log = SelectorLog(relay)
    relay.patch_spec({"image": "smtp-relay:2"})
    relay.wait_phase("Observing")
    operator.kill()
    time.sleep(3)
    operator.start()
    stable = relay.wait_phase("Stable", timeout=60)
    assert stable["stableColour"] == "green"
    assert log.stop() == ["blue", "green"]
    assert relay.reasons().count("Switched") == 1
    assert relay.reasons().count("RolloutStarted") == 2  # the first revision, then this one


def test_operator_killed_mid_canary_resumes_at_its_step(
    operator: OperatorProcess,
    namespace: str,
    smoke_relay: tuple[int, int],
    prometheus: ScriptedPrometheus,
) -> None:
    strategy = canary(prometheus, canary={"stepWeight": 25, "maxWeight": 75, "interval": "3s"})
    relay = setup(operator.cluster, namespace, smoke_relay, strategy, replicas=4)
    relay.patch_spec({"image": "smtp-relay:2"})
    relay.wait_for(
        lambda: relay.rollout.get("setWeight") == 50 or None, "the canary at its second step"
    )
    operator.kill()
    before = relay.rollout
    time.sleep(3)
    operator.start()
    stable = relay.wait_phase("Stable", timeout=90)
    assert stable["stableColour"] == "green" and before["setWeight"] == 50
    weights = relay.messages("CanaryWeight")
    # Each step announced once: the restart carried on from 50%, it did not start over.
    assert sum("25%" in m for m in weights) == 1
    assert sum("50%" in m for m in weights) == 1
    assert sum("75%" in m for m in weights) == 1
