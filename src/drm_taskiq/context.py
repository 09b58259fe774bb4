"""The context a plugin's code receives: its ids, a tenant-scoped database, the scheduler, logs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from drm_taskiq.hooks import HookRegistry
from drm_taskiq.options import check_id

if TYPE_CHECKING:
    from taskiq import TaskiqMessage

    from drm_taskiq.jobs import JobScheduler, TenantScheduler


# The message of the job this asyncio task runs (set by the worker before the handler runs; each
# job runs in an asyncio task of its own, so it never leaks into another job).
current_message: ContextVar[TaskiqMessage | None] = ContextVar("drm_current_message", default=None)


def tenant_signature(secret: bytes, tenant_id: str) -> str:
    """The signature ``drm_tenant()`` checks: sha256(secret || sha256(secret || tenant)), hex."""
    inner = hashlib.sha256(secret + tenant_id.encode("utf-8")).digest()
    return hashlib.sha256(secret + inner).hexdigest()


class TenantDatabase:
    """Database access for one tenant, as plugin code gets it (``ctx.db``).

    Connections log in as the role ``drm_plugin``, which row-level security binds to one tenant
    per transaction: each call runs in a transaction whose ``app.tenant_id`` is this tenant,
    signed with a secret the plugin role cannot read. Rows of other tenants are invisible and
    cannot be written, even by a query that forgets ``WHERE tenant_id = ...``.
    """

    def __init__(self, pool: asyncpg.Pool, tenant_id: str, secret: bytes) -> None:
        self._pool = pool
        self.tenant_id = tenant_id
        self._signature = tenant_signature(secret, tenant_id)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A connection inside a transaction bound to the tenant."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('app.tenant_id', $1, true),"
                " set_config('app.tenant_sig', $2, true)",
                self.tenant_id,
                self._signature,
            )
            yield conn

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement; returns its status."""
        async with self.connection() as conn:
            return str(await conn.execute(query, *args))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run a query; returns all rows."""
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """Run a query; returns the first row or None."""
        async with self.connection() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        """Run a query; returns the first column of the first row."""
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)


class PluginLogger:
    """The specification's logger: ``info(message, meta)`` and ``error(message, error, meta)``."""

    def __init__(self, plugin_id: str, tenant_id: str, **bound: Any) -> None:
        self._log = structlog.get_logger().bind(plugin_id=plugin_id, tenant_id=tenant_id, **bound)

    def info(self, message: str, meta: dict[str, Any] | None = None) -> None:
        """Log an informational event."""
        self._log.info("plugin_log", message=message, **(meta or {}))

    def error(
        self, message: str, error: BaseException | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        """Log an error event, with the exception when given."""
        self._log.error(
            "plugin_log",
            message=message,
            error=repr(error) if error is not None else None,
            **(meta or {}),
        )

    def bind(self, **values: Any) -> PluginLogger:
        """A logger with more fields bound."""
        child = PluginLogger.__new__(PluginLogger)
        child._log = self._log.bind(**values)
        return child


@dataclass
class PluginContext:
    """What a plugin's ``on_load``, ``on_unload`` and job handlers receive."""

    plugin_id: str
    tenant_id: str
    db: TenantDatabase
    scheduler: TenantScheduler
    hooks: HookRegistry
    logger: PluginLogger
    config: dict[str, Any] = field(default_factory=dict)


def create_plugin_context(
    plugin_id: str,
    tenant_id: str,
    *,
    scheduler: JobScheduler | None = None,
    config: dict[str, Any] | None = None,
) -> PluginContext:
    """Build the context of ``plugin_id`` for ``tenant_id``.

    Without ``scheduler``, the process-wide one (``get_scheduler()``) is used; it must be
    started, since the context's database handle uses its pool.
    """
    check_id(plugin_id, "plugin_id")
    check_id(tenant_id, "tenant_id")
    if scheduler is None:
        from drm_taskiq.jobs import get_scheduler  # noqa: PLC0415  (process-wide default)

        scheduler = get_scheduler()
    return PluginContext(
        plugin_id=plugin_id,
        tenant_id=tenant_id,
        db=TenantDatabase(scheduler.plugin_pool, tenant_id, scheduler.tenant_secret),
        scheduler=scheduler.for_plugin(plugin_id, tenant_id),
        hooks=scheduler.hooks,
        logger=PluginLogger(plugin_id, tenant_id),
        config=dict(config or {}),
    )
