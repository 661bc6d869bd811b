"""Status conditions and provider verdicts: pure functions."""

from __future__ import annotations

from typing import Any

from relay_operator import conditions, providers
from relay_operator.conditions import Problem
from relay_operator.models import RelayProviderSpec


def _deployment(wanted: int, **status: int) -> dict[str, Any]:
    return {
        "metadata": {"generation": 2},
        "spec": {"replicas": wanted},
        "status": {"observedGeneration": 2, **status},
    }


def _by_type(found: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in found}


def test_all_pods_available_is_ready() -> None:
    state = conditions.rollout(
        _deployment(3, replicas=3, updatedReplicas=3, readyReplicas=3, availableReplicas=3)
    )
    assert _by_type(conditions.relay_conditions(None, state)) == {
        "Ready": ("True", "PodsAvailable"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }


def test_rolling_update_keeps_ready_while_capacity_holds() -> None:
    state = conditions.rollout(
        _deployment(3, replicas=4, updatedReplicas=1, readyReplicas=3, availableReplicas=3)
    )
    found = _by_type(conditions.relay_conditions(None, state))
    assert found["Ready"] == ("True", "PodsAvailable")
    assert found["Progressing"] == ("True", "RollingOut")


def test_unobserved_generation_is_not_ready_yet() -> None:
    deployment = _deployment(1, replicas=1, updatedReplicas=1, availableReplicas=1)
    deployment["metadata"]["generation"] = 3
    found = _by_type(conditions.relay_conditions(None, conditions.rollout(deployment)))
    assert found["Ready"] == ("False", "PodsNotReady")


def test_stuck_rollout_is_degraded() -> None:
    deployment = _deployment(2, replicas=2, updatedReplicas=1, availableReplicas=1)
    deployment["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet has timed out progressing.",
        }
    ]
    found = _by_type(conditions.relay_conditions(None, conditions.rollout(deployment)))
    assert found["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_problem_blocks_and_names_the_field() -> None:
    problem = Problem("SecretNotFound", "spec.queue.mysql.passwordSecretRef: Secret 'db' not found")
    found = conditions.relay_conditions(problem, None)
    assert _by_type(found)["Ready"] == ("False", "SecretNotFound")
    assert _by_type(found)["Progressing"] == ("False", "Blocked")
    assert "spec.queue.mysql.passwordSecretRef" in found[0]["message"]


def test_merge_keeps_transition_time_while_status_holds() -> None:
    first = conditions.merge([], conditions.relay_conditions(None, None), now="t1", generation=1)
    again = conditions.merge(first, conditions.relay_conditions(None, None), now="t2", generation=1)
    assert [c["lastTransitionTime"] for c in again] == ["t1", "t1", "t1"]
    assert conditions.transitions(first, again) == []
    ready = conditions.rollout(_deployment(1, replicas=1, updatedReplicas=1, availableReplicas=1))
    later = conditions.merge(
        again, conditions.relay_conditions(None, ready), now="t3", generation=2
    )
    assert {c["type"]: c["lastTransitionTime"] for c in later}["Ready"] == "t3"
    assert [c["type"] for c in conditions.transitions(again, later)] == ["Ready", "Progressing"]


def _provider(spec: dict[str, Any]) -> RelayProviderSpec:
    return RelayProviderSpec.model_validate(spec)


GMAIL = {"type": "gmail", "gmail": {"user": "me"}, "credentials": {"secretRef": {"name": "g"}}}


def test_provider_keys_by_type() -> None:
    assert providers.required_keys(_provider(GMAIL)) == (
        "client_id",
        "client_secret",
        "refresh_token",
    )
    service_account = {
        **GMAIL,
        "gmail": {"user": "a@b.example", "credentialsKind": "serviceAccount"},
    }
    assert providers.required_keys(_provider(service_account)) == ("key.json",)
    mailgun = {
        "type": "mailgun",
        "mailgun": {"domain": "mg.example"},
        "credentials": {"secretRef": {"name": "m"}},
    }
    assert providers.required_keys(_provider(mailgun)) == ("api_key",)
    assert providers.required_keys(_provider({"type": "outbox"})) == ()


def test_provider_verdicts_name_the_secret_and_keys_never_values() -> None:
    spec = _provider(GMAIL)
    assert providers.validate(spec, None).reason == "SecretNotFound"
    partial = {
        "metadata": {"name": "g"},
        "data": {"client_id": "eA==", "client_secret": "c2VjcmV0"},
    }
    verdict = providers.validate(spec, partial)
    assert (verdict.ready, verdict.reason) == (False, "SecretKeyMissing")
    assert "refresh_token" in verdict.message and "spec.credentials.secretRef" in verdict.message
    assert "c2VjcmV0" not in verdict.message
    complete = {"data": {"client_id": "eA==", "client_secret": "eA==", "refresh_token": "eA=="}}
    assert providers.validate(spec, complete).ready
    assert providers.validate(_provider({"type": "outbox"}), None).reason == "NoCredentialsNeeded"


def test_strategy_ready_counts_every_pod_behind_the_service() -> None:
    from relay_operator.models import RolloutStatus

    step = RolloutStatus.model_validate(
        {
            "phase": "CanaryStep",
            "stableRevision": "r1",
            "stableColour": "blue",
            "candidateRevision": "r2",
            "candidateColour": "green",
            "setWeight": 25,
        }
    )
    # 3 stable + 1 canary pods serve: a canary step takes no capacity away.
    found = {c["type"]: c for c in conditions.strategy_conditions(4, 4, step, "r2")}
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("True", "PodsAvailable")
    assert found["Progressing"]["status"] == "True"
    assert found["Promoted"]["status"] == "False"
    short = {c["type"]: c for c in conditions.strategy_conditions(3, 4, step, "r2")}
    assert short["Ready"]["status"] == "False" and short["Ready"]["message"] == "3/4 pods available"
