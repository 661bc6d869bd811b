"""Builders: spec in, manifests out, no cluster. relay.yaml is loaded by the relay itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from relay_operator import builders
from relay_operator.builders import Provider, Relay
from relay_operator.models import RelayProviderSpec, SmtpRelaySpec

from relay.config import GmailProviderSettings, MailgunProviderSettings, load_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str, kind: str) -> dict[str, Any]:
    documents = yaml.safe_load_all((EXAMPLES / name).read_text())
    return next(d for d in documents if d["kind"] == kind)


def relay_from(name: str) -> Relay:
    obj = _example(name, "SmtpRelay")
    spec = SmtpRelaySpec.model_validate(obj["spec"])
    return Relay(obj["metadata"]["name"], "clinic", "uid-1", spec)


def provider_from(name: str) -> Provider:
    obj = _example(name, "RelayProvider")
    return Provider(obj["metadata"]["name"], RelayProviderSpec.model_validate(obj["spec"]))


PRODUCTION = relay_from("smtprelay-production.yaml")
PROVIDERS = [provider_from("relayprovider-gmail.yaml"), provider_from("relayprovider-mailgun.yaml")]
EMBEDDED = relay_from("smtprelay-embedded.yaml")
OUTBOX = [provider_from("relayprovider-outbox.yaml")]


def load_as_the_relay_would(
    relay: Relay, providers: list[Provider], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Write relay.yaml, set the environment the Deployment sets, load with relay.config."""
    path = tmp_path / "relay.yaml"
    path.write_text(builders.render_config(relay, providers))
    manifest = deployment(relay, providers)
    for variable in manifest["spec"]["template"]["spec"]["containers"][0]["env"]:
        monkeypatch.setenv(variable["name"], "client-id-from-the-secret")
    return load_settings(path)


def deployment(relay: Relay, providers: list[Provider], **versions: str) -> dict[str, Any]:
    return builders.deployment(
        relay, providers, image="smtp-relay:1", config_hash="c0ffee", secret_versions=versions
    )


def test_production_config_loads_in_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_as_the_relay_would(PRODUCTION, PROVIDERS, tmp_path, monkeypatch)
    assert settings.smtp.host == "0.0.0.0" and settings.smtp.port == builders.SMTP_PORT
    assert settings.http.host == "0.0.0.0" and settings.http.port == builders.HTTP_PORT
    assert settings.delivery.providers == ["gmail", "mailgun"]
    assert settings.queue.backend == "mysql"
    assert str(settings.queue.mysql.password_file) == "/etc/smtp-relay/secrets/queue/password"
    gmail = settings.providers["gmail"]
    assert isinstance(gmail, GmailProviderSettings)
    assert gmail.client_id == "client-id-from-the-secret"
    assert str(gmail.refresh_token_file).startswith("/etc/smtp-relay/secrets/providers/gmail/")
    mailgun = settings.providers["mailgun"]
    assert isinstance(mailgun, MailgunProviderSettings) and mailgun.region == "eu"
    assert [str(n) for n in settings.smtp.trusted_networks] == ["10.20.0.0/16"]
    assert settings.smtp.processes == 2
    assert settings.http.admin_tokens[0].token_file is not None


def test_delivery_processes_reach_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = _example("smtprelay-production.yaml", "SmtpRelay")
    obj["spec"]["delivery"]["processes"] = 2
    relay = Relay("relay", "clinic", "uid-1", SmtpRelaySpec.model_validate(obj["spec"]))
    settings = load_as_the_relay_would(relay, PROVIDERS, tmp_path, monkeypatch)
    assert settings.delivery.processes == 2
    assert settings.process_count == 2
    # The relay splits the spec's totals itself: the config carries them whole.
    assert settings.delivery.worker_count == obj["spec"]["delivery"]["workerCount"]


def test_embedded_config_loads_in_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_as_the_relay_would(EMBEDDED, OUTBOX, tmp_path, monkeypatch)
    assert settings.queue.backend == "sqlite"
    assert str(settings.queue.sqlite.path).startswith(builders.DATA_DIR)
    assert settings.delivery.providers == ["outbox"]


