"""Blue-green and canary rollouts against the cluster: observe, plan, write, act.

One pass per reconcile of an SmtpRelay with spec.strategy:

1. Build the spec's revision: its immutable ConfigMap, its pod template and the
   ControllerRevision that keeps the template for a later rollback.
2. Observe both colour Deployments, a Deployment from before the strategy, and the
   controls (spec.strategy fields and annotations).
3. Plan (rollout.plan); run the smoke test, analysis or confirmation webhook it asks for
   and plan again with the answer.
4. Write status.rollout *first*, then apply what it implies: scale-ups, Services,
   scale-downs, in that order, so capacity never dips and traffic only moves to pods
   that serve. An operator killed anywhere in here repeats idempotent steps only.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relay_operator import analysis, builders, rollout, smoke, webhook
from relay_operator.builders import COLOUR, LABEL_RELAY, REVISION, Provider, Relay
from relay_operator.kube import Kube, path
from relay_operator.models import GROUP, Canary, RolloutStatus, Strategy
from relay_operator.rollout import Colour, ColourState, Controls, Observed, Plan, Target
from relay_operator.settings import OperatorSettings

logger = logging.getLogger("relay_operator.rollout")

# Not under GROUP/: kopf keeps its own state in annotations there (settings.py), and
# leaves every annotation with that prefix out of the diff that wakes a handler, so a
# `kubectl annotate` there would wait for the next resync.
CONTROL_PREFIX = f"rollout.{GROUP}"
ANNOTATIONS = {
    key: f"{CONTROL_PREFIX}/{key}"
    for key in ("paused", "promote", "abort", "rollback", "resume", "retry")
}
# ControllerRevisions (and their ConfigMaps) kept beyond those the status still names.
KEEP_REVISIONS = 10

Announce = Callable[[str, str, bool], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    """What a pass left behind, for the status and conditions."""

    plan: Plan
    revision: str
    deployments: dict[Colour, dict[str, Any] | None]


def controls(obj: Mapping[str, Any], strategy: Strategy) -> Controls:
    """spec.strategy's controls together with the annotations kubectl and GitOps set."""
    notes = (obj.get("metadata") or {}).get("annotations") or {}

    def both(spec_value: str | None, key: str) -> frozenset[str]:
        return frozenset(v for v in (spec_value, notes.get(ANNOTATIONS[key])) if v)

    return Controls(
        paused=strategy.paused or notes.get(ANNOTATIONS["paused"], "").lower() == "true",
        promote=both(strategy.promote_revision, "promote"),
        abort=both(strategy.abort_revision, "abort"),
        rollback=both(strategy.rollback_revision, "rollback"),
        retry=both(strategy.retry_revision, "retry"),
        # A spec value wins: it is what GitOps keeps; the annotation is for kubectl.
        resume=strategy.resume or notes.get(ANNOTATIONS["resume"]) or None,
    )


def colour_state(deployment: Mapping[str, Any] | None) -> ColourState:
    if deployment is None:
        return ColourState()
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    wanted = int(spec.get("replicas", 0))
    generation = int(deployment.get("metadata", {}).get("generation", 0))
    updated = int(status.get("updatedReplicas", 0))
    settled = (
        int(status.get("observedGeneration", 0)) >= generation
        and updated >= wanted
        and int(status.get("replicas", 0)) <= max(wanted, updated)
    )
    labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
    return ColourState(
        exists=True,
        revision=labels.get(REVISION),
        replicas=wanted,
        available=min(int(status.get("availableReplicas", 0)), updated),
        settled=settled,
    )


