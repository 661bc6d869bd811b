"""Rollout controls given as annotations: read as controls, and seen by kopf as a change."""

from __future__ import annotations

from typing import Any

import kopf
from relay_operator import strategies
from relay_operator.models import GROUP, Strategy
from relay_operator.settings import OperatorSettings, configure_kopf


def relay(annotations: dict[str, str]) -> dict[str, Any]:
    # What an SmtpRelay looks like once kopf has handled it: its own marker and
    # last-handled configuration sit under GROUP/.
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "SmtpRelay",
        "metadata": {
            "name": "relay",
            "namespace": "mail",
            "annotations": {
                f"{GROUP}/kopf-managed": "yes",
                f"{GROUP}/last-handled-configuration": '{"spec": {}}',
                **annotations,
            },
        },
        "spec": {"replicas": 2},
    }


def test_every_control_annotation_changes_what_kopf_compares() -> None:
    # kopf leaves annotations under its storage prefix out of the diff; a control there
    # would be noticed only at the next resync.
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings())
    storage = settings.persistence.diffbase_storage
    before = storage.build(body=kopf.Body(relay({})))
    for key, annotation in strategies.ANNOTATIONS.items():
        after = storage.build(body=kopf.Body(relay({annotation: "rev-1"})))
        assert after != before, f"kopf would not see the {key} annotation change"


def test_controls_combine_spec_fields_and_annotations() -> None:
    strategy = Strategy.model_validate({"type": "BlueGreen", "promoteRevision": "aaa"})
    notes = {strategies.ANNOTATIONS[k]: v for k, v in [("promote", "bbb"), ("abort", "ccc")]}
    notes[strategies.ANNOTATIONS["paused"]] = "True"
    found = strategies.controls(relay(notes), strategy)
    assert found.promote == {"aaa", "bbb"}
    assert found.abort == {"ccc"}
    assert found.paused
    assert not strategies.controls(relay({}), strategy).paused
