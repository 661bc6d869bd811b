"""The chart ships the relay's monitoring: alerts, scraping and the dashboard."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
import yaml

from tests.operator.cluster import REPO, missing_tools, tool_path

CHART = REPO / "charts" / "smtp-relay-operator"
MONITORING = REPO / "monitoring"
PROMETHEUS_CRDS = [
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
]


def render(*args: str) -> dict[str, dict[str, Any]]:
    path = tool_path()
    assert not missing_tools(path), "run hack/cluster/build.sh (make cluster-tools) first"
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["helm", "template", "relays", str(CHART), "--namespace", "monitoring", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout
    return {d["kind"]: d for d in yaml.safe_load_all(out) if d}


@pytest.mark.parametrize("name", ["alerts.yaml", "dashboard.json"])
def test_the_chart_carries_the_same_files_as_monitoring(name: str) -> None:
    assert (CHART / "files" / name).read_bytes() == (MONITORING / name).read_bytes(), (
        f"copy monitoring/{name} to {CHART.relative_to(REPO)}/files/{name}"
    )


def test_prometheus_objects_render_where_their_crds_exist() -> None:
    objects = render(*PROMETHEUS_CRDS)
    rule = objects["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    monitor = objects["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == {"app.kubernetes.io/name": "smtp-relay"}
    assert monitor["podMetricsEndpoints"][0]["port"] == "http"
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["smtp-relay.json"]) == json.loads(
        (MONITORING / "dashboard.json").read_text()
    )


def test_nothing_prometheus_specific_renders_without_its_crds() -> None:
    objects = render()
    assert "PrometheusRule" not in objects and "PodMonitor" not in objects
    assert "ConfigMap" in objects
    assert "ConfigMap" not in render("--set", "monitoring.dashboard.enabled=false")
