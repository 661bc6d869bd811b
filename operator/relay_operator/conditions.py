"""Status conditions: what a platform engineer reads in `kubectl describe` and waits on.

Pure functions. Every resource carries the same three conditions:

- Ready: serving as specified (for an SmtpRelay: every wanted pod passes /readyz).
- Progressing: a change is being rolled out.
- Degraded: something needs a person; the reason says what, the message names the field.

A condition's lastTransitionTime moves only when its status does, so a resync that finds
nothing new writes nothing new.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TYPES = ("Ready", "Progressing", "Degraded", "Promoted")


@dataclass(frozen=True)
class Problem:
    """Why the spec cannot be acted on; the message names the field to fix."""

    reason: str
    message: str


@dataclass(frozen=True)
class Rollout:
    """The relay Deployment's progress, read from its status."""

    desired: int
    current: int
    updated: int
    ready: int
    available: int
    observed: bool
    failed_reason: str | None = None
    failed_message: str = ""

    @property
    def complete(self) -> bool:
        done = self.updated == self.desired and self.current == self.desired
        return self.observed and done and self.available >= self.desired

    @property
    def serving(self) -> bool:
        return self.observed and self.available >= self.desired


def rollout(deployment: dict[str, Any]) -> Rollout:
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    generation = deployment.get("metadata", {}).get("generation", 0)
    failed_reason, failed_message = None, ""
    for condition in status.get("conditions", []):
        stuck = condition.get("type") == "Progressing" and condition.get("status") == "False"
        if stuck or (condition.get("type") == "ReplicaFailure" and condition["status"] == "True"):
            failed_reason = condition.get("reason") or "RolloutFailed"
            failed_message = condition.get("message", "")
    return Rollout(
        desired=int(spec.get("replicas", 1)),
        current=int(status.get("replicas", 0)),
        updated=int(status.get("updatedReplicas", 0)),
        ready=int(status.get("readyReplicas", 0)),
        available=int(status.get("availableReplicas", 0)),
        observed=int(status.get("observedGeneration", 0)) >= int(generation),
        failed_reason=failed_reason,
        failed_message=failed_message,
    )


def condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def relay_conditions(problem: Problem | None, state: Rollout | None) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for an SmtpRelay."""
    if problem is not None:
        held = "changes are held until this is fixed; pods already running are left as they are"
        return [
            condition("Ready", False, problem.reason, problem.message),
            condition("Progressing", False, "Blocked", held),
            condition("Degraded", True, problem.reason, problem.message),
        ]
    if state is None:
        waiting = "the Deployment is being created"
        return [
            condition("Ready", False, "Creating", waiting),
            condition("Progressing", True, "Creating", waiting),
            condition("Degraded", False, "AsExpected", "no problem found"),
        ]
    counts = f"{state.available}/{state.desired} pods available, {state.updated} updated"
    if state.desired == 0:
        ready = condition("Ready", True, "ScaledToZero", "spec.replicas is 0: no pods wanted")
    elif state.serving:
        ready = condition("Ready", True, "PodsAvailable", counts)
    else:
        ready = condition("Ready", False, "PodsNotReady", counts)
    if state.failed_reason:
        message = f"{state.failed_message} ({counts})".strip()
        return [
            ready,
            condition("Progressing", False, state.failed_reason, message),
            condition("Degraded", True, state.failed_reason, message),
        ]
    if state.complete:
        progressing = condition("Progressing", False, "RolloutComplete", counts)
    else:
        progressing = condition("Progressing", True, "RollingOut", counts)
    return [ready, progressing, condition("Degraded", False, "AsExpected", "no problem found")]


def provider_conditions(ready: bool, reason: str, message: str) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for a RelayProvider (validation is instant)."""
    return [
        condition("Ready", ready, reason, message),
        condition("Progressing", False, "Validated", "validation is complete"),
        condition("Degraded", not ready, reason if not ready else "AsExpected", message),
    ]


def merge(
    previous: Iterable[dict[str, Any]],
    current: Sequence[dict[str, Any]],
    *,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """Stamp the new conditions, keeping lastTransitionTime where the status held."""
    before = {c.get("type"): c for c in previous}
    result = []
    for new in current:
        old = before.get(new["type"])
        moved = old is None or old.get("status") != new["status"]
        since = now if moved or not old else old.get("lastTransitionTime", now)
        result.append({**new, "lastTransitionTime": since, "observedGeneration": generation})
    return result


def transitions(
    previous: Iterable[dict[str, Any]], current: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed: each becomes one Event."""
    before = {c.get("type"): (c.get("status"), c.get("reason")) for c in previous}
    return [c for c in current if before.get(c["type"]) != (c["status"], c["reason"])]


# Rollout phases in which a change is under way.
_MOVING = ("Deploying", "SmokeTesting", "AwaitingConfirmation", "Observing", "CanaryStep")


def strategy_conditions(
    serving: int, desired: int, state: Any, desired_revision: str
) -> list[dict[str, Any]]:
    """Ready, Progressing, Degraded and Promoted for an SmtpRelay with a strategy.

    `state` is the relay's models.RolloutStatus. Ready counts the available pods behind
    the Service, whichever colour they are (a canary step moves pods between colours
    without taking capacity away, and Ready must not flicker for it); the rest follow
    the rollout, so `kubectl wait --for=condition=Promoted` waits for a new revision to
    take all traffic and Degraded says when one was sent back.
    """
    if desired == 0:
        ready = condition("Ready", True, "ScaledToZero", "spec.replicas is 0: no pods wanted")
    elif serving >= desired:
        ready = condition("Ready", True, "PodsAvailable", f"{serving}/{desired} pods available")
    elif state.stable_colour is None:
        ready = condition("Ready", False, "Creating", "the first revision is being deployed")
    else:
        ready = condition("Ready", False, "PodsNotReady", f"{serving}/{desired} pods available")
    phase, message = state.phase, state.message or state.phase
    if state.paused:
        reason = state.pause_reason or "Paused"
        progressing = condition("Progressing", False, "Paused", message)
    elif phase in _MOVING or phase == "Promoting":
        progressing = condition("Progressing", True, phase, message)
    elif phase in ("RolledBack", "Aborted"):
        progressing = condition("Progressing", False, phase, message)
    else:
        progressing = condition("Progressing", False, "RolloutComplete", message)
    # The spec names a revision that was rolled back or aborted: it is not running.
    rejected = phase not in (*_MOVING, "Promoting") and state.rejected_revision == desired_revision
    why = phase if phase != "Stable" else "RolledBack"
    if rejected:
        message = (
            f"revision {desired_revision} was {why}: {message}; change the spec or set "
            "spec.strategy.retryRevision to roll it out again"
        )
    if state.paused and state.pause_reason not in (None, "Requested"):
        degraded = condition("Degraded", True, reason, message)
    elif rejected:
        degraded = condition("Degraded", True, why, message)
    else:
        degraded = condition("Degraded", False, "AsExpected", "no problem found")
    if state.stable_revision == desired_revision and not state.candidate_revision:
        promoted = condition(
            "Promoted", True, "Promoted", f"revision {desired_revision} takes all traffic"
        )
    elif rejected:
        promoted = condition("Promoted", False, why, message)
    else:
        promoted = condition(
            "Promoted", False, "RollingOut", f"revision {desired_revision}: {message}"
        )
    return [ready, progressing, degraded, promoted]
