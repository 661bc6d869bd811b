"""Pure functions from an SmtpRelay (and its providers) to the manifests that run it.

Everything returns plain dicts, ready for server-side apply, and nothing here talks to the
cluster, so all of it is tested without one. Credentials never pass through these
functions: only Secret *names* and keys do. They reach the pods as mounted files that the
relay's `*_file` settings point at (or, for Gmail's OAuth client id, which the relay
takes inline only, an environment variable filled from the Secret by the kubelet).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from relay_operator.kube import FIELD_MANAGER
from relay_operator.models import API_VERSION, GROUP, RelayProviderSpec, SmtpRelaySpec
from relay_operator.providers import required_keys

CONFIG_DIR = "/etc/smtp-relay"
CONFIG_FILE = f"{CONFIG_DIR}/relay.yaml"
SECRETS_DIR = f"{CONFIG_DIR}/secrets"
DATA_DIR = "/var/lib/smtp-relay"
SMTP_PORT = 2525
HTTP_PORT = 8080
RELAY_UID = 10001

LABEL_RELAY = f"{GROUP}/relay"
CONFIG_HASH = f"{GROUP}/config-hash"
SECRETS_HASH = f"{GROUP}/secrets-hash"
SECRET_VERSIONS = f"{GROUP}/secret-versions"
COLOUR = f"{GROUP}/colour"
REVISION = f"{GROUP}/revision"
# preStop: kube-proxy and endpoint controllers need a moment to take a terminating pod
# out of the Service; sessions opened in that moment still get a normal relay.
PRE_STOP_S = 5


@dataclass(frozen=True)
class Relay:
    """One SmtpRelay object: identity and parsed spec."""

    name: str
    namespace: str
    uid: str
    spec: SmtpRelaySpec


@dataclass(frozen=True)
class Provider:
    """One RelayProvider the relay delivers through, in priority order."""

    name: str
    spec: RelayProviderSpec


@dataclass(frozen=True)
class SecretUse:
    """A Secret a relay pod needs: which field names it, which keys, where they go."""

    field: str
    secret: str
    keys: tuple[str, ...]
    directory: str | None  # mounted here as files; None: environment only

    @property
    def volume(self) -> str:
        # Volume names are DNS labels (63 characters); Secret names may be longer.
        digest = hashlib.sha256(f"{self.field}/{self.secret}".encode()).hexdigest()[:10]
        return f"secret-{digest}"


def selector_labels(relay: Relay) -> dict[str, str]:
    return {"app.kubernetes.io/name": "smtp-relay", "app.kubernetes.io/instance": relay.name}


def labels(relay: Relay) -> dict[str, str]:
    return {
        **selector_labels(relay),
        "app.kubernetes.io/component": "relay",
        "app.kubernetes.io/part-of": "smtp-relay",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        LABEL_RELAY: relay.name,
    }


def owner_reference(relay: Relay) -> dict[str, Any]:
    # controller + blockOwnerDeletion: the garbage collector deletes the children with the
    # SmtpRelay (no finalizer needed), and foreground deletion waits for them.
    return {
        "apiVersion": API_VERSION,
        "kind": "SmtpRelay",
        "name": relay.name,
        "uid": relay.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(relay: Relay, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": relay.namespace,
        "labels": labels(relay),
        "ownerReferences": [owner_reference(relay)],
        **extra,
    }


def config_map_name(relay: Relay, config_hash: str | None = None) -> str:
    """`<name>-config`; with a strategy, one immutable ConfigMap per configuration."""
    return f"{relay.name}-config-{config_hash[:10]}" if config_hash else f"{relay.name}-config"


# ---------------------------------------------------------------------------------------
# Secrets: where each one is mounted and which relay setting reads it
# ---------------------------------------------------------------------------------------


def provider_directory(provider: Provider) -> str:
    return f"{SECRETS_DIR}/providers/{provider.name}"


def secret_uses(relay: Relay, providers: Sequence[Provider]) -> list[SecretUse]:
    """Every Secret the relay's pods need, in a stable order."""
    spec = relay.spec
    uses: list[SecretUse] = []
    if spec.queue.backend == "mysql" and spec.queue.mysql is not None:
        ref = spec.queue.mysql.password_secret_ref
        uses.append(
            SecretUse(
                "spec.queue.mysql.passwordSecretRef", ref.name, (ref.key,), f"{SECRETS_DIR}/queue"
            )
        )
    if spec.smtp.tls_secret_name:
        uses.append(
            SecretUse(
                "spec.smtp.tlsSecretName",
                spec.smtp.tls_secret_name,
                ("tls.crt", "tls.key"),
                f"{SECRETS_DIR}/tls",
            )
        )
    for index, token in enumerate(spec.http.admin_tokens):
        ref = token.secret_key_ref
        uses.append(
            SecretUse(
                f"spec.http.adminTokens[{index}].secretKeyRef",
                ref.name,
                (ref.key,),
                f"{SECRETS_DIR}/admin-tokens/{token.name}",
            )
        )
    for provider in providers:
        keys = required_keys(provider.spec)
        if keys and provider.spec.credentials is not None:
            mounted = tuple(k for k in keys if k != "client_id")
            uses.append(
                SecretUse(
                    f"RelayProvider {provider.name}: spec.credentials.secretRef",
                    provider.spec.credentials.secret_ref.name,
                    keys,
                    provider_directory(provider) if mounted else None,
                )
            )
    return uses


