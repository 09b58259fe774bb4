"""The ``accept`` plugin: jobs the acceptance tests run in real worker and scheduler processes.

Jobs (registered by ``on_load`` through ``ctx.scheduler``, once per tenant):

- ``sleep``: sleeps ``job.data["s"]`` seconds, then returns ``job.data``.
- ``echo``: returns ``job.data`` at once; its ``on_completed`` callback records an
  ``accept_events`` row named ``echo:completed`` (with the event's attempt).
- ``tick``: returns the job id; a cron job when ``ACCEPT_TICK_CRON`` is set
  (e.g. ``*/2 * * * * *``).

Every run of a handler also inserts one row into ``accept_events`` (job id, job name, attempt,
process id), created by ``on_load``. ``plugin_runs`` cannot show a second execution of the same
attempt (its row id is derived from job id and attempt), this table can.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Final

from drm_taskiq import define_plugin

if TYPE_CHECKING:
    from drm_taskiq.context import PluginContext
    from drm_taskiq.jobs import Job
    from drm_taskiq.options import JobEvent

PLUGIN_ID: Final = "accept"
TICK_CRON_ENV: Final = "ACCEPT_TICK_CRON"
_DDL = """
CREATE TABLE IF NOT EXISTS accept_events (
  id         BIGSERIAL PRIMARY KEY,
  job_id     TEXT NOT NULL,
  job_name   TEXT NOT NULL,
  tenant_id  TEXT NOT NULL,
  attempt    INTEGER NOT NULL,
  pid        INTEGER NOT NULL,
  at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
SELECT drm_tenant_table('accept_events');
"""


async def _record(ctx: PluginContext, job: Job) -> None:
    await ctx.db.execute(
        "INSERT INTO accept_events (job_id, job_name, tenant_id, attempt, pid)"
        " VALUES ($1, $2, $3, $4, $5)",
        job.id,
        job.name,
        ctx.tenant_id,
        job.attempts_made + 1,
        os.getpid(),
    )


async def sleep(ctx: PluginContext, job: Job) -> Any:
    """Sleep ``job.data["s"]`` seconds, then return ``job.data``."""
    await _record(ctx, job)
    await asyncio.sleep(float(job.data["s"]))
    return job.data


async def echo(ctx: PluginContext, job: Job) -> Any:
    """Return ``job.data``."""
    await _record(ctx, job)
    return job.data


async def echo_completed(ctx: PluginContext, event: JobEvent) -> None:
    """``echo``'s on_completed: one ``echo:completed`` row, through the tenant's ``ctx.db``."""
    await ctx.db.execute(
        "INSERT INTO accept_events (job_id, job_name, tenant_id, attempt, pid)"
        " VALUES ($1, $2, $3, $4, $5)",
        event.job_id,
        f"{event.job_name}:completed",
        ctx.tenant_id,
        event.attempt,
        os.getpid(),
    )


async def tick(ctx: PluginContext, job: Job) -> str:
    """Return the job id (``cron:{schedule_id}:{slot_ms}`` when fired by the scheduler)."""
    await _record(ctx, job)
    return job.id


async def on_load(ctx: PluginContext) -> None:
    """Register the jobs for ``ctx.tenant_id`` (``accept_events`` comes from the schema)."""
    await ctx.scheduler.register_job(ctx.plugin_id, "sleep", sleep, None)
    await ctx.scheduler.register_job(ctx.plugin_id, "echo", echo, None, on_completed=echo_completed)
    cron = os.environ.get(TICK_CRON_ENV)
    await ctx.scheduler.register_job(ctx.plugin_id, "tick", tick, {"cron": cron} if cron else None)


plugin = define_plugin(
    id=PLUGIN_ID, name="Acceptance tests", version="1.0.0", on_load=on_load, schema=_DDL
)
