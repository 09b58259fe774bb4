"""Settings from the environment, their errors, and URL masking."""

from __future__ import annotations

import pytest

from drm_taskiq import SettingsError
from drm_taskiq.settings import load_settings, mask_url


def test_spec_names_and_prefixed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIS_URL, DATABASE_URL, WORKER_CONCURRENCY keep their names; the rest are DRM_."""
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/1")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("WORKER_CONCURRENCY", "7")
    monkeypatch.setenv("DRM_PLUGINS", "a.b:c, d.e:f")
    monkeypatch.setenv("DRM_MAX_PAYLOAD_BYTES", "2048")
    settings = load_settings()
    assert settings.redis_url == "redis://r:6379/1"
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.worker_concurrency == 7
    assert settings.plugins == ("a.b:c", "d.e:f")
    assert settings.max_payload_bytes == 2048


def test_defaults() -> None:
    """The payload limit defaults to 1 MiB and the job timeout to 5 minutes."""
    settings = load_settings()
    assert settings.max_payload_bytes == 1024 * 1024
    assert settings.default_timeout_ms == 300_000


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_CONCURRENCY", "abc"),
        ("WORKER_CONCURRENCY", "0"),
        ("REDIS_URL", "http://x"),
        ("DATABASE_URL", "mysql://x"),
        ("DRM_LOG_FORMAT", "xml"),
        ("DRM_PLUGINS", "nocolon"),
        ("DRM_KEY_PREFIX", "bad prefix{"),
    ],
)
def test_invalid_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """An invalid value raises SettingsError naming the environment variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_mask_url_hides_passwords() -> None:
    """Passwords in URLs are replaced by ***."""
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("postgresql://user:pw@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert mask_url("redis://host:6379") == "redis://host:6379"


def test_invalid_url_error_does_not_leak_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settings error about a URL does not print the password."""
    monkeypatch.setenv("DATABASE_URL", "mysql://user:topsecret@h/db")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "topsecret" not in str(caught.value)