class StrategyRun:
    """One reconcile pass of one relay's strategy."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        obj: dict[str, Any],
        relay: Relay,
        providers: list[Provider],
        secret_versions: Mapping[str, str],
        announce: Announce,
    ) -> None:
        assert relay.spec.strategy is not None
        self.kube = kube
        self.settings = settings
        self.obj = obj
        self.relay = relay
        self.strategy: Strategy = relay.spec.strategy
        self.providers = providers
        self.secret_versions = secret_versions
        self.announce = announce
        self.namespace = relay.namespace
        # Both colour Deployments as last seen: observed, then as each apply answered.
        self.found: dict[Colour, dict[str, Any] | None] = {}

    # --- 1. the spec's revision -------------------------------------------------------

    async def build(self) -> tuple[Target, dict[str, Any]]:
        relay = self.relay
        config_map = builders.config_map(relay, self.providers, per_revision=True)
        config_hash = builders.digest(config_map["data"]["relay.yaml"])
        image = relay.spec.image or self.settings.relay_image
        template = builders.pod_template(
            relay,
            self.providers,
            image=image,
            config_hash=config_hash,
            secret_versions=self.secret_versions,
            config_map=config_map["metadata"]["name"],
        )
        revision = builders.revision_of(template)
        stored = await self.kube.get(self._revision_url(revision))
        if stored is None:
            await self.kube.apply(config_map)
            await self.kube.apply(
                builders.controller_revision(
                    relay, revision=revision, number=await self._next_number(), template=template
                )
            )
        return Target(revision, image, config_hash), template

    def _revision_url(self, revision: str) -> str:
        name = builders.revision_name(self.relay, revision)
        return path("apps/v1", "ControllerRevision", self.namespace, name)

    async def _revisions(self) -> list[dict[str, Any]]:
        url = path("apps/v1", "ControllerRevision", self.namespace)
        return await self.kube.list(url, labelSelector=f"{LABEL_RELAY}={self.relay.name}")

    async def _next_number(self) -> int:
        return 1 + max((int(r.get("revision", 0)) for r in await self._revisions()), default=0)

    async def template_of(self, revision: str) -> dict[str, Any] | None:
        stored = await self.kube.get(self._revision_url(revision))
        if stored is None:
            return None
        template: dict[str, Any] = stored["data"]["template"]
        return template

    # --- 2. what is there --------------------------------------------------------------

    async def observe(self, target: Target) -> Observed:
        deployments = await self.deployments()
        legacy = await self.kube.get(path("apps/v1", "Deployment", self.namespace, self.relay.name))
        self.found = deployments
        return Observed(
            now=datetime.datetime.now(datetime.UTC),
            target=target,
            replicas=self.relay.spec.replicas,
            colours={c: colour_state(d) for c, d in deployments.items()},
            controls=controls(self.obj, self.strategy),
            legacy=legacy is not None,
        )

    async def deployments(self) -> dict[Colour, dict[str, Any] | None]:
        found: dict[Colour, dict[str, Any] | None] = {}
        for colour in rollout.COLOURS:
            name = builders.colour_name(self.relay, colour)
            found[colour] = await self.kube.get(path("apps/v1", "Deployment", self.namespace, name))
        return found

    # --- 3. plan, asking what it needs -------------------------------------------------

    async def plan(self, state: RolloutStatus | None, seen: Observed) -> Plan:
        answers: dict[str, Any] = {}
        result = rollout.plan(self.strategy, state, seen)
        for _ in range(3):
            if result.need is None:
                break
            assert result.state.candidate_colour is not None
            colour = result.state.candidate_colour
            if result.need == "smoke":
                answers["smoke"] = await self.smoke_test()
            elif result.need == "analysis":
                answers["analysis"] = await self.analyse(colour)
            else:
                answers["confirmation"] = await self.confirm(result.state)
            seen = rollout.Observed(**{**seen.__dict__, **answers})
            result = rollout.plan(self.strategy, state, seen)
        return result

    async def smoke_test(self) -> tuple[bool, str]:
        service = self.relay.spec.service
        name = builders.preview_name(self.relay)
        host = self.settings.service_host_override or f"{name}.{self.namespace}.svc"
        timeout = rollout.duration_s(self.strategy.smoke_test.timeout)
        found = await smoke.smoke_test(
            host, smtp_port=service.smtp_port, http_port=service.http_port, timeout_s=timeout
        )
        return found.ok, found.message

    async def analyse(self, colour: Colour) -> list[rollout.CheckOutcome]:
        spec = self.strategy.analysis
        assert spec is not None
        if self.strategy.type == "Canary":
            window = (self.strategy.canary or Canary()).interval
            error_rate = None
        else:
            window = spec.interval
            blue_green = self.strategy.blue_green
            error_rate = blue_green.error_rate_threshold if blue_green else 5.0
        pods = f"{builders.colour_name(self.relay, colour)}-[a-z0-9]+-[a-z0-9]+"
        checks = analysis.checks(
            spec, namespace=self.namespace, pods=pods, window=window, error_rate_max=error_rate
        )
        return await analysis.run(spec.prometheus, checks)

    async def confirm(self, state: RolloutStatus) -> tuple[bool, str]:
        hook = self.strategy.confirm_promotion_webhook
        assert hook is not None
        payload = {
            "apiVersion": self.obj["apiVersion"],
            "kind": "SmtpRelay",
            "namespace": self.namespace,
            "name": self.relay.name,
            "strategy": self.strategy.type,
            "phase": state.phase,
            "stableRevision": state.stable_revision,
            "stableImage": state.stable_image,
            "candidateRevision": state.candidate_revision,
            "candidateImage": state.candidate_image,
        }
        return await webhook.confirm(hook, payload)

    # --- 4. act --------------------------------------------------------------------------

    async def act(self, result: Plan, target: Target, template: dict[str, Any]) -> None:
        """Scale-ups, Services, scale-downs; then the leftovers of the past."""
        current = {c: colour_state(d) for c, d in self.found.items()}
        ups = {c: w for c, w in result.workloads.items() if w.replicas >= current[c].replicas}
        downs = {c: w for c, w in result.workloads.items() if c not in ups}
        for colour, work in ups.items():
            await self.apply_workload(colour, work, target, template)
        await self.kube.apply(builders.service(self.relay, result.service_colour))
        if result.preview_colour is not None:
            await self.kube.apply(builders.preview_service(self.relay, result.preview_colour))
        for colour, work in downs.items():
            await self.apply_workload(colour, work, target, template)
        await self.kube.apply(builders.disruption_budget(self.relay))
        if result.delete_legacy:
            await self.kube.delete(path("apps/v1", "Deployment", self.namespace, self.relay.name))
            await self.announce(
                "Migrated",
                f"traffic is on Deployment {builders.colour_name(self.relay, 'blue')}; "
                f"Deployment {self.relay.name} from before spec.strategy was deleted",
                False,
            )

    async def apply_workload(
        self, colour: Colour, work: rollout.Workload, target: Target, template: dict[str, Any]
    ) -> None:
        live = self.found.get(colour)
        if work.revision is None:
            if live is None:
                return
            revision = str(live["spec"]["template"]["metadata"]["labels"].get(REVISION, ""))
            pods = _strip(live["spec"]["template"])
        elif work.revision == target.revision:
            revision, pods = target.revision, template
        else:
            stored = await self.template_of(work.revision)
            if stored is None:
                await self.announce(
                    "RevisionMissing",
                    f"ControllerRevision {builders.revision_name(self.relay, work.revision)} "
                    f"is gone: {colour} cannot be set to revision {work.revision}",
                    True,
                )
                return
            revision, pods = work.revision, stored
        # What the API server answered is what the status reports on: no second read.
        self.found[colour] = await self.kube.apply(
            builders.colour_deployment(
                self.relay, colour=colour, revision=revision, template=pods, replicas=work.replicas
            )
        )

    async def prune(self, state: RolloutStatus) -> None:
        """Drop ControllerRevisions (and ConfigMaps) nothing refers to any more."""
        named = {state.stable_revision, state.candidate_revision}
        named |= {r.revision for r in state.history}
        stored = sorted(await self._revisions(), key=lambda r: int(r.get("revision", 0)))
        spare = [r for r in stored if r["metadata"]["labels"].get(REVISION) not in named]
        for item in spare[: max(0, len(stored) - KEEP_REVISIONS)]:
            await self.kube.delete(
                path("apps/v1", "ControllerRevision", self.namespace, item["metadata"]["name"])
            )
            for volume in item["data"]["template"]["spec"].get("volumes", []):
                if volume["name"] == "config":
                    name = volume["configMap"]["name"]
                    await self.kube.delete(path("v1", "ConfigMap", self.namespace, name))


def _strip(template: Mapping[str, Any]) -> dict[str, Any]:
    """A live pod template without the colour labels the builder adds again."""
    pods: dict[str, Any] = json.loads(json.dumps(template))
    labels = pods.get("metadata", {}).get("labels", {})
    labels.pop(COLOUR, None)
    labels.pop(REVISION, None)
    return pods


async def run(
    work: StrategyRun, write_state: Callable[[RolloutStatus], Awaitable[None]]
) -> Outcome:
    """One full pass of `work`; see the module docstring."""
    target, template = await work.build()
    state = rollout.parse_state((work.obj.get("status") or {}).get("rollout"))
    seen = await work.observe(target)
    result = await work.plan(state, seen)

    # Write-ahead: the status is the rollout's log; acting comes second.
    if state is None or result.state != state:
        await write_state(result.state)
    for event in result.events:
        await work.announce(event.reason, event.message, event.warning)
    await work.act(result, target, template)
    if any(e.reason == "RolloutStarted" for e in result.events):
        await work.prune(result.state)
    return Outcome(result, target.revision, work.found)
