"""plugin_runs and jobs name existing tenants and go with them (migration 0007: checked once
per statement instead of by a foreign key per row), with concurrent deletes."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from drm_taskiq import log_plugin_run, store
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio

RUN = "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status) VALUES ('p', $1, 'h', 's')"
JOB = (
    "INSERT INTO jobs (job_id, queue, plugin_id, tenant_id, job_name, state, attempts_made,"
    " created_at, finished_at) VALUES ($2, 'default', 'p', $1, 'j', 'completed', 1, NOW(), NOW())"
)


async def _count(db: asyncpg.Pool, tenant: str) -> tuple[int, int]:
    runs = await db.fetchval("SELECT count(*) FROM plugin_runs WHERE tenant_id = $1", tenant)
    jobs = await db.fetchval("SELECT count(*) FROM jobs WHERE tenant_id = $1", tenant)
    return runs, jobs


async def _waits_for_a_lock(db: asyncpg.Pool, pid: int) -> bool:
    kind = await db.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
    return bool(kind == "Lock")


async def test_rows_of_a_missing_tenant_are_refused(db: asyncpg.Pool, tenant: str) -> None:
    """Inserting or moving a row to a tenant that does not exist fails the statement with a
    foreign-key violation naming the tenant; a statement with one such row writes nothing."""
    await db.execute(RUN, tenant)
    await db.execute(JOB, tenant, "kept")
    for statement, args in (
        (RUN, ("nobody",)),
        (JOB, ("nobody", "j1")),
        ("UPDATE plugin_runs SET tenant_id = 'nobody'", ()),
        ("UPDATE jobs SET tenant_id = 'nobody' WHERE job_id = 'kept'", ()),
        (
            "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status)"
            " VALUES ('p', $1, 'h', 's'), ('p', 'nobody', 'h', 's')",
            (tenant,),
        ),
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
            await db.execute(statement, *args)
        assert "(tenant_id)=(nobody)" in str(caught.value.detail)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await log_plugin_run("p", "nobody", "h", "success", pool=db)
    assert await _count(db, "nobody") == (0, 0)
    assert await _count(db, tenant) == (1, 1)


async def test_deleting_tenants_deletes_their_runs_and_jobs(db: asyncpg.Pool, tenant: str) -> None:
    """A deleted tenant's plugin_runs and jobs rows are deleted with it; others stay."""
    await store.ensure_tenant(db, "other", plugins={})
    await store.ensure_tenant(db, "third", plugins={})
    for name in (tenant, "other", "third"):
        await db.execute(RUN, name)
        await db.execute(JOB, name, f"job-{name}")
    await db.execute("DELETE FROM tenants WHERE tenant_id IN ('other', 'third')")
    assert await _count(db, "other") == (0, 0)
    assert await _count(db, "third") == (0, 0)
    assert await _count(db, tenant) == (1, 1)


async def test_truncating_tenants_empties_runs_and_jobs(db: asyncpg.Pool, tenant: str) -> None:
    """TRUNCATE tenants needs CASCADE (tenant_plugins and schedules keep their foreign keys)
    and empties plugin_runs and jobs too, as their foreign keys' cascade did."""
    await db.execute(RUN, tenant)
    await db.execute(JOB, tenant, "j")
    with pytest.raises(asyncpg.FeatureNotSupportedError):
        await db.execute("TRUNCATE tenants")
    await db.execute("TRUNCATE tenants CASCADE")
    assert (
        await db.fetchval("SELECT (SELECT count(*) FROM plugin_runs) + (SELECT count(*) FROM jobs)")
        == 0
    )


async def test_a_tenant_with_rows_keeps_its_id(db: asyncpg.Pool) -> None:
    """A tenant's id cannot change while it has runs or jobs (it can without them)."""
    await store.ensure_tenant(db, "runs-only", plugins={})
    await store.ensure_tenant(db, "jobs-only", plugins={})
    await store.ensure_tenant(db, "empty", plugins={})
    await db.execute(RUN, "runs-only")
    await db.execute(JOB, "jobs-only", "j")
    for name in ("runs-only", "jobs-only"):
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await db.execute("UPDATE tenants SET tenant_id = 'renamed' WHERE tenant_id = $1", name)
    await db.execute("UPDATE tenants SET tenant_id = 'renamed' WHERE tenant_id = 'empty'")
    await db.execute("UPDATE tenants SET name = 'n' WHERE tenant_id = 'runs-only'")  # not the key


async def test_a_delete_waits_for_a_transaction_writing_the_tenants_rows(
    db: asyncpg.Pool, tenant: str
) -> None:
    """A tenant deleted while a transaction writes rows for it waits for that transaction,
    then deletes its rows too: no row is left behind without its tenant."""
    async with db.acquire() as writer, db.acquire() as deleter:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(RUN, tenant)
        await writer.execute(JOB, tenant, "j")
        deleting = asyncio.ensure_future(
            deleter.execute("DELETE FROM tenants WHERE tenant_id = $1", tenant)
        )
        pid = deleter.get_server_pid()
        await wait_for(lambda: _waits_for_a_lock(db, pid), timeout=10)
        await transaction.commit()
        await asyncio.wait_for(deleting, timeout=10)
    assert await _count(db, tenant) == (0, 0)


async def test_a_row_written_while_its_tenant_is_deleted_is_refused(
    db: asyncpg.Pool, tenant: str
) -> None:
    """Rows written for a tenant whose deletion is under way wait for it; once it is
    committed they are refused (foreign-key violation) and nothing is left behind; had it been
    rolled back they would be written."""
    async with db.acquire() as writer, db.acquire() as deleter:
        pid = writer.get_server_pid()
        for outcome in ("rollback", "commit"):
            transaction = deleter.transaction()
            await transaction.start()
            await deleter.execute("DELETE FROM tenants WHERE tenant_id = $1", tenant)
            writing = asyncio.ensure_future(writer.execute(RUN, tenant))
            await wait_for(lambda: _waits_for_a_lock(db, pid), timeout=10)
            if outcome == "rollback":
                await transaction.rollback()
                await asyncio.wait_for(writing, timeout=10)
                assert await _count(db, tenant) == (1, 0)
            else:
                await transaction.commit()
                with pytest.raises(asyncpg.ForeignKeyViolationError):
                    await asyncio.wait_for(writing, timeout=10)
    assert await _count(db, tenant) == (0, 0)