def _volume(use: SecretUse) -> dict[str, Any]:
    files = [{"key": k, "path": k} for k in use.keys if k != "client_id"]
    # 0440 with the pod's fsGroup: readable by the relay's group, by nobody else.
    return {
        "name": use.volume,
        "secret": {"secretName": use.secret, "items": files, "defaultMode": 0o440},
    }


def client_id_variable(provider: Provider) -> str:
    """The relay reads `providers.<name>.client_id` from this variable (relay/config.py)."""
    return f"RELAY_PROVIDERS__{provider.name.upper()}__CLIENT_ID"


# ---------------------------------------------------------------------------------------
# relay.yaml
# ---------------------------------------------------------------------------------------


def _provider_settings(provider: Provider) -> dict[str, Any]:
    spec, name = provider.spec, provider.name
    directory = provider_directory(provider)
    if spec.type == "smtp":
        assert spec.smtp is not None
        smtp = spec.smtp
        settings: dict[str, Any] = {
            "type": "smtp",
            "host": smtp.host,
            "port": smtp.port,
            "tls": smtp.tls,
            "verify_certificate": smtp.verify_certificate,
            "timeout": smtp.timeout,
        }
        if smtp.username:
            settings["username"] = smtp.username
        if spec.credentials is not None:
            settings["password_file"] = f"{directory}/password"
        return settings
    if spec.type == "gmail":
        assert spec.gmail is not None
        gmail = spec.gmail
        settings = {"type": "gmail", "user": gmail.user, "timeout": gmail.timeout}
        if gmail.credentials_kind == "serviceAccount":
            settings["credentials"] = "service_account"
            settings["service_account_key_file"] = f"{directory}/key.json"
        else:
            # client_id comes from the environment (client_id_variable): the relay has no
            # file setting for it, and the Secret's content never enters a ConfigMap.
            settings["credentials"] = "refresh_token"
            settings["client_secret_file"] = f"{directory}/client_secret"
            settings["refresh_token_file"] = f"{directory}/refresh_token"
        return settings
    if spec.type == "mailgun":
        assert spec.mailgun is not None
        return {
            "type": "mailgun",
            "domain": spec.mailgun.domain,
            "region": spec.mailgun.region,
            "timeout": spec.mailgun.timeout,
            "api_key_file": f"{directory}/api_key",
        }
    return {"type": "outbox", "directory": f"{DATA_DIR}/outbox/{name}"}


def relay_config(relay: Relay, providers: Sequence[Provider]) -> dict[str, Any]:
    """The relay's configuration, in the format relay.config.Settings reads."""
    spec = relay.spec
    smtp: dict[str, Any] = {
        # The pod is the network boundary here; who may relay is trusted_networks/AUTH.
        "host": "0.0.0.0",  # noqa: S104
        "port": SMTP_PORT,
        "max_message_size": spec.smtp.max_message_size,
        "max_recipients": spec.smtp.max_recipients,
        "trusted_networks": list(spec.smtp.trusted_networks),
        "processes": spec.smtp.processes,
    }
    if spec.smtp.hostname:
        smtp["hostname"] = spec.smtp.hostname
    if spec.smtp.tls_secret_name:
        smtp["tls"] = {
            "cert_file": f"{SECRETS_DIR}/tls/tls.crt",
            "key_file": f"{SECRETS_DIR}/tls/tls.key",
        }
    http: dict[str, Any] = {"host": "0.0.0.0", "port": HTTP_PORT}  # noqa: S104
    if spec.http.admin_tokens:
        http["admin_tokens"] = [
            {
                "name": t.name,
                "token_file": f"{SECRETS_DIR}/admin-tokens/{t.name}/{t.secret_key_ref.key}",
            }
            for t in spec.http.admin_tokens
        ]
    queue: dict[str, Any] = {"backend": spec.queue.backend}
    if spec.queue.backend == "mysql":
        assert spec.queue.mysql is not None
        mysql = spec.queue.mysql
        queue["mysql"] = {
            "host": mysql.host,
            "port": mysql.port,
            "database": mysql.database,
            "user": mysql.user,
            "password_file": f"{SECRETS_DIR}/queue/{mysql.password_secret_ref.key}",
            "max_connections": mysql.max_connections,
        }
    else:
        queue["sqlite"] = {"path": f"{DATA_DIR}/queue/relay.db"}
    return {
        "smtp": smtp,
        "http": http,
        "queue": queue,
        "delivery": {
            "providers": [p.name for p in providers],
            "worker_count": spec.delivery.worker_count,
            "batch_size": spec.delivery.batch_size,
            "processes": spec.delivery.processes,
            "process_interval": spec.delivery.process_interval,
            "shutdown_grace": spec.delivery.shutdown_grace,
        },
        "providers": {p.name: _provider_settings(p) for p in providers},
        "log": {"level": spec.log.level, "format": spec.log.format},
    }


