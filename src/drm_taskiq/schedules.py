"""Plugin cron schedules in PostgreSQL: upsert, remove, list with their next fire times, prune."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis

from drm_taskiq.cron import next_slot
from drm_taskiq.options import JobOptions, ms_to_datetime

log = structlog.get_logger()


@dataclass(slots=True)
class ScheduleInfo:
    """One tenant schedule as an operator sees it."""

    schedule_id: str
    tenant_id: str
    plugin_id: str
    job_name: str
    cron: str
    tz: str
    next_runs: list[datetime]
    last_fired: datetime | None
    last_job_id: str | None
    last_status: str | None


def schedule_id(tenant_id: str, plugin_id: str, job_name: str) -> str:
    """The stable id of a tenant's schedule of a plugin job."""
    return f"{tenant_id}:{plugin_id}:{job_name}"


async def upsert(
    pool: asyncpg.Pool,
    tenant_id: str,
    plugin_id: str,
    job_name: str,
    options: JobOptions,
) -> str:
    """Create or replace the tenant's schedule of the job."""
    sid = schedule_id(tenant_id, plugin_id, job_name)
    stored = options.model_dump_json(exclude={"cron", "tz", "job_id", "delay"}, exclude_unset=True)
    await pool.execute(
        "INSERT INTO schedules"
        " (schedule_id, tenant_id, plugin_id, job_name, cron, tz, options)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)"
        " ON CONFLICT (tenant_id, plugin_id, job_name) DO UPDATE SET cron = EXCLUDED.cron,"
        " tz = EXCLUDED.tz, options = EXCLUDED.options, updated_at = NOW()",
        sid,
        tenant_id,
        plugin_id,
        job_name,
        options.cron,
        options.tz,
        stored,
    )
    return sid


async def remove(
    pool: asyncpg.Pool, plugin_id: str, job_name: str | None = None, *, tenant_id: str | None = None
) -> int:
    """Delete schedules of a plugin (one job, or all), for one tenant or all; returns the count."""
    status = await pool.execute(
        "DELETE FROM schedules WHERE plugin_id = $1 AND ($2::text IS NULL OR job_name = $2)"
        " AND ($3::text IS NULL OR tenant_id = $3)",
        plugin_id,
        job_name,
        tenant_id,
    )
    return int(str(status).split()[-1])


async def prune(pool: asyncpg.Pool, known_plugins: set[str], *, delete_unknown: bool) -> list[str]:
    """Delete schedules disabled for their tenant and, with ``delete_unknown``, those of plugins
    not in ``known_plugins``; schedules of unknown plugins are logged either way."""
    orphans = await pool.fetch(
        "SELECT schedule_id, plugin_id FROM schedules WHERE NOT (plugin_id = ANY($1::text[]))",
        sorted(known_plugins),
    )
    for row in orphans:
        log.warning(
            "schedule_orphaned",
            schedule_id=row["schedule_id"],
            plugin_id=row["plugin_id"],
            removed=delete_unknown,
        )
    rows = await pool.fetch(
        "DELETE FROM schedules s WHERE ($2 AND NOT (s.plugin_id = ANY($1::text[])))"
        " OR NOT EXISTS (SELECT 1 FROM tenant_plugins tp WHERE tp.tenant_id = s.tenant_id"
        " AND tp.plugin_id = s.plugin_id AND tp.enabled) RETURNING schedule_id, plugin_id",
        sorted(known_plugins),
        delete_unknown,
    )
    for row in rows:
        log.warning("schedule_pruned", schedule_id=row["schedule_id"], plugin_id=row["plugin_id"])
    return [row["schedule_id"] for row in rows]


async def list_for_tenant(
    pool: asyncpg.Pool,
    redis: Redis,
    *,
    tenant_id: str,
    lastjob_key: str,
    job_key: Any,
    count: int = 5,
    now: datetime | None = None,
) -> list[ScheduleInfo]:
    """The tenant's schedules with their next ``count`` fire times and last run."""
    now = now or datetime.now(UTC)
    rows = await pool.fetch(
        "SELECT schedule_id, tenant_id, plugin_id, job_name, cron, tz FROM schedules"
        " WHERE tenant_id = $1 ORDER BY plugin_id, job_name",
        tenant_id,
    )
    infos = []
    for row in rows:
        sid = row["schedule_id"]
        runs: list[datetime] = []
        cursor = now
        for _ in range(count):
            cursor = next_slot(row["cron"], row["tz"], cursor)
            runs.append(cursor)
        job_raw = await redis.hget(lastjob_key, sid)
        last_job = job_raw.decode() if isinstance(job_raw, bytes) else job_raw
        status = None
        if last_job:
            state = await redis.hget(job_key(last_job), "state")
            if state is not None:
                status = state.decode() if isinstance(state, bytes) else str(state)
            else:
                status = await pool.fetchval("SELECT state FROM jobs WHERE job_id = $1", last_job)
        infos.append(
            ScheduleInfo(
                schedule_id=sid,
                tenant_id=row["tenant_id"],
                plugin_id=row["plugin_id"],
                job_name=row["job_name"],
                cron=row["cron"],
                tz=row["tz"],
                next_runs=runs,
                last_fired=ms_to_datetime(last_job.rsplit(":", 1)[1]) if last_job else None,
                last_job_id=last_job,
                last_status=status,
            )
        )
    return infos
