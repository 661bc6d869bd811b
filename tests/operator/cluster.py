"""The real test control plane (hack/cluster) and the operator run against it as a process.

Nothing here fakes the Kubernetes API: the cluster is kube-apiserver, etcd,
kube-controller-manager (so the garbage collector and the Deployment controller run),
kube-scheduler and kwok, which plays the kubelet. The operator authenticates with the
token of the ServiceAccount the Helm chart creates, so every test also proves the chart's
RBAC is enough.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HACK = REPO / "hack" / "cluster"
CHART = REPO / "charts" / "smtp-relay-operator"
EXAMPLES = REPO / "examples"

OPERATOR_NAMESPACE = "smtp-relay-system"
RELEASE = "smtp-relay-operator"  # the chart's full name is then the release name
TOOLS = (
    *("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd"),
    *("helm", "kwok", "kwokctl"),
)


def tool_path() -> str:
    """The PATH entries hack/cluster/lib.sh names, without building anything."""
    script = f'source {HACK / "lib.sh"} && echo "$RELAY_TOOLS_PATH"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def missing_tools(path: str) -> list[str]:
    dirs = [Path(p) for p in path.split(":") if p]
    return [t for t in TOOLS if not any(os.access(d / t, os.X_OK) for d in dirs)]


def clean_environment() -> dict[str, str]:
    # A developer's RELAY_* settings (their own cluster's name) and kubeconfig must not leak
    # in; where the tools were built (RELAY_TOOLS_*) must.
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("RELAY_TOOLS_") or not k.startswith(("RELAY_", "KUBE"))
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(check: Callable[[], Any], *, timeout: float = 60, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; the last value explains a timeout."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: last saw {value!r}")


@dataclass
class Cluster:
    """kubectl and helm against the session's cluster, as admin unless told otherwise."""

    directory: Path
    name: str
    path: str
    kubeconfig: Path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        return {
            **clean_environment(),
            "PATH": f"{self.path}:{os.environ.get('PATH', '')}",
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "KUBECACHEDIR": str(self.directory / "kube-cache"),
            "HELM_CACHE_HOME": str(self.directory / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.directory / "helm-config"),
            "HELM_DATA_HOME": str(self.directory / "helm-data"),
        }

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, parsed; None when it does not exist."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def apply(self, namespace: str, *documents: dict[str, Any] | Path) -> None:
        texts = [d.read_text() if isinstance(d, Path) else yaml.safe_dump(d) for d in documents]
        self.kubectl("apply", "-n", namespace, "-f", "-", stdin="\n---\n".join(texts))

    def token_kubeconfig(self, service_account: str, namespace: str, path: Path) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount, by a bound token."""
        token = self.kubectl(
            "create", "token", service_account, "-n", namespace, "--duration=2h"
        ).stdout.strip()
        admin = json.loads(self.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
        cluster = admin["clusters"][0]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "operator",
                    "context": {"cluster": cluster["name"], "user": service_account},
                }
            ],
            "current-context": "operator",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


@dataclass
class OperatorProcess:
    """`smtp-relay-operator run`, started and stopped by the tests."""

    cluster: Cluster
    kubeconfig: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    # What runs the operator; bench/operator.py wraps it to count its API requests.
    command: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "relay_operator", "run"]
    )

    @property
    def log(self) -> Path:
        return self.log_dir / f"operator-{self.runs}.log"

    def start(self, **settings: str) -> None:
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        port = free_port()
        env = {
            **self.cluster.env(self.kubeconfig),
            "RELAY_OPERATOR_PEERING": RELEASE,
            "RELAY_OPERATOR_PEERING_LIFETIME_S": "10",
            "RELAY_OPERATOR_RESYNC_INTERVAL_S": "2",
            "RELAY_OPERATOR_LOG_FORMAT": "text",
            "RELAY_OPERATOR_RELAY_IMAGE": "smtp-relay:test",
            # kwok pods have no network: smoke tests reach a relay on 127.0.0.1 instead,
            # on the ports each test's SmtpRelay gives its Service.
            "RELAY_OPERATOR_SERVICE_HOST_OVERRIDE": "127.0.0.1",
            "RELAY_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{port}/healthz",
            **self.env,
            **{f"RELAY_OPERATOR_{k.upper()}": v for k, v in settings.items()},
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
            )
        eventually(lambda: self._alive(port), timeout=30, what=f"operator liveness, {self.log}")

    def _alive(self, port: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"operator exited {self.process.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to the peering object, no clean-up, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
