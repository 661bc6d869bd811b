"""What each provider type needs from its credentials Secret, and whether a Secret has it.

Pure functions over the RelayProvider spec and the Secret's key names: the Secret's values
are never looked at here (only that a key is present and not empty), never logged, and
never written into a status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay_operator.models import RelayProviderSpec


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one RelayProvider."""

    ready: bool
    reason: str
    message: str


def required_keys(spec: RelayProviderSpec) -> tuple[str, ...]:
    """Keys the credentials Secret must hold for this provider (empty: no Secret needed)."""
    if spec.type == "smtp":
        return ("password",) if spec.credentials is not None else ()
    if spec.type == "gmail":
        assert spec.gmail is not None
        if spec.gmail.credentials_kind == "serviceAccount":
            return ("key.json",)
        return ("client_id", "client_secret", "refresh_token")
    if spec.type == "mailgun":
        return ("api_key",)
    return ()


def spec_problem(spec: RelayProviderSpec) -> str | None:
    """What the API server's CEL rules already refuse, checked again for older CRDs."""
    if spec.type in ("smtp", "gmail", "mailgun") and getattr(spec, spec.type) is None:
        return f"spec.{spec.type} is required for type {spec.type}"
    if spec.type in ("gmail", "mailgun") and spec.credentials is None:
        return f"spec.credentials.secretRef is required for type {spec.type}"
    if spec.type == "smtp" and spec.smtp and spec.smtp.username and spec.credentials is None:
        return "spec.credentials.secretRef is required when spec.smtp.username is set"
    return None


def validate(spec: RelayProviderSpec, secret: dict[str, Any] | None) -> Verdict:
    """Judge a provider from its spec and its credentials Secret (None: not found)."""
    problem = spec_problem(spec)
    if problem is not None:
        return Verdict(False, "InvalidSpec", problem)
    keys = required_keys(spec)
    if not keys:
        return Verdict(True, "NoCredentialsNeeded", f"type {spec.type} needs no credentials")
    assert spec.credentials is not None
    name = spec.credentials.secret_ref.name
    if secret is None:
        return Verdict(
            False,
            "SecretNotFound",
            f"spec.credentials.secretRef.name: Secret {name!r} not found in this namespace",
        )
    data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
    missing = [key for key in keys if not data.get(key)]
    if missing:
        return Verdict(
            False,
            "SecretKeyMissing",
            f"spec.credentials.secretRef.name: Secret {name!r} lacks "
            f"{', '.join(repr(k) for k in missing)} (type {spec.type} needs "
            f"{', '.join(keys)})",
        )
    return Verdict(True, "CredentialsPresent", f"Secret {name!r} holds {', '.join(keys)}")
