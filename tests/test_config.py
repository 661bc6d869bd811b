from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from relay.config import ConfigError, Settings, load_settings


def test_embedded_defaults_need_no_file_and_no_credentials() -> None:
    settings = load_settings(None)
    assert settings.queue.backend == "sqlite"
    assert settings.smtp.port == 2525 and settings.smtp.host == "127.0.0.1"
    assert settings.http.port == 8080
    assert settings.delivery.providers == ["outbox"]
    # Runbook 7.2 tuning.
    assert (settings.delivery.worker_count, settings.delivery.batch_size) == (10, 50)
    assert settings.delivery.process_interval == timedelta(seconds=10)
    assert settings.delivery.max_age == timedelta(days=5)


def test_runbook_style_durations_are_understood(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("delivery:\n  process_interval: 10s\n  max_age: 2d\n  lease: 1.5m\n")
    settings = load_settings(path)
    assert settings.delivery.process_interval == timedelta(seconds=10)
    assert settings.delivery.max_age == timedelta(days=2)
    assert settings.delivery.lease == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("delivery:\n  worker_count: -1\n", "delivery.worker_count"),
        ("delivery:\n  process_interval: soon\n", "delivery.process_interval"),
        ("smtp:\n  prot: 25\n", "smtp.prot"),
        ("queue:\n  backend: postgres\n", "queue.backend"),
        ("delivery:\n  providers: [nowhere]\n", "nowhere"),
        ("providers:\n  relay1:\n    type: smtp\n", "providers.relay1.host:"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, yaml_text: str, named: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert named in str(caught.value)
    assert str(path) in str(caught.value)


def test_environment_overrides_the_file_one_key_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("delivery:\n  worker_count: 3\n  batch_size: 7\n")
    monkeypatch.setenv("RELAY_DELIVERY__WORKER_COUNT", "5")
    settings = load_settings(path)
    assert settings.delivery.worker_count == 5
    assert settings.delivery.batch_size == 7


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SMTP__PORT", "seventy")
    with pytest.raises(ConfigError, match="RELAY_SMTP__PORT"):
        load_settings(None)


def test_unreadable_or_invalid_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("delivery: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)


def test_secrets_do_not_appear_in_errors_or_reprs(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("queue:\n  mysql:\n    password: s3cret-db-pass\n    port: not-a-port\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "s3cret-db-pass" not in str(caught.value)
    settings = Settings(queue={"mysql": {"password": "s3cret-db-pass"}})
    assert "s3cret-db-pass" not in repr(settings)
    assert settings.queue.mysql.resolved_password() == "s3cret-db-pass"


def test_password_file_is_read_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-a-secret\n")
    settings = Settings(queue={"mysql": {"password_file": str(secret)}})
    assert settings.queue.mysql.resolved_password() == "from-a-secret"


def _leaf_keys(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{prefix}{name}.")
        elif name not in ("providers",) or prefix:
            keys.append(prefix + name)
    return keys


def test_the_readme_documents_every_setting() -> None:
    from relay import config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key in _leaf_keys(Settings) if f"`{key}`" not in readme]
    for provider_model in (
        config.OutboxProviderSettings,
        config.SmtpProviderSettings,
        config.GmailProviderSettings,
        config.MailgunProviderSettings,
    ):
        missing += [
            f"providers.<name>.{key}"
            for key in _leaf_keys(provider_model)
            if f"`providers.<name>.{key}`" not in readme
        ]
    assert not missing, f"README.md configuration table lacks {missing}"


def test_a_provider_key_is_named_as_it_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic's own path holds the provider type too ("providers.smarthost.smtp.port"),
    # which no file key or variable has: setting that variable would fail on its own.
    monkeypatch.setenv("RELAY_PROVIDERS__SMARTHOST__TYPE", "smtp")
    monkeypatch.setenv("RELAY_PROVIDERS__SMARTHOST__HOST", "127.0.0.1")
    monkeypatch.setenv("RELAY_PROVIDERS__SMARTHOST__PORT", "not-a-port")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "providers.smarthost.port:" in str(caught.value)
    assert "(or environment RELAY_PROVIDERS__SMARTHOST__PORT)" in str(caught.value)
