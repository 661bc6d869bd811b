"""End to end on the real control plane, the operator running under the chart's account.

One namespace per test. The operator process is shared by the session, except where a
test restarts it on purpose.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from relay_operator import builders

from relay.config import load_settings
from tests.operator.cluster import (
    CHART,
    EXAMPLES,
    OPERATOR_NAMESPACE,
    RELEASE,
    Cluster,
    OperatorProcess,
    eventually,
)

pytestmark = pytest.mark.cluster

KINDS = "configmap,deployment,service,poddisruptionbudget"


def _condition(obj: dict[str, Any] | None, kind: str) -> tuple[str, str, str] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == kind:
            return c["status"], c["reason"], c["message"]
    return None


def wait_ready(cluster: Cluster, namespace: str, resource: str, timeout: int = 60) -> None:
    result = cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        resource,
        f"--timeout={timeout}s",
        check=False,
    )
    if result.returncode != 0:
        state = cluster.get("-n", namespace, resource)
        raise AssertionError(f"{resource} not Ready: {result.stderr}\n{json.dumps(state)[:3000]}")


def embedded_relay(cluster: Cluster, namespace: str) -> None:
    """The example relay with its outbox provider, applied and Ready."""
    cluster.apply(
        namespace, EXAMPLES / "relayprovider-outbox.yaml", EXAMPLES / "smtprelay-embedded.yaml"
    )
    wait_ready(cluster, namespace, "smtprelay/embedded")


def _secret(name: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": values}


def events(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, str, str]]:
    found = cluster.get(
        "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )
    return [(e["type"], e["reason"], e["message"]) for e in found["items"]]


def test_crds_are_documented_for_kubectl_explain(installed: Cluster) -> None:
    # The API server publishes a new CRD's OpenAPI document a moment after it is Established.
    explained = eventually(
        lambda: installed.kubectl("explain", "smtprelay.spec.queue.mysql", check=False).stdout,
        timeout=30,
        what="kubectl explain to know the CRD",
    )
    assert "passwordSecretRef" in explained and "never copied" in explained
    explained = installed.kubectl("explain", "backuppolicy.spec.retentionDays").stdout
    assert "Default: 30" in explained
    short = installed.kubectl("get", "smr,rpv,mw,bkp", "-A").returncode
    assert short == 0


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        (
            {
                "kind": "BackupPolicy",
                "spec": {
                    "relayRef": {"name": "r"},
                    "schedule": "0 0 2 * * *",
                    "destination": {"s3": {"bucket": "bkt", "credentialsSecretRef": {"name": "s"}}},
                },
            },
            "spec.schedule",
            "five-field cron",
        ),
        (
            {
                "kind": "MaintenanceWindow",
                "spec": {"schedule": "*/5 * * * * *", "relaySelector": {"matchLabels": {"a": "b"}}},
            },
            "spec.schedule",
            "five-field cron",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "replicas": -1}},
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "imagePullPolicy": "Sometimes"}},
            "spec.imagePullPolicy",
            "Unsupported value",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "replicas": 3}},
            "spec.replicas",
            "sqlite",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "queue": {"backend": "mysql"}}},
            "spec.queue",
            "spec.queue.mysql is required",
        ),
        (
            {
                "kind": "RelayProvider",
                "spec": {"type": "mailgun", "mailgun": {"domain": "m.example"}},
            },
            "spec",
            "spec.credentials.secretRef is required",
        ),
        ({"kind": "RelayProvider", "spec": {"type": "pigeon"}}, "spec.type", "Unsupported value"),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "strategy": {"type": "Canary"}}},
            "spec.strategy",
            "needs spec.queue.backend mysql",
        ),
        (
            {
                "kind": "SmtpRelay",
                "spec": {
                    "providers": ["p"],
                    "strategy": {"type": "Canary", "canary": {"stepWeight": 60, "maxWeight": 50}},
                },
            },
            "spec.strategy.canary",
            "stepWeight must not exceed maxWeight",
        ),
        (
            {
                "kind": "SmtpRelay",
                "spec": {
                    "providers": ["p"],
                    "strategy": {"type": "BlueGreen", "canary": {"stepWeight": 20}},
                },
            },
            "spec.strategy.canary",
            "only read with type Canary",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "smtp": {"processes": 2}}},
            "spec.smtp.processes",
            "needs spec.queue.backend mysql",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "smtp": {"processes": 0}}},
            "spec.smtp.processes",
            "greater than or equal to 1",
        ),
        (
            {"kind": "SmtpRelay", "spec": {"providers": ["p"], "delivery": {"processes": 3}}},
            "spec.delivery.processes",
            "needs spec.queue.backend mysql",
        ),
    ],
    ids=[
        "six-field-cron",
        "seconds-cron",
        "negative-replicas",
        "bad-enum",
        "sqlite-replicas",
        "mysql-without-server",
        "provider-without-secret-ref",
        "unknown-provider-type",
        "strategy-with-sqlite",
        "canary-step-above-max",
        "canary-settings-on-blue-green",
        "processes-with-sqlite",
        "no-processes",
        "delivery-processes-with-sqlite",
    ],
)
def test_invalid_resources_are_refused_naming_the_field(
    installed: Cluster, namespace: str, document: dict[str, Any], field: str, words: str
) -> None:
    document = {
        "apiVersion": "relay.smtp-relay.dev/v1alpha1",
        "metadata": {"name": "bad"},
        **document,
    }
    result = installed.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(document), check=False
    )
    assert result.returncode != 0, "the API server accepted an invalid resource"
    assert f"{field}:" in result.stderr and words in result.stderr, result.stderr


def test_embedded_relay_comes_up_with_the_right_children(
    operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster = operator.cluster
    cluster.apply(
        namespace, EXAMPLES / "relayprovider-outbox.yaml", EXAMPLES / "smtprelay-embedded.yaml"
    )
    wait_ready(cluster, namespace, "relayprovider/outbox")
    wait_ready(cluster, namespace, "smtprelay/embedded")

    relay = cluster.get("-n", namespace, "smtprelay/embedded")
    uid = relay["metadata"]["uid"]
    assert relay["status"]["observedGeneration"] == relay["metadata"]["generation"]
    assert relay["status"]["readyReplicas"] == 1
    children = cluster.get("-n", namespace, KINDS, "-l", "app.kubernetes.io/instance=embedded")
    assert sorted(c["kind"] for c in children["items"]) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ]
    for child in children["items"]:
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("SmtpRelay", uid, True)

    config = cluster.get("-n", namespace, "configmap/embedded-config")
    (tmp_path / "relay.yaml").write_text(config["data"]["relay.yaml"])
    settings = load_settings(tmp_path / "relay.yaml")
    assert settings.delivery.providers == ["outbox"] and settings.smtp.port == 2525

    deployment = cluster.get("-n", namespace, "deployment/embedded")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["smtp-relay", "--config", builders.CONFIG_FILE, "serve"]
    assert container["image"] == "smtp-relay:test"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    service = cluster.get("-n", namespace, "service/embedded")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"smtp": 2525, "http": 8080}
    pods = cluster.get("-n", namespace, "pods", "-l", "app.kubernetes.io/instance=embedded")
    assert [p["status"]["phase"] for p in pods["items"]] == ["Running"]

    reasons = {r for _, r, _ in events(cluster, namespace, "embedded")}
    assert {"Created", "PodsAvailable", "EphemeralQueue"} <= reasons


def test_credentials_reach_pods_as_files_only_and_rotation_rolls(
    operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster = operator.cluster
    cluster.apply(
        namespace,
        EXAMPLES / "relayprovider-gmail.yaml",
        EXAMPLES / "relayprovider-mailgun.yaml",
        EXAMPLES / "smtprelay-production.yaml",
    )
    # Real-looking credentials, to search for everywhere they must not be.
    values = {key: f"secret-{secrets.token_hex(8)}" for key in ("cid", "cs", "rt", "mg", "db")}
    cluster.apply(
        namespace,
        _secret(
            "gmail-credentials",
            client_id=values["cid"],
            client_secret=values["cs"],
            refresh_token=values["rt"],
        ),
        _secret("mailgun-credentials", api_key=values["mg"]),
        _secret("relay-db", password=values["db"]),
    )
    wait_ready(cluster, namespace, "smtprelay/relay")

    def current_secrets() -> str:
        versions = {}
        for name in ("gmail-credentials", "mailgun-credentials", "relay-db", "relay-admin-token"):
            meta = cluster.get("-n", namespace, f"secret/{name}")["metadata"]
            versions[name] = f"{meta['uid']}/{meta['resourceVersion']}"
        return builders.secrets_digest(versions)

    def settled() -> bool:
        # Ready can come while later templates (the Secrets found after the first apply,
        # one resync apart) are still to roll out: wait for the status to describe the
        # Deployment, and the Deployment the Secrets as they are.
        deployment = cluster.get("-n", namespace, "deployment/relay") or {}
        template = deployment.get("spec", {}).get("template", {}).get("metadata", {})
        status = (cluster.get("-n", namespace, "smtprelay/relay") or {}).get("status", {})
        hashed = status.get("secretsHash")
        return (
            hashed == current_secrets()
            and hashed == (template.get("annotations") or {}).get(builders.SECRETS_HASH)
            and (_condition({"status": status}, "Progressing") or ("",))[:2]
            == (
                "False",
                "RolloutComplete",
            )
        )

    eventually(settled, timeout=30, what="the relay's status to describe its Deployment")
    old_hash = cluster.get("-n", namespace, "smtprelay/relay")["status"]["secretsHash"]
    selector = "app.kubernetes.io/instance=relay"
    old_sets = {
        r["metadata"]["name"]
        for r in cluster.get("-n", namespace, "replicasets", "-l", selector)["items"]
    }

    # Nothing the operator wrote holds a credential.
    written = cluster.kubectl(
        "get", "-n", namespace, f"{KINDS},smtprelays,relayproviders,events", "-o", "yaml"
    ).stdout
    for value in values.values():
        assert value not in written
        assert base64.b64encode(value.encode()).decode() not in written

    # The relay finds every credential at the path its *_file settings name.
    config = cluster.get("-n", namespace, "configmap/relay-config")["data"]["relay.yaml"]
    pod = cluster.get("-n", namespace, "deployment/relay")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("secret") for v in pod["volumes"]}
    for line in config.splitlines():
        if "_file:" in line:
            directory, key = line.split(":", 1)[1].strip().rsplit("/", 1)
            assert key in [i["key"] for i in volumes[mounts[directory]]["items"]], line
    (tmp_path / "relay.yaml").write_text(config)
    env = pod["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "gmail-credentials", "key": "client_id"}

    # Rotating a Secret rolls the pods (found by the periodic resync: no Secret watch).
    cluster.kubectl(
        "patch",
        "secret",
        "mailgun-credentials",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"stringData": {"api_key": "rotated-" + values["mg"]}}),
    )

    def rolled() -> bool:
        status = cluster.get("-n", namespace, "smtprelay/relay")["status"]
        return status["secretsHash"] != old_hash and _condition(
            {"status": status}, "Progressing"
        ) == ("False", "RolloutComplete", "3/3 pods available, 3 updated")

    eventually(rolled, timeout=30, what="the rotated Secret to roll the pods")
    new_sets = {
        r["metadata"]["name"]
        for r in cluster.get("-n", namespace, "replicasets", "-l", selector)["items"]
    }
    assert len(new_sets - old_sets) == 1
    assert any(r == "SecretChanged" for _, r, _ in events(cluster, namespace, "relay"))


def test_spec_change_rolls_the_pods(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    embedded_relay(cluster, namespace)
    before = cluster.get("-n", namespace, "deployment/embedded")
    old_hash = before["spec"]["template"]["metadata"]["annotations"][builders.CONFIG_HASH]

    cluster.kubectl(
        "patch",
        "smtprelay",
        "embedded",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"delivery": {"workerCount": 20}}}',
    )

    def rolled() -> Any:
        relay = cluster.get("-n", namespace, "smtprelay/embedded")
        status = relay["status"]
        done = _condition(relay, "Progressing")
        return (
            status["observedGeneration"] == 2
            and status["configHash"] != old_hash
            and done is not None
            and done[1] == "RolloutComplete"
            and _condition(relay, "Ready")
        )

    eventually(rolled, timeout=30, what="the new configuration to roll out")
    config = cluster.get("-n", namespace, "configmap/embedded-config")["data"]["relay.yaml"]
    assert yaml.safe_load(config)["delivery"]["worker_count"] == 20
    replica_sets = cluster.get(
        "-n", namespace, "replicasets", "-l", "app.kubernetes.io/instance=embedded"
    )
    assert len(replica_sets["items"]) == 2
    assert any(r == "ConfigChanged" for _, r, _ in events(cluster, namespace, "embedded"))


def test_missing_provider_secret_is_reported_then_healed(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    provider = yaml.safe_load_all((EXAMPLES / "relayprovider-mailgun.yaml").read_text())
    cluster.apply(namespace, *[d for d in provider if d["kind"] == "RelayProvider"])
    cluster.apply(
        namespace,
        {
            "apiVersion": "relay.smtp-relay.dev/v1alpha1",
            "kind": "SmtpRelay",
            "metadata": {"name": "waiting"},
            "spec": {"providers": ["mailgun"]},
        },
    )

    def reported() -> Any:
        found = _condition(cluster.get("-n", namespace, "relayprovider/mailgun"), "Ready")
        relay = _condition(cluster.get("-n", namespace, "smtprelay/waiting"), "Degraded")
        return (
            found
            and found[1] == "SecretNotFound"
            and relay
            and relay[0] == "True"
            and (found, relay)
        )

    provider_state, relay_state = eventually(reported, timeout=30, what="SecretNotFound")
    assert "spec.credentials.secretRef.name" in provider_state[2]
    assert "mailgun-credentials" in relay_state[2] and relay_state[1] == "SecretNotFound"
    # A broken configuration is never deployed.
    assert cluster.get("-n", namespace, "deployment/waiting") is None

    cluster.apply(namespace, _secret("mailgun-credentials", token="the wrong key"))
    eventually(
        lambda: (
            (
                _condition(cluster.get("-n", namespace, "relayprovider/mailgun"), "Ready")
                or ("", "", "")
            )[1]
            == "SecretKeyMissing"
        ),
        timeout=30,
        what="SecretKeyMissing",
    )
    cluster.apply(namespace, _secret("mailgun-credentials", api_key="k"))
    wait_ready(cluster, namespace, "relayprovider/mailgun", timeout=30)
    wait_ready(cluster, namespace, "smtprelay/waiting", timeout=30)


def test_the_resync_repairs_only_children_changed_outside(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    embedded_relay(cluster, namespace)

    def repaired() -> list[str]:
        return sorted(
            m for _, r, m in events(cluster, namespace, "embedded") if r == "DriftRepaired"
        )

    # Several resync passes (every 2 s here) over children nobody touched: each child
    # as stored matches what the last apply left, pods and status changes included.
    time.sleep(7)
    assert repaired() == []

    # Someone deletes the ConfigMap and relabels the Service.
    label = "app.kubernetes.io/managed-by"
    cluster.kubectl("delete", "-n", namespace, "configmap/embedded-config")
    cluster.kubectl("label", "-n", namespace, "service/embedded", f"{label}=someone", "--overwrite")

    eventually(
        lambda: cluster.get("-n", namespace, "configmap/embedded-config"),
        timeout=30,
        what="the ConfigMap back",
    )
    eventually(
        lambda: (
            cluster.get("-n", namespace, "service/embedded")["metadata"]["labels"][label]
            == builders.FIELD_MANAGER
        ),
        timeout=30,
        what="the Service's label back",
    )
    found = eventually(lambda: len(repaired()) == 2 and repaired(), timeout=30, what="Events")
    assert found == [
        "ConfigMap embedded-config was changed or deleted outside the operator: applied again",
        "Service embedded was changed or deleted outside the operator: applied again",
    ]
    # And quiet again: the repaired children match their new fingerprints.
    time.sleep(5)
    assert len(repaired()) == 2, repaired()

    # Someone renumbers the SMTP port. Ports are keyed by number: an apply alone would
    # add 2525 beside 2526 under the same name, and the API server would refuse it.
    cluster.kubectl(
        "patch", "-n", namespace, "service/embedded", "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/ports/0/port", "value": 2526}]',
    )  # fmt: skip

    def ports() -> dict[str, int]:
        service = cluster.get("-n", namespace, "service/embedded")
        return {p["name"]: p["port"] for p in service["spec"]["ports"]}

    eventually(lambda: ports() == {"smtp": 2525, "http": 8080}, timeout=30, what="the port")
    eventually(lambda: len(repaired()) == 3, timeout=30, what="the Event")
    assert f"resync of {namespace}/embedded failed" not in operator.log.read_text()
    wait_ready(cluster, namespace, "smtprelay/embedded")

    # The Deployment is watched: scaled or deleted by hand, it is put back at once, and
    # said so, not announced as a new relay.
    deployment = "Deployment embedded was changed or deleted outside the operator: applied again"
    cluster.kubectl("scale", "-n", namespace, "deployment/embedded", "--replicas=3")
    eventually(lambda: repaired().count(deployment) == 1, timeout=30, what="scale repaired")
    assert cluster.get("-n", namespace, "deployment/embedded")["spec"]["replicas"] == 1
    cluster.kubectl("delete", "-n", namespace, "deployment/embedded")
    eventually(lambda: repaired().count(deployment) == 2, timeout=30, what="deletion repaired")
    wait_ready(cluster, namespace, "smtprelay/embedded")
    created = [r for _, r, _ in events(cluster, namespace, "embedded") if r == "Created"]
    assert len(created) == 1, "the repair was announced as a new relay"


def test_a_child_the_api_server_refuses_is_reported_on_the_relay(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    cluster.kubectl("create", "quota", "no-services", "-n", namespace, "--hard=services=0")
    cluster.apply(
        namespace, EXAMPLES / "relayprovider-outbox.yaml", EXAMPLES / "smtprelay-embedded.yaml"
    )

    def refused() -> list[str]:
        return [m for _, r, m in events(cluster, namespace, "embedded") if r == "ApplyFailed"]

    [message, *_] = eventually(refused, timeout=30, what="ApplyFailed")
    assert message.startswith("Service embedded: 403 Forbidden:"), message
    assert "exceeded quota: no-services" in message

    cluster.kubectl("delete", "quota", "no-services", "-n", namespace)
    wait_ready(cluster, namespace, "smtprelay/embedded")


def test_deleting_a_relay_garbage_collects_its_children(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    embedded_relay(cluster, namespace)
    relay = cluster.get("-n", namespace, "smtprelay/embedded")
    assert not relay["metadata"].get("finalizers"), "no finalizer: nothing to clean up by hand"

    cluster.kubectl("delete", "smtprelay", "embedded", "-n", namespace, "--wait=true")
    selector = "app.kubernetes.io/instance=embedded"
    eventually(
        lambda: (
            not cluster.get("-n", namespace, f"{KINDS},replicasets,pods", "-l", selector)["items"]
        ),
        timeout=60,
        what="the garbage collector to delete the children",
    )


def test_operator_restarted_mid_reconcile_converges_without_duplicates(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    operator.stop()
    # Slow reconciles, so that the kill below lands between two children.
    operator.start(apply_pause_s="3")
    cluster.apply(
        namespace, EXAMPLES / "relayprovider-outbox.yaml", EXAMPLES / "smtprelay-embedded.yaml"
    )
    eventually(
        lambda: cluster.get("-n", namespace, "configmap/embedded-config"),
        timeout=30,
        what="the first child",
    )
    operator.kill()
    assert cluster.get("-n", namespace, "deployment/embedded") is None, (
        "the operator was not stopped mid-reconcile"
    )

    operator.start()
    wait_ready(cluster, namespace, "smtprelay/embedded")
    selector = "app.kubernetes.io/instance=embedded"
    children = cluster.get("-n", namespace, f"{KINDS},replicasets", "-l", selector)["items"]
    assert sorted(c["kind"] for c in children) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "ReplicaSet",
        "Service",
    ]
    created = [r for _, r, _ in events(cluster, namespace, "embedded") if r == "Created"]
    assert len(created) <= 1, "announced twice: the restart redid finished work"


def test_peering_keeps_a_second_replica_idle(
    operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster = operator.cluster
    second = OperatorProcess(cluster, operator.kubeconfig, tmp_path)
    second.start()
    try:
        peering = eventually(
            lambda: (
                len((cluster.get(f"clusterkopfpeering/{RELEASE}") or {}).get("status") or {}) >= 2
                and cluster.get(f"clusterkopfpeering/{RELEASE}")
            ),
            timeout=20,
            what="both replicas in the peering object",
        )
        priorities = sorted(p["priority"] for p in peering["status"].values())
        assert priorities[0] != priorities[1]
        # The newer replica outranks the older, which pauses.
        eventually(
            lambda: "Pausing operations" in operator.tail(400),
            timeout=20,
            what="the older replica to pause",
        )
        cluster.apply(namespace, EXAMPLES / "relayprovider-outbox.yaml")
        wait_ready(cluster, namespace, "relayprovider/outbox", timeout=30)
    finally:
        second.stop()
    # The survivor resumes once the newer one has said goodbye.
    eventually(
        lambda: "Resuming operations" in operator.tail(400),
        timeout=30,
        what="the older replica to resume",
    )


def test_chart_is_lint_clean_and_passes_a_server_side_dry_run(
    installed: Cluster, namespace: str
) -> None:
    lint = installed.run("helm", "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout and "[WARNING]" not in lint.stdout
    rendered = installed.run(
        "helm",
        "template",
        "dry",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "replicaCount=2",
    ).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    # No PrometheusRule or PodMonitor: the test cluster has no Prometheus Operator CRDs.
    assert kinds == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
        "Deployment",
        "ConfigMap",
    }
    installed.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
    refused = installed.run(
        "helm", "template", "x", str(CHART), "--set", "replicaCount=-1", check=False
    )
    assert refused.returncode != 0 and "replicaCount" in refused.stderr
    # The operator's account is what the chart grants, and no more than that.
    account = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
    for verb, resource, allowed in [
        ("get", "secrets", "yes"),
        ("list", "secrets", "no"),
        # Deleting: the Deployment from before spec.strategy, and old revisions.
        ("delete", "deployments", "yes"),
        ("delete", "controllerrevisions.apps", "yes"),
        ("delete", "secrets", "no"),
        ("delete", "pods", "no"),
        ("patch", "smtprelays.relay.smtp-relay.dev", "yes"),
        ("create", "backuppolicies.relay.smtp-relay.dev", "no"),
    ]:
        answer = installed.kubectl(
            "auth", "can-i", verb, resource, "--as", account, "-A", check=False
        ).stdout.strip()
        assert answer == allowed, f"{verb} {resource}: {answer}"
