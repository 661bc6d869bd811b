"""kopf handlers: SmtpRelay and RelayProvider in, ConfigMap/Deployment/Service/PDB out.

Reconciliation is level-based. Every trigger (create, update, resume after a restart, a
change to a relay's Deployment, the periodic resync) runs the same idempotent function
that reads the current state and server-side-applies the desired children, so an
interrupted reconcile is finished by the next one and nothing is ever created twice.

No finalizers: the children carry owner references and the garbage collector removes
them, so deleting an SmtpRelay never depends on the operator being up. (kopf timers and
daemons would add a finalizer to every object; the resync loop here replaces them.)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import kopf
import pydantic

from relay_operator import builders, conditions, drift, providers, rollout, strategies
from relay_operator.builders import Provider, Relay
from relay_operator.cache import ObjectCache
from relay_operator.conditions import Problem
from relay_operator.kube import (
    FIELD_MANAGER,
    ApiError,
    Kube,
    bookkeeping,
    children_first,
    event,
    path,
)
from relay_operator.models import API_VERSION, GROUP, VERSION, RelayProviderSpec, SmtpRelaySpec
from relay_operator.settings import OperatorSettings

logger = logging.getLogger("relay_operator")

SMTP_RELAYS = (GROUP, VERSION, "smtprelays")
RELAY_PROVIDERS = (GROUP, VERSION, "relayproviders")
MANAGED = {"app.kubernetes.io/managed-by": FIELD_MANAGER}
BACKOFF_S = 5


@dataclass
class Context:
    """What every handler shares; kept in kopf's memo."""

    kube: Kube
    settings: OperatorSettings
    identity: str
    priority: int
    locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    cache: ObjectCache = field(default_factory=ObjectCache)
    # Deployment URL -> the metadata.generation our last apply left it at. A watch event
    # at that generation is the Deployment controller reporting on pods; any other
    # generation is someone else's change to the spec, which the next apply undoes.
    applied: dict[str, int] = field(default_factory=dict)
    # What the last apply of each child was and left: the resync applies only what moved.
    children: drift.Applied = field(default_factory=drift.Applied)
    resync: asyncio.Task[None] | None = None
    timers: dict[tuple[str, str], asyncio.TimerHandle] = field(default_factory=dict)
    woken: set[asyncio.Task[None]] = field(default_factory=set)

    @asynccontextmanager
    async def lock(self, kind: str, namespace: str, name: str) -> AsyncIterator[None]:
        # One reconcile per object at a time: triggers overlap (an update arriving while
        # a Deployment event is being handled), and their events must not interleave.
        key = (kind, namespace, name)
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield


def _wake_later(ctx: Context, namespace: str, name: str, at: datetime.datetime | None) -> None:
    """Reconcile the relay again at `at`: a rollout's next step is due then.

    The resync would get there too, but up to a resync interval late; an observe window
    of 5 minutes should not become 6.
    """
    key = (namespace, name)
    old = ctx.timers.pop(key, None)
    if old is not None:
        old.cancel()
    if at is None:
        return
    delay = max(0.2, (at - datetime.datetime.now(datetime.UTC)).total_seconds() + 0.2)
    if delay > ctx.settings.resync_interval_s:
        return

    def fire() -> None:
        ctx.timers.pop(key, None)
        task = asyncio.create_task(_woken(ctx, namespace, name))
        ctx.woken.add(task)
        task.add_done_callback(ctx.woken.discard)

    ctx.timers[key] = asyncio.get_running_loop().call_later(delay, fire)


async def _woken(ctx: Context, namespace: str, name: str) -> None:
    try:
        if await _is_active(ctx):
            await reconcile_relay(ctx, namespace, name)
    except Exception:
        logger.exception("SmtpRelay %s/%s: timed reconcile failed", namespace, name)


def _context(memo: Any) -> Context:
    context: Context = memo["context"]
    return context


