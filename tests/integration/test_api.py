"""Process-wide API: get_scheduler/close_scheduler, log_plugin_run, migrations."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import pytest

from drm_taskiq import (
    InvalidInputError,
    JobMetadata,
    JobScheduler,
    close_scheduler,
    get_scheduler,
    log_plugin_run,
    store,
)
from drm_taskiq.settings import Settings

pytestmark = pytest.mark.asyncio


async def test_log_plugin_run_writes_the_spec_row(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """log_plugin_run inserts one row with the specification's layout."""
    meta = JobMetadata(
        job_id="j1", job_name="sync", attempts_made=1, timestamp=datetime(2026, 1, 1, tzinfo=UTC)
    )
    row_id = await log_plugin_run("testp", tenant, "job:sync", "error", meta, "boom", pool=db)
    row = await db.fetchrow("SELECT * FROM plugin_runs WHERE plugin_run_id = $1", row_id)
    assert row is not None
    assert (row["plugin_id"], row["tenant_id"], row["hook_name"]) == ("testp", tenant, "job:sync")
    assert (row["status"], row["error"], row["args_hash"]) == ("error", "boom", None)
    assert json.loads(row["result"])["jobId"] == "j1"
    with pytest.raises(InvalidInputError) as caught:
        await log_plugin_run("testp", tenant, "job:sync", "weird", pool=db)
    assert caught.value.field == "status"


async def test_get_scheduler_is_process_wide(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, db: asyncpg.Pool
) -> None:
    """get_scheduler returns one instance bound to drm_taskiq.broker; close_scheduler resets it."""
    for name, value in (
        ("DRM_DB_SCHEMA", settings.db_schema),
        ("DRM_KEY_PREFIX", settings.key_prefix),
        ("DRM_ENTRY_POINTS", "false"),
    ):
        monkeypatch.setenv(name, value)
    from drm_taskiq import broker as broker_module
    from drm_taskiq.settings import get_settings

    get_settings.cache_clear()
    scheduler = get_scheduler()
    assert get_scheduler() is scheduler
    assert scheduler.broker is broker_module.broker
    await close_scheduler()
    get_settings.cache_clear()


async def test_concurrent_migrations_apply_once(settings: Settings) -> None:
    """Several processes migrating a fresh schema at once apply each migration once."""
    try:
        results = await asyncio.gather(*(store.migrate(settings) for _ in range(4)))
        applied = [name for result in results for name in result]
        assert sorted(applied) == sorted(set(applied))
        assert any(results)
        conn = await asyncpg.connect(settings.database_url)
        try:
            versions = await conn.fetchval(
                f'SELECT count(*) FROM "{settings.db_schema}".schema_migrations'
            )
        finally:
            await conn.close()
        assert versions == len(applied)
    finally:
        conn = await asyncpg.connect(settings.database_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
        await conn.close()


async def test_a_schema_at_migration_5_upgrades_with_its_rows(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema at migration 5 (results in the taskiq_results table, foreign keys to tenants)
    upgraded to the latest: a job recorded before reads the same return value from the view
    (with no duration: jobs had no start time) and a failed one its reason; the tenant checks
    that replace the foreign keys hold for the old rows (refused, deleted with the tenant)."""
    every = store._migrations()
    monkeypatch.setattr(store, "_migrations", lambda: [m for m in every if m[0] <= 5])
    conn = await asyncpg.connect(settings.database_url)
    schema = settings.db_schema
    try:
        await store.migrate(settings)
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        await conn.execute(
            "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status)"
            " VALUES ('p', 't1', 'h', 'success')"
        )
        for job_id, state, value, reason in (
            ("done", "completed", '{"n": 1}', None),
            ("broke", "failed", None, "boom"),
        ):
            await conn.execute(
                "INSERT INTO jobs (job_id, queue, plugin_id, tenant_id, job_name, state,"
                " attempts_made, returnvalue, failed_reason, created_at, finished_at)"
                " VALUES ($1, 'default', 'p', 't1', 'j', $2, 1, $3::jsonb, $4, NOW(), NOW())",
                job_id,
                state,
                value,
                reason,
            )
        monkeypatch.setattr(store, "_migrations", lambda: every)
        applied = await store.migrate(settings)
        rows = {
            r["task_id"]: json.loads(r["result"])
            for r in await conn.fetch("SELECT task_id, result FROM taskiq_results")
        }
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute("UPDATE plugin_runs SET tenant_id = 'gone'")
        await conn.execute("DELETE FROM tenants WHERE tenant_id = 't1'")
        left = await conn.fetchval(
            "SELECT (SELECT count(*) FROM plugin_runs) + (SELECT count(*) FROM jobs)"
        )
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    assert applied == [name for version, name, _ in every if version > 5]
    assert rows["done"]["return_value"] == {"n": 1}
    assert (rows["done"]["is_err"], rows["done"]["execution_time"]) == (False, 0)
    assert rows["broke"]["is_err"] and rows["broke"]["error"]["exc_message"] == ["boom"]
    assert left == 0


async def test_old_finished_jobs_are_pruned(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """Finished jobs older than the retention leave the jobs table; plugin_runs stays."""
    await db.execute(
        "INSERT INTO jobs (job_id, queue, plugin_id, tenant_id, job_name, state, attempts_made,"
        " created_at, finished_at) VALUES ('old', 'default', 'testp', $1, 'x', 'failed', 1,"
        " NOW() - interval '40 days', NOW() - interval '40 days'), ('new', 'default', 'testp',"
        " $1, 'x', 'failed', 1, NOW(), NOW())",
        tenant,
    )
    await client.broker._prune_finished()
    assert await db.fetchval("SELECT array_agg(job_id) FROM jobs") == ["new"]
