"""The example plugin: real work against PostgreSQL, one job of each kind.

- ``sync-activities`` (one-off): inserts ``count`` activity rows for the tenant.
- ``cleanup-activities`` (cron, every 10 seconds): deletes the tenant's rows older than
  ``retention_s`` seconds (tenant config, default 3600).
- ``flaky`` (one-off): fails on its first two attempts, then succeeds; shows retries with backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from drm_taskiq.errors import UnrecoverableError
from drm_taskiq.plugins import define_plugin

if TYPE_CHECKING:
    from drm_taskiq.context import PluginContext
    from drm_taskiq.jobs import Job

PLUGIN_ID: Final = "example"
SYNC_JOB: Final = "sync-activities"
CLEANUP_JOB: Final = "cleanup-activities"
FLAKY_JOB: Final = "flaky"

MAX_COUNT: Final = 10_000
MAX_SOURCE_LENGTH: Final = 200
DEFAULT_SOURCE: Final = "example"
DEFAULT_RETENTION_S: Final = 3600
CLEANUP_CRON: Final = "*/10 * * * * *"  # six fields, seconds first: every 10 seconds
FLAKY_FAILURES: Final = 2

_INSERT = """
INSERT INTO example_activities (tenant_id, source, payload)
SELECT $1, $2, jsonb_build_object('job_id', $3::text, 'seq', seq)
FROM generate_series(1, $4::int) AS seq
WHERE NOT EXISTS (
  SELECT 1 FROM example_activities WHERE tenant_id = $1 AND payload->>'job_id' = $3::text
)
"""
_DELETE_OLD = """
WITH deleted AS (
  DELETE FROM example_activities
  WHERE tenant_id = $1 AND created_at < NOW() - make_interval(secs => $2::double precision)
  RETURNING 1
)
SELECT count(*) FROM deleted
"""


def schema_sql() -> str:
    """The plugin's DDL (``schema.sql``); the platform applies it before ``on_load``."""
    return (resources.files(__package__ or "drm_taskiq_example") / "schema.sql").read_text("utf-8")


def parse_sync_data(data: object) -> tuple[int, str]:
    """``(count, source)`` from a sync-activities payload; raise UnrecoverableError if invalid."""
    if not isinstance(data, Mapping):
        raise UnrecoverableError(f"data must be an object with 'count', got {type(data).__name__}")
    count = data.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
        raise UnrecoverableError(
            f"data.count must be an integer from 0 to {MAX_COUNT}, got {count!r}"
        )
    source = data.get("source", DEFAULT_SOURCE)
    if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE_LENGTH:
        raise UnrecoverableError(
            f"data.source must be a string of 1 to {MAX_SOURCE_LENGTH} characters, got {source!r}"
        )
    return count, source


def parse_retention(config: Mapping[str, Any]) -> float:
    """The ``retention_s`` tenant setting in seconds; raise UnrecoverableError if invalid."""
    value = config.get("retention_s", DEFAULT_RETENTION_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 10**9:
        raise UnrecoverableError(
            f"config.retention_s must be a number of seconds >= 0, got {value!r}"
        )
    return float(value)


async def sync_activities(ctx: PluginContext, job: Job) -> dict[str, int]:
    """Insert ``data.count`` activities for the tenant; a re-run of the same job inserts none."""
    count, source = parse_sync_data(job.data)
    status = await ctx.db.execute(_INSERT, ctx.tenant_id, source, job.id, count)
    inserted = int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"
    await job.update_progress(100)
    ctx.logger.info("activities synced", meta={"inserted": inserted, "source": source})
    return {"inserted": inserted}


async def cleanup_activities(ctx: PluginContext, job: Job) -> dict[str, int]:
    """Delete the tenant's activities older than ``config.retention_s`` seconds."""
    retention_s = parse_retention(ctx.config)
    deleted = int(await ctx.db.fetchval(_DELETE_OLD, ctx.tenant_id, retention_s))
    if deleted:
        ctx.logger.info("activities cleaned up", meta={"deleted": deleted, "job_id": job.id})
    return {"deleted": deleted}


async def flaky(ctx: PluginContext, job: Job) -> dict[str, int]:
    """Fail on the first two attempts, succeed on the third."""
    attempt = job.attempts_made + 1
    if job.attempts_made < FLAKY_FAILURES:
        raise RuntimeError(f"flaky failure on attempt {attempt}")
    return {"attempt": attempt}


async def on_load(ctx: PluginContext) -> None:
    """Register the plugin's three jobs for the tenant (its table exists: see ``schema``)."""
    scheduler = ctx.scheduler
    await scheduler.register_job(PLUGIN_ID, SYNC_JOB, sync_activities, None)
    await scheduler.register_job(PLUGIN_ID, CLEANUP_JOB, cleanup_activities, {"cron": CLEANUP_CRON})
    await scheduler.register_job(
        PLUGIN_ID, FLAKY_JOB, flaky, {"attempts": 3, "backoff": {"type": "fixed", "delay": 200}}
    )
    ctx.logger.info("example plugin loaded")


async def on_unload(ctx: PluginContext) -> None:
    """Remove the cron job; rows are kept."""
    await ctx.scheduler.remove_job(PLUGIN_ID, CLEANUP_JOB)
    ctx.logger.info("example plugin unloaded")


plugin = define_plugin(
    id=PLUGIN_ID,
    name="Example activities",
    version="0.1.0",
    on_load=on_load,
    on_unload=on_unload,
    schema=schema_sql(),
)
