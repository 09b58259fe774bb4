"""Process settings, read from the environment (and an optional ``.env`` file).

The three names the specification uses keep their names (``REDIS_URL``, ``DATABASE_URL``,
``WORKER_CONCURRENCY``); everything else is ``DRM_``-prefixed. ``config/example.env`` documents
every variable.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from drm_taskiq.errors import SettingsError

_ED25519_PUBLIC_KEY_BYTES = 32


class Settings(BaseSettings):
    """All settings of a drm-taskiq process."""

    model_config = SettingsConfigDict(
        env_prefix="DRM_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
    )
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/test",
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
    )
    worker_concurrency: int = Field(
        default=32,
        ge=1,
        le=10_000,
        validation_alias=AliasChoices("WORKER_CONCURRENCY", "worker_concurrency"),
    )
    db_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    key_prefix: str = Field(default="drm", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    queue: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    plugins: Annotated[tuple[str, ...], NoDecode] = ()
    entry_points: bool = True
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1, le=512 * 1024 * 1024)
    default_timeout_ms: int = Field(default=300_000, ge=1)
    max_timeout_ms: int = Field(default=24 * 3600 * 1000, ge=1)
    max_attempts: int = Field(default=100, ge=1)
    lease_ms: int = Field(default=30_000, ge=1000)
    stalled_interval_ms: int = Field(default=5_000, ge=100)
    max_stalled_count: int = Field(default=1, ge=0)
    take_batch: int = Field(default=32, ge=1, le=1000)
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    redis_outage_limit_s: float = Field(default=60.0, gt=0)
    retention_s: int = Field(default=0, ge=0)
    dedup_ttl_s: int = Field(default=86_400, ge=1)
    ledger_batch: int = Field(default=500, ge=1, le=10_000)
    ledger_flush_ms: int = Field(default=1000, ge=1)
    schedule_poll_s: float = Field(default=1.0, gt=0)
    plugin_sync_s: float = Field(default=10.0, ge=0)
    migrate_on_start: bool = True
    trusted_keys: Annotated[tuple[str, ...], NoDecode] = ()
    allow_unsigned_plugins: bool = False
    ledger_claim_idle_ms: int = Field(default=30_000, ge=100)
    ledger_in_worker: bool = True
    ledger_in_scheduler: bool = True
    job_retention_days: int = Field(default=30, ge=1)
    breaker_threshold: int = Field(default=10, ge=0)
    tenant_enqueue_rate: int = Field(default=0, ge=0)
    max_schedules_per_tenant: int = Field(default=100, ge=1)
    tenant_concurrency: int = Field(default=0, ge=0)
    plugin_database_url: str | None = None

    def plugin_dsn(self) -> str:
        """Where plugin code connects: ``DRM_PLUGIN_DATABASE_URL``, or ``DATABASE_URL`` with the
        user replaced by the row-level-security role ``drm_plugin`` (and no password)."""
        if self.plugin_database_url:
            return self.plugin_database_url
        parts = urlsplit(self.database_url)
        host = parts.hostname or ""
        netloc = "drm_plugin@" + host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("plugins")
    @classmethod
    def _check_plugins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            module, _, attribute = item.partition(":")
            if not module or not attribute:
                raise ValueError(f"{item!r} must look like 'package.module:attribute'")
        return value

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_trusted_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("trusted_keys")
    @classmethod
    def _check_trusted_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number, item in enumerate(value, start=1):
            try:
                raw = base64.b64decode(item, validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) != _ED25519_PUBLIC_KEY_BYTES:  # the value is not echoed: it may be a secret
                raise ValueError(
                    f"key {number} is not the base64 of a 32-byte Ed25519 public key"
                    " (`drm-taskiq plugins keygen` prints one)"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"postgres", "postgresql"}:
            raise ValueError("must start with postgresql:// or postgres://")
        return value


_ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "database_url": "DATABASE_URL",
    "worker_concurrency": "WORKER_CONCURRENCY",
}


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (pydantic may report the field or its alias)."""
    if field.upper() in _ENV_NAMES.values():
        return field.upper()
    return _ENV_NAMES.get(field, f"DRM_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise :class:`SettingsError` naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{env_name(field)}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
