from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.cluster import (
    CHART,
    HACK,
    OPERATOR_NAMESPACE,
    RELEASE,
    Cluster,
    OperatorProcess,
    clean_environment,
    missing_tools,
    tool_path,
)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private control plane for this session, named apart from a developer's own."""
    path = tool_path()
    missing = missing_tools(path)
    if missing:
        pytest.fail(
            f"the test Kubernetes control plane is not built (missing: {', '.join(missing)}): "
            "run hack/cluster/build.sh (CI does, in .ci/run)",
            pytrace=False,
        )
    directory = tmp_path_factory.mktemp("cluster")
    name = f"pytest-{os.getpid()}"
    env = {**clean_environment(), "RELAY_CLUSTER_NAME": name, "RELAY_CLUSTER_DIR": str(directory)}
    up = subprocess.run([str(HACK / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
    try:
        if up.returncode != 0:
            pytest.fail(f"hack/cluster/up.sh failed:\n{up.stderr[-3000:]}", pytrace=False)
        yield Cluster(directory, name, path, Path(up.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(
            [str(HACK / "down.sh")], env=env, capture_output=True, text=True, timeout=120
        )


@pytest.fixture(scope="session")
def installed(cluster: Cluster) -> Cluster:
    """The chart, installed by helm: CRDs, ServiceAccount, RBAC, peering object.

    Its Deployment is scaled to 0: the operator runs here as a local process instead
    (there is no image to run), under the chart's ServiceAccount.
    """
    cluster.run(
        "helm",
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        "replicaCount=0",
        "--set",
        "peering.lifetimeSeconds=10",
    )
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    return cluster


@pytest.fixture(scope="session")
def operator_process(
    installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    directory = tmp_path_factory.mktemp("operator")
    kubeconfig = installed.token_kubeconfig(RELEASE, OPERATOR_NAMESPACE, directory / "kubeconfig")
    process = OperatorProcess(installed, kubeconfig, directory)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def operator(operator_process: OperatorProcess) -> OperatorProcess:
    operator_process.ensure_running()
    return operator_process


@pytest.fixture
def namespace(installed: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """One namespace per test, removed afterwards (without waiting for it to go)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(2)}"
    installed.kubectl("create", "namespace", name)
    yield name
    installed.kubectl("delete", "namespace", name, "--wait=false", check=False)