async def _read(ctx: Context, url: str) -> dict[str, Any] | None:
    """A watched object (SmtpRelay, RelayProvider, relay Deployment), from the cache when
    a watch event or our own write has shown it, else from the API server."""
    known, obj = ctx.cache.lookup(url)
    if known:
        return obj
    obj = await ctx.kube.get(url)
    if obj is None:
        ctx.cache.absent(url)
    else:
        ctx.cache.seen(obj, url=url)
    return obj


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _announce(
    ctx: Context, obj: dict[str, Any], reason: str, message: str, *, warning: bool = False
) -> None:
    """Post an Event and log the same line; a failed post never fails the reconcile."""
    meta = obj["metadata"]
    log = logger.warning if warning else logger.info
    log("%s %s/%s: %s: %s", obj["kind"], meta["namespace"], meta["name"], reason, message)
    try:
        with bookkeeping():
            await ctx.kube.post_event(
                event(obj, warning=warning, reason=reason, message=message, now=_now())
            )
    except ApiError as exc:
        logger.warning("could not post event %s: %s", reason, exc)


async def _write_status(
    ctx: Context, obj: dict[str, Any], status: dict[str, Any], url: str
) -> list[dict[str, Any]]:
    """Patch status if it changed; return the conditions that changed (for Events)."""
    previous = obj.get("status") or {}
    old_conditions = previous.get("conditions", [])
    status["conditions"] = conditions.merge(
        old_conditions,
        status["conditions"],
        now=_now(),
        generation=status["observedGeneration"],
    )
    if any(_bare(previous.get(key)) != _bare(value) for key, value in status.items()):
        with bookkeeping():
            ctx.cache.seen(await ctx.kube.patch_status(url, status), url=url)
    return conditions.transitions(old_conditions, status["conditions"])