def render_config(relay: Relay, providers: Sequence[Provider]) -> str:
    return yaml.safe_dump(relay_config(relay, providers), sort_keys=False)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def secrets_digest(versions: Mapping[str, str]) -> str:
    """Hash of the referenced Secrets' identities and versions: changes when one does.

    Built from uid and resourceVersion, never from the data, so the annotation reveals
    nothing about a credential (a bare hash of a short password could be brute-forced).
    """
    return digest("\n".join(f"{name}={versions[name]}" for name in sorted(versions)))


# ---------------------------------------------------------------------------------------
# The children
# ---------------------------------------------------------------------------------------


def config_map(
    relay: Relay, providers: Sequence[Provider], *, per_revision: bool = False
) -> dict[str, Any]:
    """relay.yaml. Per revision (strategies): named by its hash and immutable, so each
    colour keeps the configuration it was tested with while the other changes."""
    text = render_config(relay, providers)
    if not per_revision:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(relay, config_map_name(relay)),
            "data": {"relay.yaml": text},
        }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(relay, config_map_name(relay, digest(text))),
        "data": {"relay.yaml": text},
        "immutable": True,
    }


def _duration_s(value: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    number = value.rstrip("smhd")
    return int(float(number) * units[value[len(number) :]])


def pod_template(
    relay: Relay,
    providers: Sequence[Provider],
    *,
    image: str,
    config_hash: str,
    secret_versions: Mapping[str, str],
    config_map: str | None = None,
) -> dict[str, Any]:
    """The relay pod: everything a revision is, apart from the colour it runs in."""
    spec = relay.spec
    uses = secret_uses(relay, providers)
    sqlite = spec.queue.backend == "sqlite"
    queue_volume: dict[str, Any] = {"name": "data"}
    if sqlite and spec.queue.sqlite and spec.queue.sqlite.claim_name:
        queue_volume["persistentVolumeClaim"] = {"claimName": spec.queue.sqlite.claim_name}
    else:
        queue_volume["emptyDir"] = {}
    volumes = [
        {"name": "config", "configMap": {"name": config_map or config_map_name(relay)}},
        queue_volume,
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        *(_volume(u) for u in uses if u.directory),
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "data", "mountPath": DATA_DIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        *(
            {"name": u.volume, "mountPath": u.directory, "readOnly": True}
            for u in uses
            if u.directory
        ),
    ]
    env = [
        {
            "name": client_id_variable(p),
            "valueFrom": {
                "secretKeyRef": {"name": p.spec.credentials.secret_ref.name, "key": "client_id"}
            },
        }
        for p in providers
        if p.spec.type == "gmail"
        and p.spec.gmail is not None
        and p.spec.gmail.credentials_kind == "refreshToken"
        and p.spec.credentials is not None
    ]
    probe = {"periodSeconds": 10, "timeoutSeconds": 3}
    container = {
        "name": "smtp-relay",
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["smtp-relay", "--config", CONFIG_FILE, "serve"],
        "ports": [
            {"name": "smtp", "containerPort": SMTP_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "initialDelaySeconds": 10,
            "failureThreshold": 3,
            **probe,
        },
        # /readyz fails while draining or in maintenance, which takes the pod out of the
        # Service: the drain the runbook's maintenance procedure needs (6.1).
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "failureThreshold": 2,
            **probe,
        },
        "resources": spec.resources.model_dump(mode="json", by_alias=True, exclude_none=True),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
        # On SIGTERM the relay answers 421 to new sessions, finishes open transactions and
        # claimed deliveries within shutdown_grace, then exits; the pause first lets the
        # endpoints drop the pod so that few sessions meet the 421 at all.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_S}}},
    }
    grace_s = _duration_s(spec.delivery.shutdown_grace) + PRE_STOP_S + 15
    return {
        "metadata": {
            "labels": labels(relay),
            "annotations": {
                CONFIG_HASH: config_hash,
                SECRETS_HASH: secrets_digest(secret_versions),
            },
        },
        "spec": {
            # The relay never talks to the Kubernetes API.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace_s,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RELAY_UID,
                "runAsGroup": RELAY_UID,
                "fsGroup": RELAY_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        },
    }


def deployment(
    relay: Relay,
    providers: Sequence[Provider],
    *,
    image: str,
    config_hash: str,
    secret_versions: Mapping[str, str],
) -> dict[str, Any]:
    spec = relay.spec
    sqlite = spec.queue.backend == "sqlite"
    template = pod_template(
        relay, providers, image=image, config_hash=config_hash, secret_versions=secret_versions
    )
    # SQLite: one writer, and a ReadWriteOnce claim cannot follow a surge pod to another
    # node, so the old pod must be gone before the new one starts. MySQL: surge one pod
    # and never go below the wanted count, so capacity holds during a rollout.
    strategy: dict[str, Any] = (
        {"type": "Recreate"}
        if sqlite
        else {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            relay,
            relay.name,
            annotations={SECRET_VERSIONS: json.dumps(dict(secret_versions), sort_keys=True)},
        ),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector_labels(relay)},
            "strategy": strategy,
            "template": template,
        },
    }