@pytest.mark.parametrize(
    "spec",
    [
        {
            "type": "smtp",
            "smtp": {"host": "smtp.example.org", "username": "u"},
            "credentials": {"secretRef": {"name": "s"}},
        },
        {"type": "smtp", "smtp": {"host": "mx.internal", "tls": "none"}},
        {
            "type": "gmail",
            "gmail": {"user": "a@clinic.example", "credentialsKind": "serviceAccount"},
            "credentials": {"secretRef": {"name": "sa"}},
        },
    ],
    ids=["smtp-auth", "smtp-plain", "gmail-service-account"],
)
def test_every_provider_type_renders_a_loadable_config(
    spec: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = Provider("p", RelayProviderSpec.model_validate(spec))
    settings = load_as_the_relay_would(EMBEDDED, [provider], tmp_path, monkeypatch)
    assert settings.providers["p"].type == spec["type"]


def test_secrets_are_files_never_config(tmp_path: Path) -> None:
    text = builders.render_config(PRODUCTION, PROVIDERS)
    settings = yaml.safe_load(text)
    flat = yaml.safe_dump(settings)
    # Only *_file settings point at credentials; no inline credential key is ever written.
    for key in ("password:", "api_key:", "client_secret:", "refresh_token:", "token:"):
        assert f" {key}" not in flat.replace("_file:", "")
    manifest = deployment(PRODUCTION, PROVIDERS)
    pod = manifest["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for file in re.findall(r"(/etc/smtp-relay/secrets/\S+)", text):
        directory, key = file.rsplit("/", 1)
        volume = volumes[mounts[directory]]
        assert {"key": key, "path": key} in volume["secret"]["items"]
        assert volume["secret"]["defaultMode"] == 0o440
    env = pod["containers"][0]["env"]
    assert env == [
        {
            "name": "RELAY_PROVIDERS__GMAIL__CLIENT_ID",
            "valueFrom": {"secretKeyRef": {"name": "gmail-credentials", "key": "client_id"}},
        }
    ]


def test_deployment_runs_the_relay_as_specified() -> None:
    manifest = deployment(PRODUCTION, PROVIDERS)
    assert manifest["spec"]["replicas"] == 3
    assert manifest["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["smtp-relay", "--config", builders.CONFIG_FILE, "serve"]
    assert {p["containerPort"] for p in container["ports"]} == {2525, 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    # shutdown_grace, the preStop pause before SIGTERM, and a margin before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] == 25 + builders.PRE_STOP_S + 15
    lifecycle = pod["containers"][0]["lifecycle"]
    assert lifecycle == {"preStop": {"sleep": {"seconds": builders.PRE_STOP_S}}}
    annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    assert annotations[builders.CONFIG_HASH] == "c0ffee"


def test_sqlite_relay_is_recreated_not_surged() -> None:
    manifest = deployment(EMBEDDED, OUTBOX)
    assert manifest["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    spec = SmtpRelaySpec.model_validate(
        {"providers": ["outbox"], "queue": {"sqlite": {"claimName": "relay-queue"}}}
    )
    relay = Relay("embedded", "clinic", "uid", spec)
    pod = deployment(relay, OUTBOX)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "relay-queue"}


def test_secret_version_change_changes_the_pod_template() -> None:
    before = deployment(PRODUCTION, PROVIDERS, **{"relay-db": "u/1"})
    after = deployment(PRODUCTION, PROVIDERS, **{"relay-db": "u/2"})
    key = builders.SECRETS_HASH
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != (after["spec"]["template"]["metadata"]["annotations"][key])
    )


def test_config_change_changes_the_hash() -> None:
    changed = Relay(
        PRODUCTION.name,
        "clinic",
        "uid-1",
        PRODUCTION.spec.model_copy(
            update={"delivery": PRODUCTION.spec.delivery.model_copy(update={"worker_count": 20})}
        ),
    )
    assert builders.digest(builders.render_config(PRODUCTION, PROVIDERS)) != builders.digest(
        builders.render_config(changed, PROVIDERS)
    )


def test_children_are_owned_labelled_and_selected_alike() -> None:
    children = [
        builders.config_map(PRODUCTION, PROVIDERS),
        deployment(PRODUCTION, PROVIDERS),
        builders.service(PRODUCTION),
        builders.disruption_budget(PRODUCTION),
    ]
    for child in children:
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["kind"] == "SmtpRelay" and owner["uid"] == "uid-1" and owner["controller"]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "smtp-relay-operator"
    selector = builders.selector_labels(PRODUCTION)
    assert children[1]["spec"]["selector"]["matchLabels"] == selector
    assert children[2]["spec"]["selector"] == selector
    assert children[3]["spec"]["selector"]["matchLabels"] == selector
    assert [p["targetPort"] for p in children[2]["spec"]["ports"]] == ["smtp", "http"]
    assert children[3]["spec"]["maxUnavailable"] == 1


def test_volume_names_are_dns_labels_for_long_secret_names() -> None:
    provider = Provider(
        "p",
        RelayProviderSpec.model_validate(
            {
                "type": "mailgun",
                "mailgun": {"domain": "mg.example"},
                "credentials": {"secretRef": {"name": "x" * 200}},
            }
        ),
    )
    for use in builders.secret_uses(EMBEDDED, [provider]):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", use.volume)
        assert len(use.volume) <= 63


# ---------------------------------------------------------------------------------------
# Rollout strategies
# ---------------------------------------------------------------------------------------


def _template(relay: Relay, image: str = "smtp-relay:1") -> dict[str, Any]:
    config = builders.config_map(relay, PROVIDERS, per_revision=True)
    return builders.pod_template(
        relay,
        PROVIDERS,
        image=image,
        config_hash=builders.digest(config["data"]["relay.yaml"]),
        secret_versions={},
        config_map=config["metadata"]["name"],
    )


def test_revision_config_map_is_immutable_and_named_by_its_content() -> None:
    config = builders.config_map(PRODUCTION, PROVIDERS, per_revision=True)
    digest = builders.digest(config["data"]["relay.yaml"])
    assert config["immutable"] is True
    assert config["metadata"]["name"] == f"{PRODUCTION.name}-config-{digest[:10]}"
    template = _template(PRODUCTION)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]


def test_revision_names_the_pod_template() -> None:
    one, same, other = _template(PRODUCTION), _template(PRODUCTION), _template(PRODUCTION, "x:2")
    assert builders.revision_of(one) == builders.revision_of(same)
    assert builders.revision_of(one) != builders.revision_of(other)
    assert re.fullmatch("[0-9a-f]{10}", builders.revision_of(one))


def test_colour_deployment_selects_its_colour_and_labels_the_revision() -> None:
    template = _template(PRODUCTION)
    manifest = builders.colour_deployment(
        PRODUCTION, colour="green", revision="abc", template=template, replicas=3
    )
    assert manifest["metadata"]["name"] == f"{PRODUCTION.name}-green"
    assert manifest["spec"]["replicas"] == 3
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector[builders.COLOUR] == "green" and builders.REVISION not in selector
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert labels[builders.COLOUR] == "green" and labels[builders.REVISION] == "abc"
    # The template handed in is not changed (it is also the stored revision).
    assert builders.COLOUR not in template["metadata"]["labels"]


def test_services_select_a_colour_or_all_pods() -> None:
    blue = builders.service(PRODUCTION, "blue")["spec"]["selector"]
    everyone = builders.service(PRODUCTION)["spec"]["selector"]
    assert blue == {**everyone, builders.COLOUR: "blue"}
    preview = builders.preview_service(PRODUCTION, "green")
    assert preview["metadata"]["name"] == f"{PRODUCTION.name}-preview"
    assert preview["spec"]["selector"][builders.COLOUR] == "green"
    assert preview["spec"]["type"] == "ClusterIP"


def test_controller_revision_keeps_the_template() -> None:
    template = _template(PRODUCTION)
    stored = builders.controller_revision(PRODUCTION, revision="abc", number=4, template=template)
    assert stored["kind"] == "ControllerRevision" and stored["revision"] == 4
    assert stored["data"]["template"] == template
    assert stored["metadata"]["labels"][builders.REVISION] == "abc"
    assert stored["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
