"""The CRDs: generated from the models, committed, documented field by field."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from relay_operator import cli, crdgen
from relay_operator.models import CRON_PATTERN, KINDS, SmtpRelaySpec


def test_committed_crds_match_the_models() -> None:
    stale = crdgen.drift()
    assert not stale, f"regenerate with `python -m relay_operator.crdgen`: {stale}"


def test_check_mode_reports_drift(tmp_path: Any) -> None:
    (tmp_path / "stale.yaml").write_text("kind: Old\n")
    assert crdgen.drift((tmp_path,)) != []
    crdgen.write((tmp_path,))
    (tmp_path / "stale.yaml").unlink()
    assert crdgen.drift((tmp_path,)) == []


def _properties(schema: dict[str, Any], where: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, child in schema.get("properties", {}).items():
        found.append((f"{where}.{name}", child))
        found += _properties(child, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _properties(schema[key], f"{where}[]")
    return found


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_field_is_documented_and_typed(kind: Any) -> None:
    schema = crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for where, prop in _properties(schema):
        if where == ".metadata":
            continue  # the API server documents metadata and refuses additions
        assert prop.get("description"), f"{kind.kind}{where} has no description"
        assert "type" in prop or prop.get("x-kubernetes-int-or-string"), where
        assert "$ref" not in prop and "title" not in prop, where


def test_crds_carry_status_columns_short_names_and_category() -> None:
    for kind in KINDS:
        spec = crdgen.crd(kind)["spec"]
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["shortNames"] and spec["names"]["categories"] == ["smtp-relay"]
        version = spec["versions"][0]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert {"conditions", "observedGeneration"} <= status.keys()
        assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
        assert any(c["name"] == "Age" for c in version["additionalPrinterColumns"])


def test_runbook_defaults_are_in_the_schema() -> None:
    by_kind = {k.kind: crdgen.crd(k) for k in KINDS}

    def spec_of(kind: str) -> dict[str, Any]:
        root = by_kind[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        return root["properties"]["spec"]["properties"]  # type: ignore[no-any-return]

    strategy = spec_of("SmtpRelay")["strategy"]["properties"]
    assert strategy["blueGreen"]["properties"]["observeWindow"]["default"] == "5m"
    assert strategy["blueGreen"]["properties"]["errorRateThreshold"]["default"] == 5
    canary = strategy["canary"]["properties"]
    assert [canary[k]["default"] for k in ("stepWeight", "maxWeight", "interval", "threshold")] == [
        10,
        50,
        "1m",
        10,
    ]
    analysis = strategy["analysis"]["properties"]
    assert analysis["successRate"]["properties"]["min"]["default"] == 99
    assert analysis["latency"]["properties"]["p95MaxMs"]["default"] == 500
    assert spec_of("BackupPolicy")["retentionDays"]["default"] == 30
    delivery = spec_of("SmtpRelay")["delivery"]["properties"]
    assert delivery["workerCount"]["default"] == 10 and delivery["batchSize"]["default"] == 50
    assert "Default: 10." in delivery["workerCount"]["description"]  # shown by kubectl explain


@pytest.mark.parametrize(
    "schedule",
    [
        "0 2 * * *",
        "*/15 * * * *",
        "30 1 1,15 * MON-FRI",
        "0 0 * jan,jul sun",
        "5-10/2 0-23 31 12 7",
    ],
)
def test_cron_accepts_five_fields(schedule: str) -> None:
    assert re.fullmatch(CRON_PATTERN, schedule)


@pytest.mark.parametrize(
    "schedule",
    ["0 0 2 * * *", "0 2 * *", "@daily", "60 * * * *", "0 24 * * *", "* * 32 * *", "* * * 13 *"],
)
def test_cron_refuses_anything_else(schedule: str) -> None:
    assert not re.fullmatch(CRON_PATTERN, schedule)


def test_models_apply_the_same_defaults_as_the_api_server() -> None:
    spec = SmtpRelaySpec.model_validate({"providers": ["outbox"]})
    assert spec.replicas == 1 and spec.queue.backend == "sqlite"
    assert spec.delivery.process_interval == "10s"
    assert spec.resources.requests.memory == "128Mi"


def test_cli_prints_the_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    names = {d["metadata"]["name"] for d in documents}
    assert "smtprelays.relay.smtp-relay.dev" in names
    assert "clusterkopfpeerings.kopf.dev" in names


def test_run_help_names_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RELAY_OPERATOR_RESYNC_INTERVAL_S (Period of the full resync:" in text
    assert "applied again. Default: 60.)" in text
    assert "RELAY_OPERATOR_API_CONCURRENCY (API requests in flight" in text
    # A setting that is off unless given says nothing of a default.
    assert "standalone (a developer's laptop).);" in text