def _bare(value: Any) -> Any:
    """A status value without null members: what the API server stores of a merge patch."""
    if isinstance(value, dict):
        return {k: _bare(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_bare(v) for v in value]
    return value


async def _report_transitions(
    ctx: Context, obj: dict[str, Any], changed: list[dict[str, Any]]
) -> None:
    before = {
        c.get("type"): c.get("status") for c in (obj.get("status") or {}).get("conditions", [])
    }
    for condition in changed:
        kind, ok = condition["type"], condition["status"] == "True"
        if kind == "Promoted":
            continue  # the rollout posts its own Events, one per step
        if kind == "Degraded" and ok:
            await _announce(ctx, obj, condition["reason"], condition["message"], warning=True)
        elif kind == "Ready" and ok:
            await _announce(ctx, obj, condition["reason"], condition["message"])
        elif kind == "Ready" and before.get("Ready") == "True":
            # Losing readiness is news; not yet having it, right after creation, is not.
            await _announce(ctx, obj, condition["reason"], condition["message"], warning=True)


# ---------------------------------------------------------------------------------------
# RelayProvider
# ---------------------------------------------------------------------------------------


async def reconcile_provider(ctx: Context, namespace: str, name: str) -> None:
    """Validate one provider and publish the verdict in its status."""
    url = path(API_VERSION, "RelayProvider", namespace, name)
    async with ctx.lock("RelayProvider", namespace, name):
        obj = await _read(ctx, url)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        secret = None
        try:
            spec = RelayProviderSpec.model_validate(obj.get("spec") or {})
        except pydantic.ValidationError as exc:
            verdict = providers.Verdict(False, "InvalidSpec", _describe(exc))
        else:
            if spec.credentials is not None:
                ref = spec.credentials.secret_ref.name
                secret = await ctx.kube.get(path("v1", "Secret", namespace, ref))
            verdict = providers.validate(spec, secret)
        status: dict[str, Any] = {
            "observedGeneration": obj["metadata"].get("generation", 0),
            "conditions": conditions.provider_conditions(
                verdict.ready, verdict.reason, verdict.message
            ),
        }
        if secret is not None:
            status["credentialsVersion"] = secret["metadata"]["resourceVersion"]
        changed = await _write_status(ctx, obj, status, url)
        await _report_transitions(ctx, obj, changed)


async def _dependents(ctx: Context, namespace: str, provider: str) -> list[str]:
    relays = await ctx.kube.list(path(API_VERSION, "SmtpRelay", namespace))
    return [
        r["metadata"]["name"]
        for r in relays
        if provider in (r.get("spec") or {}).get("providers", [])
    ]


async def provider_changed(ctx: Context, namespace: str, name: str) -> None:
    """Validate the provider, then re-render every relay that delivers through it."""
    await reconcile_provider(ctx, namespace, name)
    for relay in await _dependents(ctx, namespace, name):
        await reconcile_relay(ctx, namespace, relay)


# ---------------------------------------------------------------------------------------
# SmtpRelay
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Everything a relay's children are built from, or the problems that prevent it."""

    providers: list[Provider]
    secret_versions: dict[str, str]
    problems: list[Problem]


async def _gather(ctx: Context, relay: Relay) -> Inputs:
    found: list[Provider] = []
    problems: list[Problem] = []
    if relay.spec.queue.backend == "sqlite" and relay.spec.replicas > 1:
        # The API server refuses this already (CRD rule); kept for objects stored before.
        problems.append(Problem("InvalidSpec", "spec.replicas must be 0 or 1 with sqlite"))
    for index, name in enumerate(relay.spec.providers):
        obj = await _read(ctx, path(API_VERSION, "RelayProvider", relay.namespace, name))
        where = f"spec.providers[{index}]: RelayProvider {name!r}"
        if obj is None:
            problems.append(Problem("ProviderNotFound", f"{where} not found in this namespace"))
            continue
        try:
            found.append(Provider(name, RelayProviderSpec.model_validate(obj.get("spec") or {})))
        except pydantic.ValidationError as exc:
            problems.append(Problem("ProviderNotReady", f"{where}: {_describe(exc)}"))
    versions: dict[str, str] = {}
    for use in builders.secret_uses(relay, found):
        secret = await ctx.kube.get(path("v1", "Secret", relay.namespace, use.secret))
        if secret is None:
            problems.append(
                Problem("SecretNotFound", f"{use.field}: Secret {use.secret!r} not found")
            )
            continue
        data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
        missing = [key for key in use.keys if not data.get(key)]
        if missing:
            problems.append(
                Problem(
                    "SecretKeyMissing",
                    f"{use.field}: Secret {use.secret!r} lacks {', '.join(missing)}",
                )
            )
        meta = secret["metadata"]
        versions[use.secret] = f"{meta['uid']}/{meta['resourceVersion']}"
    for provider in found:
        problem = providers.spec_problem(provider.spec)
        if problem is not None:
            where = f"RelayProvider {provider.name!r}"
            problems.append(Problem("ProviderNotReady", f"{where}: {problem}"))
    return Inputs(found, versions, problems)


def _describe(exc: pydantic.ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    return "; ".join("spec." + ".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in errors)


async def _apply_children(
    ctx: Context,
    obj: dict[str, Any],
    relay: Relay,
    inputs: Inputs,
    live: Mapping[str, str] | None = None,
    drifted: bool = False,
) -> dict[str, Any]:
    """Apply ConfigMap, Deployment, Service and PDB; return the Deployment as stored.

    `live`: the resync's fingerprints of the children as stored; then only the children
    that changed on either side since the last apply are applied (see drift.py).
    `drifted`: the Deployment's watch showed it edited or deleted by someone else, which
    is then reported as such.
    """
    deployment_url = path("apps/v1", "Deployment", relay.namespace, relay.name)

    # Only the Deployment waits: its pod template names the ConfigMap's hash, and pods
    # rolled for a new hash must find the new relay.yaml. The Service and the PDB need
    # nothing from the others and go with the ConfigMap, while the Deployment as it was is
    # read. Two round trips instead of five; and the Service, the slowest child to create
    # (the API server allocates its ClusterIP with a request of its own), is not queued
    # behind the ConfigMap.
    config_map = builders.config_map(relay, inputs.providers)
    config_hash = builders.digest(config_map["data"]["relay.yaml"])
    before: dict[str, Any] | None
    before, *_ = await asyncio.gather(
        _read(ctx, deployment_url),
        _apply(ctx, obj, config_map, live),
        _apply(ctx, obj, builders.service(relay), live),
        _apply(ctx, obj, builders.disruption_budget(relay), live),
    )
    await asyncio.sleep(ctx.settings.apply_pause_s)
    image = relay.spec.image or ctx.settings.relay_image
    deployment = builders.deployment(
        relay,
        inputs.providers,
        image=image,
        config_hash=config_hash,
        secret_versions=inputs.secret_versions,
    )
    after = await _apply(ctx, obj, deployment, live, drifted=drifted)
    if after is None:
        if before is not None:
            return before  # as our last apply left it: nothing to report
        # Listed a moment ago, yet unknown to the cache: apply it rather than guess.
        after = await _apply(ctx, obj, deployment, None)
        assert after is not None
    ctx.cache.seen(after, url=deployment_url)
    ctx.applied[deployment_url] = after["metadata"].get("generation", 0)
    if before is not None or not drifted:
        await _report_changes(ctx, obj, before, after)  # not "Created" for a repair
    return after


async def _apply(
    ctx: Context,
    obj: dict[str, Any],
    manifest: dict[str, Any],
    live: Mapping[str, str] | None,
    *,
    drifted: bool = False,
) -> dict[str, Any] | None:
    """Apply one child, and remember it; in a resync pass (`live` given) only when it
    changed on either side. None when it was left alone. `drifted`: known to have been
    changed or deleted by someone else."""
    verdict = "ours" if live is None else ctx.children.verdict(manifest, live)
    if drifted:
        verdict = "theirs"
    if verdict == "unchanged":
        return None
    child = f"{manifest['kind']} {manifest['metadata']['name']}"
    try:
        result = await ctx.kube.apply(manifest)
    except ApiError as exc:
        # Said where on-call looks, not only in the operator's log: a quota, an admission
        # policy or an edit the operator cannot undo keeps the relay from its children.
        await _announce(ctx, obj, "ApplyFailed", f"{child}: {exc}", warning=True)
        raise
    ctx.children.record(manifest, result)
    if verdict == "theirs":
        await _announce(
            ctx,
            obj,
            "DriftRepaired",
            f"{child} was changed or deleted outside the operator: applied again",
            warning=True,
        )
    return result


async def _report_changes(
    ctx: Context, obj: dict[str, Any], before: dict[str, Any] | None, after: dict[str, Any]
) -> None:
    """One Event per thing that changed the pods: configuration, a Secret, image, scale."""
    name = after["metadata"]["name"]
    if before is None:
        await _announce(
            ctx,
            obj,
            "Created",
            f"created ConfigMap {name}-config, Deployment {name}, Service {name} and "
            f"PodDisruptionBudget {name}",
        )
        return
    old_pod, new_pod = _pod_annotations(before), _pod_annotations(after)
    if old_pod.get(builders.CONFIG_HASH) != new_pod.get(builders.CONFIG_HASH):
        await _announce(
            ctx,
            obj,
            "ConfigChanged",
            f"relay.yaml changed (hash {old_pod.get(builders.CONFIG_HASH, '-')[:12]} -> "
            f"{new_pod.get(builders.CONFIG_HASH, '-')[:12]}): rolling the pods",
        )
    old_secrets, new_secrets = _secret_versions(before), _secret_versions(after)
    rotated = sorted(n for n in new_secrets if old_secrets.get(n, new_secrets[n]) != new_secrets[n])
    if rotated:
        await _announce(
            ctx, obj, "SecretChanged", f"Secret {', '.join(rotated)} changed: rolling the pods"
        )
    old_image, new_image = _image(before), _image(after)
    if old_image != new_image:
        await _announce(ctx, obj, "ImageChanged", f"image {old_image} -> {new_image}")
    old_replicas, new_replicas = before["spec"].get("replicas"), after["spec"].get("replicas")
    if old_replicas != new_replicas:
        await _announce(ctx, obj, "Scaled", f"replicas {old_replicas} -> {new_replicas}")


def _pod_annotations(deployment: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = deployment["spec"]["template"]["metadata"].get("annotations", {})
    return annotations


def _secret_versions(deployment: dict[str, Any]) -> dict[str, str]:
    raw = deployment["metadata"].get("annotations", {}).get(builders.SECRET_VERSIONS, "{}")
    versions: dict[str, str] = json.loads(raw)
    return versions


def _image(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


async def reconcile_relay(
    ctx: Context,
    namespace: str,
    name: str,
    *,
    pods_only: bool = False,
    live: Mapping[str, str] | None = None,
) -> None:
    """Bring one SmtpRelay's children and status in line with its spec.

    `pods_only`: what changed is the status of the relay's Deployment, so only the
    relay's status may need writing (see `_refresh_status`). `live`: given by the
    resync, the children as stored (see `_apply_children`).
    """
    url = path(API_VERSION, "SmtpRelay", namespace, name)
    # The reconcile's reads and applies go before bookkeeping and later relays' work
    # (kube.children_first); its status patch and Events mark themselves bookkeeping.
    with children_first(since=time.monotonic()):
        async with ctx.lock("SmtpRelay", namespace, name):
            obj = await _read(ctx, url)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return  # the garbage collector takes the children
            if pods_only and await _refresh_status(ctx, obj, url):
                return
            drifted = pods_only and _deployment_drifted(ctx, obj)
            generation = obj["metadata"].get("generation", 0)
            previous = obj.get("status") or {}
            try:
                spec = SmtpRelaySpec.model_validate(obj.get("spec") or {})
            except pydantic.ValidationError as exc:
                inputs = Inputs([], {}, [Problem("InvalidSpec", _describe(exc))])
                relay = None
            else:
                relay = Relay(name, namespace, obj["metadata"]["uid"], spec)
                inputs = await _gather(ctx, relay)

            if relay is not None and relay.spec.strategy is not None and not inputs.problems:
                await _reconcile_strategy(ctx, obj, relay, inputs, url)
                return
            deployment: dict[str, Any] | None
            retired = False
            if relay is not None and not inputs.problems:
                deployment = await _apply_children(ctx, obj, relay, inputs, live, drifted)
                if previous.get("observedGeneration") != generation:
                    await _design_only_warnings(ctx, obj, relay)
                if previous.get("rollout"):
                    retired = await _retire_strategy(ctx, obj, relay, deployment)
            else:
                # A broken configuration is never rolled out: the pods keep running on the
                # last good one while the status says what to fix.
                deployment = await _read(ctx, path("apps/v1", "Deployment", namespace, name))

            problem = None
            if inputs.problems:
                problem = Problem(
                    inputs.problems[0].reason, "; ".join(p.message for p in inputs.problems)
                )
            status = _relay_status(generation, problem, deployment)
            if retired:
                status["rollout"] = None
            changed = await _write_status(ctx, obj, status, url)
            await _report_transitions(ctx, obj, changed)


def _relay_status(
    generation: int, problem: Problem | None, deployment: dict[str, Any] | None
) -> dict[str, Any]:
    """An SmtpRelay's status without a strategy: its problem, else its Deployment's pods."""
    state = conditions.rollout(deployment) if deployment else None
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions.relay_conditions(problem, state),
    }
    if deployment is not None:
        pod = _pod_annotations(deployment)
        status.update(
            replicas=state.current if state else 0,
            readyReplicas=state.ready if state else 0,
            updatedReplicas=state.updated if state else 0,
            configHash=pod.get(builders.CONFIG_HASH),
            secretsHash=pod.get(builders.SECRETS_HASH),
        )
    return status


async def _refresh_status(ctx: Context, obj: dict[str, Any], url: str) -> bool:
    """The relay's Deployment reported on its pods: write what that means for the relay.

    A Deployment changes status several times while its pods come up, and each change is
    a watch event. Re-reading the relay's inputs and re-applying its four children for
    each of them made a relay cost the API server about 40 requests instead of 10. This
    writes the status from the Deployment as the watch showed it, and answers False,
    for a full reconcile instead, whenever that would not be the whole story: the spec
    not yet handled, a problem being reported, a strategy, a Deployment gone or edited.
    """
    meta, previous = obj["metadata"], obj.get("status") or {}
    if (obj.get("spec") or {}).get("strategy") or previous.get("rollout"):
        return False
    if previous.get("observedGeneration") != meta.get("generation"):
        return False
    if any(
        c.get("type") == "Progressing" and c.get("reason") == "Blocked"
        for c in previous.get("conditions", [])
    ):
        return False  # a problem with the inputs: only a full reconcile sees it solved
    deployment_url = path("apps/v1", "Deployment", meta["namespace"], meta["name"])
    known, deployment = ctx.cache.lookup(deployment_url)
    if not known or deployment is None:
        return False  # deleted: the full reconcile creates it again
    if ctx.applied.get(deployment_url) != deployment["metadata"].get("generation"):
        return False  # its spec is not what we applied (or not since we started)
    status = _relay_status(meta.get("generation", 0), None, deployment)
    changed = await _write_status(ctx, obj, status, url)
    await _report_transitions(ctx, obj, changed)
    return True


def _deployment_drifted(ctx: Context, obj: dict[str, Any]) -> bool:
    """Whether the relay's Deployment, ours, was seen by its watch deleted or at a
    generation other than our last apply's: someone else's doing. Run under the relay's
    lock, after which every apply of ours has been noted in `ctx.applied`."""
    meta = obj["metadata"]
    url = path("apps/v1", "Deployment", meta["namespace"], meta["name"])
    # A rollout strategy deletes and makes Deployments of its own.
    strategy = (obj.get("spec") or {}).get("strategy") or (obj.get("status") or {}).get("rollout")
    if url not in ctx.applied or strategy:
        return False
    known, deployment = ctx.cache.lookup(url)
    if not known:
        return False
    return deployment is None or deployment["metadata"].get("generation") != ctx.applied[url]


async def _design_only_warnings(ctx: Context, obj: dict[str, Any], relay: Relay) -> None:
    """Say so, once per generation, when the spec asks for something risky."""
    sqlite = relay.spec.queue.sqlite
    if relay.spec.queue.backend == "sqlite" and not (sqlite and sqlite.claim_name):
        await _announce(
            ctx,
            obj,
            "EphemeralQueue",
            "spec.queue.sqlite.claimName is unset: the queue is on an emptyDir and mail "
            "still queued is lost when the pod is deleted",
            warning=True,
        )


async def _reconcile_strategy(
    ctx: Context, obj: dict[str, Any], relay: Relay, inputs: Inputs, url: str
) -> None:
    """A blue-green or canary relay: one pass of strategies.run, then the status."""

    async def announce(reason: str, message: str, warning: bool) -> None:
        await _announce(ctx, obj, reason, message, warning=warning)

    async def write_state(state: Any) -> None:
        # Into the cache too: the next pass must start from the state written here.
        rollout_state = {"rollout": state.model_dump(mode="json", by_alias=True)}
        ctx.cache.seen(await ctx.kube.patch_status(url, rollout_state), url=url)

    work = strategies.StrategyRun(
        ctx.kube, ctx.settings, obj, relay, inputs.providers, inputs.secret_versions, announce
    )
    outcome = await strategies.run(work, write_state)
    state = outcome.plan.state
    _wake_later(ctx, relay.namespace, relay.name, outcome.plan.wake_at)
    found = {c: d for c, d in outcome.deployments.items() if d is not None}
    stable = found.get(state.stable_colour) if state.stable_colour else None
    states = {c: strategies.colour_state(d) for c, d in found.items()}
    # The pods the Service sends mail to: the active colour, or both during a canary.
    behind = [c for c in found if outcome.plan.service_colour in (None, c)]
    serving = sum(states[c].available for c in behind)
    status: dict[str, Any] = {
        "observedGeneration": obj["metadata"].get("generation", 0),
        "conditions": conditions.strategy_conditions(
            serving, relay.spec.replicas, state, outcome.revision
        ),
        "replicas": sum(int((d.get("status") or {}).get("replicas", 0)) for d in found.values()),
        # Ready pods behind the Service; an idle colour kept for fast rollback is not.
        "readyReplicas": sum(
            int((found[c].get("status") or {}).get("readyReplicas", 0)) for c in behind
        ),
        "updatedReplicas": sum(
            s.available for s in states.values() if s.revision == outcome.revision
        ),
        "rollout": state.model_dump(mode="json", by_alias=True),
    }
    if stable is not None:
        pod = _pod_annotations(stable)
        status.update(
            configHash=pod.get(builders.CONFIG_HASH), secretsHash=pod.get(builders.SECRETS_HASH)
        )
    obj = {**obj, "status": {**(obj.get("status") or {}), "rollout": status["rollout"]}}
    changed = await _write_status(ctx, obj, status, url)
    await _report_transitions(ctx, obj, changed)


async def _retire_strategy(
    ctx: Context, obj: dict[str, Any], relay: Relay, deployment: dict[str, Any]
) -> bool:
    """spec.strategy was removed: once the plain Deployment serves, the colours go."""
    if not conditions.rollout(deployment).serving:
        return False
    removed = []
    for colour in rollout.COLOURS:
        name = builders.colour_name(relay, colour)
        if await ctx.kube.delete(path("apps/v1", "Deployment", relay.namespace, name)):
            removed.append(name)
    await ctx.kube.delete(path("v1", "Service", relay.namespace, builders.preview_name(relay)))
    if removed:
        await _announce(
            ctx,
            obj,
            "StrategyRemoved",
            f"spec.strategy unset: Deployment {relay.name} serves; deleted {', '.join(removed)}",
        )
    return True


# ---------------------------------------------------------------------------------------
# The periodic resync, gated by peering
# ---------------------------------------------------------------------------------------


async def _is_active(ctx: Context) -> bool:
    """True unless a live peer outranks us (kopf pauses its own handlers the same way)."""
    if ctx.settings.peering is None:
        return True
    url = f"/apis/kopf.dev/v1/clusterkopfpeerings/{ctx.settings.peering}"
    peering = await ctx.kube.get(url) or {}
    now = datetime.datetime.now(datetime.UTC)
    for identity, peer in (peering.get("status") or {}).items():
        if identity == ctx.identity or not isinstance(peer, dict):
            continue
        seen = datetime.datetime.fromisoformat(str(peer.get("lastseen")))
        alive = seen + datetime.timedelta(seconds=int(peer.get("lifetime", 60))) > now
        if alive and int(peer.get("priority", 0)) >= ctx.priority:
            return False
    return True


async def resync(ctx: Context) -> None:
    """Re-validate every provider and reconcile every relay, forever.

    This is what notices a rotated or newly created Secret: the operator may only `get`
    Secrets (watching them would stream every Secret in the cluster through it). It also
    repairs children changed or deleted by others, applying only those (drift.py).
    Relays with a rollout strategy still apply their children each pass.
    """
    interval = ctx.settings.resync_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            if not await _is_active(ctx):
                continue
            found = [
                (reconcile, obj["metadata"])
                for plural, reconcile in (
                    ("relayproviders", reconcile_provider),
                    ("smtprelays", reconcile_relay),
                )
                for obj in await ctx.kube.list(f"/apis/{API_VERSION}/{plural}")
            ]
            live = await drift.live_children(ctx.kube, MANAGED)
        except Exception as exc:
            logger.warning("resync: listing failed, next try in %ss: %s", interval, exc)
            continue
        ctx.cache.prune(older_than_s=interval)
        ctx.children.begin_pass()
        for reconcile, meta in found:
            # One broken object must not stop the others, nor end the loop.
            try:
                if reconcile is reconcile_relay:
                    await reconcile_relay(ctx, meta["namespace"], meta["name"], live=live)
                else:
                    await reconcile(ctx, meta["namespace"], meta["name"])
            except Exception:
                logger.exception("resync of %s/%s failed", meta["namespace"], meta["name"])
        ctx.children.end_pass(live)


# ---------------------------------------------------------------------------------------
# kopf wiring: handlers named <kind>_<event>
# ---------------------------------------------------------------------------------------


@asynccontextmanager
async def _retrying() -> AsyncIterator[None]:
    """API failures are retried by kopf after a short delay, with the server's reason."""
    try:
        yield
    except ApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=BACKOFF_S) from exc


@kopf.on.startup()
async def operator_startup(*, memo: Any, **_: Any) -> None:
    ctx = _context(memo)
    ctx.resync = asyncio.create_task(resync(ctx), name="resync")


@kopf.on.cleanup()
async def operator_cleanup(*, memo: Any, **_: Any) -> None:
    ctx = _context(memo)
    if ctx.resync is not None:
        ctx.resync.cancel()


@kopf.on.resume(*SMTP_RELAYS, backoff=BACKOFF_S)
async def smtprelay_resume(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await reconcile_relay(_context(memo), namespace, name)


@kopf.on.create(*SMTP_RELAYS, backoff=BACKOFF_S)
async def smtprelay_create(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await reconcile_relay(_context(memo), namespace, name)


@kopf.on.update(*SMTP_RELAYS, backoff=BACKOFF_S)
async def smtprelay_update(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await reconcile_relay(_context(memo), namespace, name)


@kopf.on.resume(*RELAY_PROVIDERS, backoff=BACKOFF_S)
async def relayprovider_resume(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await reconcile_provider(_context(memo), namespace, name)


@kopf.on.create(*RELAY_PROVIDERS, backoff=BACKOFF_S)
async def relayprovider_create(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await provider_changed(_context(memo), namespace, name)


@kopf.on.update(*RELAY_PROVIDERS, backoff=BACKOFF_S)
async def relayprovider_update(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the kinds are namespaced
    async with _retrying():
        await provider_changed(_context(memo), namespace, name)


def _remember(ctx: Context, event: Mapping[str, Any]) -> None:
    """Keep what a watch event shows in the cache; events of every kind come through."""
    obj = event.get("object")
    if not isinstance(obj, dict) or "metadata" not in obj:
        return
    if event.get("type") == "DELETED":
        ctx.cache.gone(obj)
    else:
        ctx.cache.seen(obj)


@kopf.on.event(*SMTP_RELAYS)
async def smtprelay_event(*, event: Mapping[str, Any], memo: Any, **_: Any) -> None:
    # kopf runs event handlers before the create/update/resume ones of the same event,
    # so those read this very version from the cache.
    _remember(_context(memo), event)


@kopf.on.event(*RELAY_PROVIDERS)
async def relayprovider_event(*, event: Mapping[str, Any], memo: Any, **_: Any) -> None:
    _remember(_context(memo), event)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_event(
    *,
    event: Mapping[str, Any],
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    **_: Any,
) -> None:
    # Rollout progress and pod readiness surface as the relay's conditions; a Deployment
    # deleted or edited by hand is applied again.
    ctx = _context(memo)
    _remember(ctx, event)
    relay = labels.get(builders.LABEL_RELAY)
    if relay and namespace:
        try:
            await reconcile_relay(ctx, namespace, relay, pods_only=True)
        except ApiError as exc:
            logger.warning("SmtpRelay %s/%s: status refresh failed: %s", namespace, relay, exc)
