"""``JobScheduler``: the specification's API for plugin jobs (register, remove, add, status)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from taskiq import TaskiqMessage
from taskiq.exceptions import SendTaskError

from drm_taskiq import redaction, schedules, store
from drm_taskiq.context import PluginContext, create_plugin_context, current_message
from drm_taskiq.errors import (
    DrmTaskiqError,
    InvalidInputError,
    LimitExceededError,
    UnknownJobError,
    UnknownTenantError,
    UnrecoverableError,
)
from drm_taskiq.hooks import HookRegistry
from drm_taskiq.options import (
    LABEL_DEDUP,
    LABEL_PRIORITY,
    LABEL_RUN_TIMEOUT,
    JobEvent,
    JobOptions,
    JobStatus,
    check_id,
    check_job_id,
    ms_to_datetime,
    task_name,
)
from drm_taskiq.plugins import Plugin, discover_plugins
from drm_taskiq.redis_queue import RedisQueue
from drm_taskiq.schedules import ScheduleInfo

if TYPE_CHECKING:
    from drm_taskiq.queue_broker import DrmBroker

log = structlog.get_logger()

CONFIG_CACHE_S = 5.0  # how long a tenant's plugin config is reused before re-reading it

JobHandler = Callable[[PluginContext, "Job"], Awaitable[Any]]
JobEventHandler = Callable[[PluginContext, JobEvent], Awaitable[Any]]


@dataclass(slots=True)
class Job:
    """The job a handler runs: its id, name, data and attempts made before this one."""

    id: str
    name: str
    data: Any
    attempts_made: int
    timestamp: datetime | None
    tenant_id: str
    _queue: RedisQueue

    async def update_progress(self, progress: Any) -> None:
        """Record progress (any JSON value); visible through ``get_job_status``."""
        await self._queue.set_progress(self.id, progress)


@dataclass(frozen=True, slots=True)
class JobDefinition:
    """A registered job."""

    plugin_id: str
    job_name: str
    handler: JobHandler
    options: JobOptions
    on_completed: JobEventHandler | None = None
    on_failed: JobEventHandler | None = None


class JobScheduler:
    """Registers plugin jobs as taskiq tasks and enqueues, inspects and schedules them."""

    def __init__(self, broker: DrmBroker, *, plugins: list[Plugin] | None = None) -> None:
        self.broker = broker
        self.hooks = HookRegistry()
        self.jobs: dict[tuple[str, str], JobDefinition] = {}
        self._plugins = plugins
        self.loaded_plugins: dict[str, Plugin] = {}
        self.plugin_load_errors: list[str] = []
        self._configs: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._contexts: dict[tuple[str, str], PluginContext] = {}
        self._loaded_for: set[tuple[str, str]] = set()  # (plugin, tenant) on_load was called for
        self._sync_task: asyncio.Task[None] | None = None
        self._synced_on_demand_at = float("-inf")
        self._sync_lock = asyncio.Lock()
        broker.task_appeared = self._task_appeared
        broker.on_job_event = self._run_job_event

    @property
    def pool(self) -> asyncpg.Pool:
        """The PostgreSQL pool (the scheduler must be started)."""
        if self.broker.pool is None:
            raise DrmTaskiqError("the scheduler is not started: await scheduler.start() first")
        return self.broker.pool

    @property
    def plugin_pool(self) -> asyncpg.Pool:
        """The pool plugin code uses (the row-level-security role)."""
        if self.broker.plugin_pool is None:
            raise DrmTaskiqError("the scheduler is not started: await scheduler.start() first")
        return self.broker.plugin_pool

    @property
    def tenant_secret(self) -> bytes:
        """The secret that signs tenant bindings of plugin transactions."""
        if self.broker.tenant_secret is None:
            raise DrmTaskiqError("the scheduler is not started: await scheduler.start() first")
        return self.broker.tenant_secret

    @property
    def settings(self) -> Any:
        return self.broker.settings

    async def start(self) -> None:
        """Start the broker (migrations, connections); plugins are loaded by its start-up."""
        await self.broker.startup()

    async def close(self) -> None:
        """Close every connection."""
        await self.stop_plugin_sync()
        await self.broker.shutdown()

    def job_context(self, plugin_id: str, tenant_id: str, config: dict[str, Any]) -> PluginContext:
        """A fresh context for one job run; the parts that only depend on (plugin, tenant)
        (database handle, tenant scheduler, logger) are built once and reused."""
        base = self._contexts.get((plugin_id, tenant_id))
        if base is None:
            base = create_plugin_context(plugin_id, tenant_id, scheduler=self)
            if len(self._contexts) > 10_000:
                self._contexts.clear()
            self._contexts[(plugin_id, tenant_id)] = base
        return replace(base, config=config)

    def for_tenant(self, tenant_id: str) -> TenantScheduler:
        """This scheduler, bound to one tenant (every plugin's jobs of that tenant)."""
        return TenantScheduler(self, check_id(tenant_id, "tenant_id"))

    def for_plugin(self, plugin_id: str, tenant_id: str) -> TenantScheduler:
        """This scheduler, bound to one tenant and one plugin: what ``ctx.scheduler`` is."""
        return TenantScheduler(
            self, check_id(tenant_id, "tenant_id"), check_id(plugin_id, "plugin_id")
        )

    # ------------------------------------------------------------------ plugins
    async def load_plugins(self) -> list[Plugin]:
        """Discover plugins and call ``on_load`` once per tenant that has each enabled."""
        settings = self.broker.settings
        plugins = self._plugins
        if plugins is None:
            plugins = discover_plugins(
                settings.plugins,
                use_entry_points=settings.entry_points,
                errors=self.plugin_load_errors,
                settings=settings,
            )
        for plugin in plugins:
            self.loaded_plugins[plugin.id] = plugin
            if plugin.schema and await store.apply_plugin_schema(
                self.pool, plugin.id, plugin.schema
            ):
                log.info("plugin_schema_applied", plugin_id=plugin.id)
            tenants = await store.fetch_enabled_tenants(self.pool, plugin.id)
            for tenant_id in tenants:
                self._loaded_for.add((plugin.id, tenant_id))
                await self._call_hook(plugin, tenant_id, "on_load")
            log.info(
                "plugin_loaded", plugin_id=plugin.id, version=plugin.version, tenants=len(tenants)
            )
        return plugins

    async def sync_plugins(self) -> int:
        """Call ``on_load`` for each loaded plugin and tenant that enabled it since this process
        loaded its plugins (or last synced): a plugin enabled for a tenant at run time gets its
        cron jobs and per-tenant set-up without a restart. Returns how many were loaded.
        A plugin a tenant disabled since (or a tenant deleted) is unloaded for that tenant:
        ``on_unload``, then its schedules there are removed (:meth:`unload_plugin`); enabled
        again, it is loaded again."""
        plugins = dict(self.loaded_plugins)
        if not plugins:
            return 0
        enabled = await store.fetch_enabled_pairs(self.pool, list(plugins))
        for pair in sorted(self._loaded_for - set(enabled)):
            plugin_id, tenant_id = pair
            self._loaded_for.discard(pair)
            self._configs.pop((tenant_id, plugin_id), None)
            await self.unload_plugin(plugin_id, tenant_id)
            log.info("plugin_disabled_unloaded", plugin_id=plugin_id, tenant_id=tenant_id)
        loaded = 0
        for pair in enabled:
            if pair in self._loaded_for:
                continue
            self._loaded_for.add(pair)
            plugin_id, tenant_id = pair
            self._configs.pop((tenant_id, plugin_id), None)  # a cached "not enabled"
            await self._call_hook(plugins[plugin_id], tenant_id, "on_load")
            log.info("plugin_enabled_loaded", plugin_id=plugin_id, tenant_id=tenant_id)
            loaded += 1
        return loaded

    async def _task_appeared(self, task_name: str) -> bool:
        """A job of ``task_name`` came and this process has not registered it: when it is a
        job of a plugin loaded here, a tenant may have enabled that plugin since the last
        sync; sync now. Whether the task is registered then."""
        parts = task_name.split(":", 2)
        if len(parts) != 3 or parts[0] != "plugin" or parts[1] not in self.loaded_plugins:
            return False
        async with self._sync_lock:  # a concurrent caller waits for the sync under way
            now = time.monotonic()
            if (
                self.broker.find_task(task_name) is None
                and now - self._synced_on_demand_at >= 1.0  # a stream of such jobs: 1 sync/s
            ):
                self._synced_on_demand_at = now
                await self.sync_plugins()
        return self.broker.find_task(task_name) is not None

    def start_plugin_sync(self) -> None:
        """Run :meth:`sync_plugins` every ``DRM_PLUGIN_SYNC_S`` in the background (workers and
        schedulers; 0 turns it off) until :meth:`stop_plugin_sync` or :meth:`close`."""
        interval = self.settings.plugin_sync_s
        if interval > 0 and self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_loop(interval), name="drm-plugins")

    async def stop_plugin_sync(self) -> None:
        task, self._sync_task = self._sync_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _sync_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync_plugins()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("plugin_sync_failed", error=f"{type(exc).__name__}: {exc}")

    async def unload_plugin(self, plugin_id: str, tenant_id: str) -> None:
        """Call the plugin's ``on_unload`` for one tenant and remove its schedules there."""
        plugin = self.loaded_plugins.get(plugin_id)
        if plugin is not None:
            await self._call_hook(plugin, tenant_id, "on_unload")
        await schedules.remove(self.pool, plugin_id, tenant_id=tenant_id)

    async def tenant_config(self, tenant_id: str, plugin_id: str) -> dict[str, Any] | None:
        """The plugin's configuration for the tenant (``tenant_plugins.config``), cached briefly;
        None when the tenant does not exist or does not have the plugin enabled."""
        key = (tenant_id, plugin_id)
        now = time.monotonic()
        hit = self._configs.get(key)
        if hit is not None and now - hit[0] < CONFIG_CACHE_S:
            return None if hit[1] is None else dict(hit[1])
        try:
            raw = await self.pool.fetchval(
                "SELECT config FROM tenant_plugins"
                " WHERE tenant_id = $1 AND plugin_id = $2 AND enabled",
                tenant_id,
                plugin_id,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if hit is None:
                raise
            # PostgreSQL is away: keep using what we knew rather than failing every job.
            log.warning("tenant_config_stale", tenant_id=tenant_id, error=repr(exc))
            return None if hit[1] is None else dict(hit[1])
        config = _stored_config(raw)
        if len(self._configs) > 10_000:
            self._configs.clear()
        self._configs[key] = (now, config)
        return None if config is None else dict(config)

    async def _unloading_config(self, tenant_id: str, plugin_id: str) -> dict[str, Any] | None:
        """The configuration ``on_unload`` gets: the tenant's row as it is, enabled or not (a
        plugin is mostly unloaded because a tenant disabled it); None when the row or the
        tenant is gone, or PostgreSQL cannot be reached."""
        try:
            raw = await self.pool.fetchval(
                "SELECT config FROM tenant_plugins WHERE tenant_id = $1 AND plugin_id = $2",
                tenant_id,
                plugin_id,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("tenant_config_unavailable", tenant_id=tenant_id, error=repr(exc))
            return None
        return _stored_config(raw)

    def forget_cached(self) -> None:
        """Drop cached tenant configs and tenant checks (they are otherwise reused for 5 s)."""
        self._configs.clear()
        if self.broker.gate is not None:
            self.broker.gate.forget()

    async def _call_hook(self, plugin: Plugin, tenant_id: str, hook: str) -> None:
        function = plugin.on_load if hook == "on_load" else plugin.on_unload
        if function is None:
            return
        if hook == "on_load":
            config = await self.tenant_config(tenant_id, plugin.id)
        else:
            config = await self._unloading_config(tenant_id, plugin.id)
        ctx = create_plugin_context(plugin.id, tenant_id, scheduler=self, config=config or {})
        try:
            await function(ctx)
        except Exception as exc:
            log.error(
                "plugin_hook_failed",
                hook=hook,
                plugin_id=plugin.id,
                tenant_id=tenant_id,
                error=repr(exc),
            )

    # ------------------------------------------------------------------ registration
    async def register_job(
        self,
        plugin_id: str,
        job_name: str,
        handler: JobHandler,
        options: JobOptions | Mapping[str, Any] | None = None,
        *,
        tenant_id: str | None = None,
        on_completed: JobEventHandler | None = None,
        on_failed: JobEventHandler | None = None,
    ) -> None:
        """Register ``handler`` as task ``plugin:{plugin_id}:{job_name}``; with ``cron``, also
        upsert the tenant's schedule (a cron job needs a tenant).

        ``on_completed(ctx, event)`` and ``on_failed(ctx, event)`` (a :class:`JobEvent`) run in
        the worker after an attempt's outcome is recorded: the job completed; an attempt failed
        (``event.state`` ``retrying`` when another is due, ``failed`` when it was the last),
        with the context of the job's tenant, as the handler's."""
        check_id(plugin_id, "plugin_id")
        check_id(job_name, "job_name")
        opts = JobOptions.coerce(options)
        if not inspect.iscoroutinefunction(handler):
            raise InvalidInputError(
                "handler",
                "must be an async function (async def handler(ctx, job)); synchronous handlers"
                " cannot be interrupted by the timeout",
            )
        for field_name, callback in (("on_completed", on_completed), ("on_failed", on_failed)):
            if callback is not None and not inspect.iscoroutinefunction(callback):
                raise InvalidInputError(
                    field_name, "must be an async function (async def callback(ctx, event))"
                )
        self._check_limits(opts)
        if opts.cron is not None and tenant_id is None:
            raise InvalidInputError("tenant_id", "a cron job needs a tenant (use ctx.scheduler)")
        if opts.cron is not None and tenant_id is not None:
            check_id(tenant_id, "tenant_id")
            if await store.tenant_plugin_enabled(self.pool, tenant_id, plugin_id) is None:
                raise UnknownTenantError("tenant_id", f"tenant {tenant_id!r} does not exist")
            await self._check_schedule_limit(tenant_id, plugin_id, job_name)
        name = task_name(plugin_id, job_name)
        self.jobs[(plugin_id, job_name)] = JobDefinition(
            plugin_id, job_name, handler, opts, on_completed, on_failed
        )
        if on_completed is not None or on_failed is not None:
            self.broker.event_tasks.add(name)
        else:
            self.broker.event_tasks.discard(name)
        self.broker.register_task(
            self._task_function(plugin_id, job_name),
            task_name=name,
            **opts.model_copy(update={"delay": 0}).labels(self.settings.default_timeout_ms),
        )
        if opts.cron is not None and tenant_id is not None:
            await schedules.upsert(self.pool, tenant_id, plugin_id, job_name, opts)
            log.info(
                "schedule_registered",
                plugin_id=plugin_id,
                tenant_id=tenant_id,
                job_name=job_name,
                cron=opts.cron,
                tz=opts.tz,
            )

    async def _check_schedule_limit(self, tenant_id: str, plugin_id: str, job_name: str) -> None:
        limit = self.settings.max_schedules_per_tenant
        others = await self.pool.fetchval(
            "SELECT count(*) FROM schedules WHERE tenant_id = $1"
            " AND (plugin_id, job_name) <> ($2, $3)",
            tenant_id,
            plugin_id,
            job_name,
        )
        if others >= limit:
            raise LimitExceededError(
                "options.cron",
                f"tenant {tenant_id!r} already has {others} schedules; the limit is {limit}"
                " (DRM_MAX_SCHEDULES_PER_TENANT)",
            )

    async def set_tenant_concurrency(self, tenant_id: str, limit: int | None) -> None:
        """At most ``limit`` jobs of the tenant run at once across all workers (None: back to
        ``DRM_TENANT_CONCURRENCY``; 0: no limit)."""
        check_id(tenant_id, "tenant_id")
        if limit is not None and limit < 0:
            raise InvalidInputError("limit", "must be 0 (no limit) or more")
        await self.broker.queue.set_tenant_limit(tenant_id, limit)

    # ------------------------------------------------------------------ circuit breaker
    async def paused_plugins(self, tenant_id: str | None = None) -> list[tuple[str, str]]:
        """(tenant, plugin) pairs whose schedules the circuit breaker paused."""
        pairs = await self.broker.queue.paused()
        return sorted(p for p in pairs if tenant_id is None or p[0] == tenant_id)

    async def resume_plugin(self, plugin_id: str, *, tenant_id: str) -> bool:
        """Resume a paused plugin's schedules for a tenant; True when it was paused."""
        check_id(plugin_id, "plugin_id")
        check_id(tenant_id, "tenant_id")
        resumed = await self.broker.queue.resume(tenant_id, plugin_id)
        if resumed:
            log.info("circuit_closed", tenant_id=tenant_id, plugin_id=plugin_id)
        return resumed

    def _check_limits(self, opts: JobOptions) -> None:
        settings = self.settings
        if opts.attempts > settings.max_attempts:
            raise InvalidInputError("options.attempts", f"must be at most {settings.max_attempts}")
        if opts.timeout is not None and opts.timeout > settings.max_timeout_ms:
            raise InvalidInputError(
                "options.timeout", f"must be at most {settings.max_timeout_ms} ms"
            )

    async def remove_job(
        self, plugin_id: str, job_name: str, *, tenant_id: str | None = None
    ) -> None:
        """Remove the tenant's schedule of this job; without a tenant, unregister the job."""
        check_id(plugin_id, "plugin_id")
        check_id(job_name, "job_name")
        if tenant_id is not None:
            check_id(tenant_id, "tenant_id")
            await schedules.remove(self.pool, plugin_id, job_name, tenant_id=tenant_id)
            return
        await schedules.remove(self.pool, plugin_id, job_name)
        self.jobs.pop((plugin_id, job_name), None)
        self.broker.local_task_registry.pop(task_name(plugin_id, job_name), None)
        self.broker.event_tasks.discard(task_name(plugin_id, job_name))

    async def list_schedules(self, tenant_id: str, *, count: int = 5) -> list[ScheduleInfo]:
        """The tenant's cron schedules with their next ``count`` fire times and last run."""
        check_id(tenant_id, "tenant_id")
        base = self.broker.queue.keys.base
        return await schedules.list_for_tenant(
            self.pool,
            self.broker.redis,
            tenant_id=tenant_id,
            lastjob_key=f"{base}:cron:lastjob",
            job_key=self.broker.queue.keys.job,
            count=count,
        )

    async def prune_schedules(self) -> list[str]:
        """Remove schedules of plugins that no longer exist or are disabled for their tenant.

        When a plugin failed to load in this process, schedules of unknown plugins are only
        reported (a broken deployment must not wipe schedules); disabled ones are still removed.
        """
        if self.plugin_load_errors:
            log.warning("schedule_prune_limited", plugin_load_errors=self.plugin_load_errors)
        return await schedules.prune(
            self.pool, set(self.loaded_plugins), delete_unknown=not self.plugin_load_errors
        )

    async def _run_job_event(self, event: JobEvent) -> None:
        """Run the job's ``on_completed`` or ``on_failed`` with the context of the job's tenant
        (its config read as for a job run); a failing callback is logged, nothing else."""
        definition = self.jobs.get((event.plugin_id, event.job_name))
        hook = "on_completed" if event.state == "completed" else "on_failed"
        callback = getattr(definition, hook, None)
        if callback is None:
            return
        try:
            config = await self.tenant_config(event.tenant_id, event.plugin_id)
            ctx = self.job_context(event.plugin_id, event.tenant_id, config or {})
            await callback(ctx, event)
        except Exception as exc:
            log.error(
                "job_event_handler_failed",
                hook=hook,
                job_id=event.job_id,
                plugin_id=event.plugin_id,
                tenant_id=event.tenant_id,
                error=redaction.redact(repr(exc)),
            )

    def _task_function(self, plugin_id: str, job_name: str) -> Callable[..., Awaitable[Any]]:
        scheduler = self

        async def run_plugin_job(
            data: Any = None,
            tenant_id: str = "",
        ) -> Any:
            # Set by LifecycleMiddleware.pre_execute (cheaper than taskiq's dependency injection).
            message = current_message.get()
            if message is None:
                raise RuntimeError("plugin jobs run in a drm-taskiq worker (DrmBroker)")
            # Moved from taskiq's own timeout label by LifecycleMiddleware.pre_execute.
            timeout = message.labels.get(LABEL_RUN_TIMEOUT)
            if timeout is None:
                return await run(message, data, tenant_id)
            async with asyncio.timeout(float(timeout)):
                return await run(message, data, tenant_id)

        async def run(message: TaskiqMessage, data: Any, tenant_id: str) -> Any:
            definition = scheduler.jobs.get((plugin_id, job_name))
            if definition is None:
                raise UnknownJobError("job_name", f"{plugin_id}/{job_name} is not registered here")
            job_id = message.task_id
            delivery = scheduler.broker.delivery(job_id)
            job = Job(
                id=job_id,
                name=job_name,
                data=data,
                attempts_made=delivery.attempts_made if delivery else 0,
                timestamp=ms_to_datetime(delivery.created_ms) if delivery else None,
                tenant_id=tenant_id,
                _queue=scheduler.broker.queue,
            )
            config = await scheduler.tenant_config(tenant_id, plugin_id)
            if config is None:
                log.warning("job_refused", job_id=job_id, plugin_id=plugin_id, tenant_id=tenant_id)
                raise UnrecoverableError(
                    f"refused: tenant {tenant_id!r} does not exist or does not have plugin"
                    f" {plugin_id!r} enabled"
                )
            ctx = scheduler.job_context(plugin_id, tenant_id, config)
            ctx.logger = ctx.logger.bind(
                job_id=job_id, task=message.task_name, attempt=job.attempts_made + 1
            )
            return await definition.handler(ctx, job)

        run_plugin_job.__name__ = f"plugin_{plugin_id}_{job_name}".replace("-", "_").replace(
            ".", "_"
        )
        return run_plugin_job

    # ------------------------------------------------------------------ enqueueing
    async def add_job(
        self,
        plugin_id: str,
        job_name: str,
        data: Any = None,
        options: JobOptions | Mapping[str, Any] | None = None,
        *,
        tenant_id: str,
    ) -> str:
        """Enqueue a one-off run of a registered job; returns the job id.

        With ``options.job_id``, a second call with the same id returns it and enqueues nothing.
        """
        check_id(plugin_id, "plugin_id")
        check_id(job_name, "job_name")
        check_id(tenant_id, "tenant_id")
        name = task_name(plugin_id, job_name)
        task = self.broker.find_task(name)
        if task is None and await self._task_appeared(name):  # enabled since this started
            task = self.broker.find_task(name)
        if task is None:
            raise UnknownJobError(
                "job_name", f"no job {job_name!r} registered for plugin {plugin_id!r}"
            )
        opts = JobOptions.coerce(options)
        self._check_limits(opts)
        if opts.cron is not None:
            raise InvalidInputError("options.cron", "add_job runs once; use register_job for cron")
        job_id = opts.job_id or uuid.uuid4().hex
        definition = self.jobs.get((plugin_id, job_name))
        base = definition.options if definition is not None else JobOptions()
        labels = base.merged(opts).labels(self.settings.default_timeout_ms)
        if opts.job_id is not None:
            labels[LABEL_DEDUP] = 1
        kicker = task.kicker().with_task_id(job_id).with_labels(**labels)
        try:
            await kicker.kiq(data, tenant_id=tenant_id)
        except SendTaskError as exc:
            if isinstance(exc.__cause__, DrmTaskiqError):
                raise exc.__cause__ from None
            raise
        return job_id

    # ------------------------------------------------------------------ state
    async def get_job_status(
        self, plugin_id: str, job_name: str, job_id: str, *, tenant_id: str | None = None
    ) -> JobStatus | None:
        """The job's state, or None for an unknown id (or one of another plugin or tenant)."""
        check_id(plugin_id, "plugin_id")
        check_id(job_name, "job_name")
        check_job_id(job_id)
        if tenant_id is not None:
            check_id(tenant_id, "tenant_id")
        raw = await self.broker.queue.job(job_id)
        if raw is not None:
            if raw.get("plugin") != plugin_id or raw.get("job") != job_name:
                return None
            if tenant_id is not None and raw.get("tenant") != tenant_id:
                return None
            return _status_from_hash(job_id, raw)
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE job_id = $1 AND plugin_id = $2 AND job_name = $3"
            " AND ($4::text IS NULL OR tenant_id = $4)",
            job_id,
            plugin_id,
            job_name,
            tenant_id,
        )
        if row is None:
            return None
        return _status_from_row(row)

    async def retry_job(
        self, plugin_id: str, job_name: str, job_id: str, *, tenant_id: str | None = None
    ) -> bool:
        """Run a failed job again (a new generation of attempts); False if it is not failed."""
        status = await self.get_job_status(plugin_id, job_name, job_id, tenant_id=tenant_id)
        if status is None or status.state != "failed":
            return False
        row = await self.pool.fetchrow(
            "SELECT message, tenant_id, generation FROM jobs WHERE job_id = $1", job_id
        )
        message = row["message"] if row is not None else None
        if message is None and await self.broker.queue.job(job_id) is None:
            log.warning("job_retry_impossible", job_id=job_id, reason="message not kept")
            return False
        fields = {
            "name": task_name(plugin_id, job_name),
            "plugin": plugin_id,
            "job": job_name,
            "tenant": status.tenant_id or "",
            "ts": str(int(time.time() * 1000)),
            "pri": "0",
            "gen": str((row["generation"] if row is not None else 0) + 1),
        }
        if message is not None:
            try:
                labels = json.loads(message).get("labels", {})
                fields["pri"] = str(int(labels.get(LABEL_PRIORITY, 0)))
            except (ValueError, TypeError, AttributeError):
                pass
        done = await self.broker.queue.retry_failed(job_id, message or "", fields)
        if done:
            log.info("job_retried", job_id=job_id, plugin_id=plugin_id, tenant_id=status.tenant_id)
        return done

    async def list_failed(
        self, plugin_id: str, *, tenant_id: str, limit: int = 100
    ) -> list[JobStatus]:
        """The plugin's failed jobs for a tenant, newest first."""
        check_id(plugin_id, "plugin_id")
        check_id(tenant_id, "tenant_id")
        rows = await self.pool.fetch(
            "SELECT * FROM jobs WHERE tenant_id = $1 AND plugin_id = $2 AND state = 'failed'"
            " ORDER BY finished_at DESC LIMIT $3",
            tenant_id,
            plugin_id,
            limit,
        )
        return [_status_from_row(row) for row in rows]

    async def queue_stats(self) -> dict[str, Any]:
        """The queue at a glance (``drm-taskiq queue``): ``waiting``, ``delayed`` and ``active``
        jobs; ``next_waiting_age_ms``, how long the job first in line has been ready to run
        (None when none waits); ``next_delayed_due_in_ms`` (negative when it is overdue: every
        worker is busy); ``running_per_tenant``; ``ledger``: ``unwritten`` entries (settled
        attempts not yet in ``plugin_runs``), ``being_written`` (read by a writer, not committed
        yet), ``dedicated_writer`` (a scheduler or ``drm-taskiq ledger`` writes); ``dead``
        letters; ``paused`` (tenant, plugin) pairs; ``workers``, the live worker processes.
        Raises ``RedisError`` when Redis is unreachable."""
        return await self.broker.queue.stats()

    async def list_dead(self, *, limit: int = 100) -> list[dict[str, str]]:
        """Dead-lettered jobs (their message could not be decoded, or no worker that took them
        had their task registered), oldest first: ``id``, ``state`` (``failed`` until retried;
        ``gone`` when no longer in Redis), ``name``, ``tenant``, ``plugin``, ``job``, ``reason``,
        ``finished`` (ms) and the job's other fields. They stay in Redis, with their message,
        until :meth:`purge_dead` (or ``retry_job``, which runs one again)."""
        return await self.broker.queue.dead_jobs(limit)

    async def purge_dead(self) -> tuple[int, int]:
        """Empty the dead-letter list and delete the dead-lettered jobs that are still failed
        (a job retried since is left alone); returns (entries removed, jobs deleted). A
        dead-lettered attempt of a known tenant has its ``plugin_runs`` row already."""
        entries, deleted = await self.broker.queue.purge_dead()
        log.info("dead_letters_purged", entries=entries, jobs_deleted=deleted)
        return entries, deleted


def _loads(value: str | None) -> Any:
    if value is None or value == "":
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _status_from_row(row: asyncpg.Record) -> JobStatus:
    return JobStatus(
        id=row["job_id"],
        state=row["state"],
        attempts_made=row["attempts_made"],
        progress=_loads(row["progress"]),
        returnvalue=_loads(row["returnvalue"]),
        failed_reason=row["failed_reason"],
        finished_on=row["finished_at"],
        plugin_id=row["plugin_id"],
        tenant_id=row["tenant_id"],
        job_name=row["job_name"],
        processed_on=row["started_at"],
    )


def _status_from_hash(job_id: str, raw: dict[str, str]) -> JobStatus:
    state = raw.get("state", "waiting")
    return JobStatus(
        id=job_id,
        state=state,  # type: ignore[arg-type]
        attempts_made=int(raw.get("attempts", 0)),
        progress=_loads(raw.get("progress")),
        returnvalue=_loads(raw.get("rv")) if state == "completed" else None,
        failed_reason=raw.get("reason") or None,
        finished_on=ms_to_datetime(raw.get("finished")),
        plugin_id=raw.get("plugin"),
        tenant_id=raw.get("tenant"),
        job_name=raw.get("job"),
        delayed_until=ms_to_datetime(raw.get("due")) if state == "delayed" else None,
        processed_on=ms_to_datetime(raw.get("processed")),
    )


class TenantScheduler:
    """A :class:`JobScheduler` bound to one tenant and, for a plugin's ``ctx.scheduler``, to
    that plugin: its methods act on this tenant's jobs, and a plugin-bound one refuses another
    plugin's id (``InvalidInputError`` naming ``plugin_id``), so that a plugin cannot replace,
    enqueue, unschedule, retry or read another plugin's jobs through its context."""

    def __init__(
        self, scheduler: JobScheduler, tenant_id: str, plugin_id: str | None = None
    ) -> None:
        self._scheduler = scheduler
        self.tenant_id = tenant_id
        self.plugin_id = plugin_id

    def _own(self, plugin_id: str) -> str:
        if self.plugin_id is not None and plugin_id != self.plugin_id:
            raise InvalidInputError(
                "plugin_id",
                f"must be this context's plugin {self.plugin_id!r} (a plugin manages its own"
                f" jobs only); got {plugin_id!r}",
            )
        return plugin_id

    async def register_job(
        self,
        plugin_id: str,
        job_name: str,
        handler: JobHandler,
        options: JobOptions | Mapping[str, Any] | None = None,
        *,
        on_completed: JobEventHandler | None = None,
        on_failed: JobEventHandler | None = None,
    ) -> None:
        """Register a job; a cron job is scheduled for this tenant. ``on_completed`` and
        ``on_failed``: see :meth:`JobScheduler.register_job`."""
        await self._scheduler.register_job(
            self._own(plugin_id),
            job_name,
            handler,
            options,
            tenant_id=self.tenant_id,
            on_completed=on_completed,
            on_failed=on_failed,
        )

    async def remove_job(self, plugin_id: str, job_name: str) -> None:
        """Remove this tenant's schedule of the job."""
        await self._scheduler.remove_job(self._own(plugin_id), job_name, tenant_id=self.tenant_id)

    async def add_job(
        self,
        plugin_id: str,
        job_name: str,
        data: Any = None,
        options: JobOptions | Mapping[str, Any] | None = None,
    ) -> str:
        """Enqueue a run of the job for this tenant."""
        return await self._scheduler.add_job(
            self._own(plugin_id), job_name, data, options, tenant_id=self.tenant_id
        )

    async def get_job_status(self, plugin_id: str, job_name: str, job_id: str) -> JobStatus | None:
        """The state of one of this tenant's jobs (None for other tenants' jobs)."""
        return await self._scheduler.get_job_status(
            self._own(plugin_id), job_name, job_id, tenant_id=self.tenant_id
        )

    async def retry_job(self, plugin_id: str, job_name: str, job_id: str) -> bool:
        """Run one of this tenant's failed jobs again."""
        return await self._scheduler.retry_job(
            self._own(plugin_id), job_name, job_id, tenant_id=self.tenant_id
        )

    async def list_failed(self, plugin_id: str, *, limit: int = 100) -> list[JobStatus]:
        """This tenant's failed jobs of the plugin, newest first."""
        return await self._scheduler.list_failed(
            self._own(plugin_id), tenant_id=self.tenant_id, limit=limit
        )

    async def list_schedules(self, *, count: int = 5) -> list[ScheduleInfo]:
        """This tenant's cron schedules (a plugin's: its own) with their next fire times."""
        infos = await self._scheduler.list_schedules(self.tenant_id, count=count)
        if self.plugin_id is None:
            return infos
        return [info for info in infos if info.plugin_id == self.plugin_id]


_global: JobScheduler | None = None


def get_scheduler() -> JobScheduler:
    """The process-wide scheduler, bound to ``drm_taskiq.broker:broker``."""
    global _global  # noqa: PLW0603  (the specification's process-wide instance)
    if _global is None:
        from drm_taskiq.broker import scheduler  # noqa: PLC0415  (built at import there)

        _global = scheduler
    return _global


async def close_scheduler() -> None:
    """Close the process-wide scheduler's connections."""
    global _global  # noqa: PLW0603
    if _global is not None:
        await _global.close()
        _global = None


def _stored_config(raw: str | None) -> dict[str, Any] | None:
    """A ``tenant_plugins.config`` as read; its secret values are remembered for redaction."""
    config: dict[str, Any] | None = None if raw is None else json.loads(raw)
    if config:
        redaction.remember(redaction.secret_values(config))
    return config
