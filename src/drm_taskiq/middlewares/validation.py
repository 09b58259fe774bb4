"""Refuse bad input before anything reaches Redis (client side, ``pre_send``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from taskiq import TaskiqMessage, TaskiqMiddleware

from drm_taskiq.errors import InvalidInputError, UnknownTenantError
from drm_taskiq.options import (
    LABEL_ATTEMPTS,
    LABEL_DELAY,
    LABEL_JOB,
    LABEL_PLUGIN,
    LABEL_PRIORITY,
    LABEL_TENANT,
    LABEL_TIMEOUT,
    MAX_PRIORITY,
    check_id,
    check_job_id,
    encode_payload,
)
from drm_taskiq.settings import Settings

# (tenant_id, plugin_id) -> True (enabled), False (disabled), None (no such tenant)
TenantLookup = Callable[[str, str], Awaitable[bool | None]]


class TenantGate:
    """Answers "may this tenant run this plugin?" with a short-lived cache."""

    def __init__(self, lookup: TenantLookup, ttl_s: float = 5.0) -> None:
        self._lookup = lookup
        self._ttl = ttl_s
        self._cache: dict[tuple[str, str], tuple[float, bool | None]] = {}

    async def check(self, tenant_id: str, plugin_id: str) -> bool | None:
        """True when enabled, False when disabled, None when the tenant does not exist."""
        key = (tenant_id, plugin_id)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            value = await self._lookup(tenant_id, plugin_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if hit is None:
                raise
            return hit[1]  # PostgreSQL is away: keep the last answer rather than refuse work
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now, value)
        return value

    def forget(self) -> None:
        """Drop the cache (tests, and after tenants change)."""
        self._cache.clear()


def _int_label(labels: dict[str, Any], key: str, low: int, high: int) -> None:
    if key not in labels:
        return
    try:
        value = int(str(labels[key]))
    except ValueError:
        raise InvalidInputError(f"options.{key}", "must be an integer") from None
    if not low <= value <= high:
        raise InvalidInputError(f"options.{key}", f"must be between {low} and {high}")


class ValidationMiddleware(TaskiqMiddleware):
    """Checks every plugin job message: ids, tenant, payload, option ranges."""

    def __init__(self, settings: Settings, gate: TenantGate | None) -> None:
        super().__init__()
        self.settings = settings
        self.gate = gate

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Raise :class:`InvalidInputError` naming the field; set identity labels."""
        check_job_id(message.task_id, "job_id")
        if not message.task_name.startswith("plugin:"):
            return message
        _, plugin_id, job_name = message.task_name.split(":", 2)
        tenant_id = message.kwargs.get("tenant_id")
        check_id(tenant_id, "tenant_id")
        unknown = set(message.kwargs) - {"tenant_id", "data"}
        if unknown or len(message.args) > 1:
            raise InvalidInputError("kiq", "takes (data, tenant_id=...) only; got extra arguments")
        data = message.args[0] if message.args else message.kwargs.get("data")
        encode_payload(data, self.settings.max_payload_bytes)
        labels = message.labels
        _int_label(labels, LABEL_PRIORITY, 0, MAX_PRIORITY)
        _int_label(labels, LABEL_ATTEMPTS, 1, self.settings.max_attempts)
        _int_label(labels, LABEL_DELAY, 0, 365 * 24 * 3600 * 1000)
        if LABEL_TIMEOUT in labels:
            try:
                timeout_s = float(str(labels[LABEL_TIMEOUT]))
            except ValueError:
                raise InvalidInputError("options.timeout", "must be a number") from None
            if not 0 < timeout_s * 1000 <= self.settings.max_timeout_ms:
                raise InvalidInputError(
                    "options.timeout",
                    f"must be between 1 and {self.settings.max_timeout_ms} ms",
                )
        if self.gate is not None:
            assert isinstance(tenant_id, str)
            enabled = await self.gate.check(tenant_id, plugin_id)
            if enabled is None:
                raise UnknownTenantError("tenant_id", f"tenant {tenant_id!r} does not exist")
            if not enabled:
                raise UnknownTenantError(
                    "tenant_id", f"plugin {plugin_id!r} is not enabled for tenant {tenant_id!r}"
                )
        labels[LABEL_TENANT] = tenant_id
        labels[LABEL_PLUGIN] = plugin_id
        labels[LABEL_JOB] = job_name
        return message