def service(relay: Relay, colour: str | None = None) -> dict[str, Any]:
    """The relay's Service; with a colour (blue-green), only that colour's pods."""
    spec = relay.spec.service
    selector = selector_labels(relay)
    if colour is not None:
        selector[COLOUR] = colour
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(relay, relay.name, annotations=dict(spec.annotations)),
        "spec": {
            "type": spec.type,
            "selector": selector,
            "ports": [
                {"name": "smtp", "port": spec.smtp_port, "targetPort": "smtp", "protocol": "TCP"},
                {"name": "http", "port": spec.http_port, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def disruption_budget(relay: Relay) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(relay, relay.name),
        "spec": {
            "maxUnavailable": relay.spec.disruption.max_unavailable,
            "selector": {"matchLabels": selector_labels(relay)},
        },
    }


# ---------------------------------------------------------------------------------------
# Rollout strategies: a Deployment per colour, revisions, the preview Service
# ---------------------------------------------------------------------------------------


def revision_of(template: Mapping[str, Any]) -> str:
    """A revision's name: the hash of its pod template (image, configuration, Secrets)."""
    return digest(json.dumps(template, sort_keys=True, separators=(",", ":")))[:10]


def colour_name(relay: Relay, colour: str) -> str:
    return f"{relay.name}-{colour}"


def preview_name(relay: Relay) -> str:
    strategy = relay.spec.strategy
    named = strategy.blue_green.preview_service if strategy and strategy.blue_green else None
    return named or f"{relay.name}-preview"


def revision_name(relay: Relay, revision: str) -> str:
    return f"{relay.name}-{revision}"


def controller_revision(
    relay: Relay, *, revision: str, number: int, template: Mapping[str, Any]
) -> dict[str, Any]:
    """The pod template of one revision, kept so that a rollback can bring it back.

    apps/v1 ControllerRevision is the object StatefulSets and DaemonSets keep their
    history in; `kubectl get controllerrevisions` lists ours the same way.
    """
    meta = _metadata(relay, revision_name(relay, revision))
    meta["labels"] = {**meta["labels"], REVISION: revision}
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": meta,
        "revision": number,
        "data": {"template": template},
    }


def colour_deployment(
    relay: Relay, *, colour: str, revision: str, template: Mapping[str, Any], replicas: int
) -> dict[str, Any]:
    """One colour's Deployment running `revision`."""
    pods = json.loads(json.dumps(template))
    pods["metadata"]["labels"] = {**pods["metadata"]["labels"], COLOUR: colour, REVISION: revision}
    meta = _metadata(relay, colour_name(relay, colour))
    meta["labels"] = {**meta["labels"], COLOUR: colour, REVISION: revision}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {**selector_labels(relay), COLOUR: colour}},
            # Within a colour a template never changes while it takes traffic: a new
            # revision goes to the idle colour. Surge keeps capacity when one does.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": pods,
        },
    }


def preview_service(relay: Relay, colour: str) -> dict[str, Any]:
    """The candidate's own Service: the smoke test goes through it, before any traffic."""
    spec = relay.spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(relay, preview_name(relay)),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(relay), COLOUR: colour},
            "ports": [
                {"name": "smtp", "port": spec.smtp_port, "targetPort": "smtp", "protocol": "TCP"},
                {"name": "http", "port": spec.http_port, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }
