"""Row-level security: plugin code sees and writes only its own tenant's rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from drm_taskiq import JobScheduler, create_plugin_context, store
from drm_taskiq.errors import InvalidInputError
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def two_tenants(client: JobScheduler, db: asyncpg.Pool, tenant: str) -> tuple[str, str]:
    """Tenants acme and globex, each with one plugin_runs row of its own."""
    await store.ensure_tenant(db, "globex", plugins={"testp": {}})
    for tenant_id in (tenant, "globex"):
        await db.execute(
            "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status)"
            " VALUES ('testp', $1, 'job:seed', 'success')",
            tenant_id,
        )
    return tenant, "globex"


async def test_hostile_query_sees_only_own_tenant(
    client: JobScheduler, two_tenants: tuple[str, str]
) -> None:
    """A query without any tenant filter returns only the context tenant's rows."""
    mine, _other = two_tenants
    ctx = create_plugin_context("testp", mine, scheduler=client)
    rows = await ctx.db.fetch("SELECT tenant_id FROM plugin_runs")
    assert {r["tenant_id"] for r in rows} == {mine}
    assert await ctx.db.fetchval("SELECT count(*) FROM tenant_plugins") == 1
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ctx.db.fetchval("SELECT count(*) FROM tenants")


async def test_writes_into_another_tenant_fail(
    client: JobScheduler, db: asyncpg.Pool, two_tenants: tuple[str, str]
) -> None:
    """Inserting or updating another tenant's rows is refused or touches nothing."""
    mine, other = two_tenants
    ctx = create_plugin_context("testp", mine, scheduler=client)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ctx.db.execute(
            "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status)"
            " VALUES ('testp', $1, 'job:x', 'success')",
            other,
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ctx.db.execute("UPDATE plugin_runs SET status = 'error'")
    assert await db.fetchval("SELECT count(*) FROM plugin_runs WHERE status = 'error'") == 0
    await ctx.db.execute(
        "INSERT INTO plugin_runs (plugin_id, tenant_id, hook_name, status)"
        " VALUES ('testp', $1, 'job:own', 'success')",
        mine,
    )
    assert await db.fetchval("SELECT count(*) FROM plugin_runs WHERE hook_name = 'job:own'") == 1


async def test_forged_tenant_binding_sees_nothing(
    client: JobScheduler, two_tenants: tuple[str, str]
) -> None:
    """Setting app.tenant_id to another tenant without the secret's signature shows no rows."""
    mine, other = two_tenants
    ctx = create_plugin_context("testp", mine, scheduler=client)
    async with ctx.db.connection() as conn:
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", other)
        assert await conn.fetchval("SELECT count(*) FROM plugin_runs") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT value FROM drm_secrets")


async def test_plugin_role_cannot_escape(
    client: JobScheduler, two_tenants: tuple[str, str]
) -> None:
    """The plugin role cannot become another role or switch row-level security off."""
    mine, _ = two_tenants
    ctx = create_plugin_context("testp", mine, scheduler=client)
    for statement in (
        "SET ROLE postgres",
        "SET row_security = off; SELECT count(*) FROM plugin_runs",
        "ALTER TABLE plugin_runs DISABLE ROW LEVEL SECURITY",
        "CREATE TABLE sneaky (x int)",
    ):
        with pytest.raises(asyncpg.PostgresError):
            await ctx.db.execute(statement)
    async with ctx.db.connection() as conn:
        await conn.execute("RESET ROLE")
        assert await conn.fetchval("SELECT current_user") == "drm_plugin"
        assert await conn.fetchval("SELECT count(DISTINCT tenant_id) FROM plugin_runs") == 1


async def test_handler_db_is_bound_to_the_jobs_tenant(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, two_tenants: tuple[str, str]
) -> None:
    """Inside a job, ctx.db sees the job's tenant's rows only."""
    _mine, other = two_tenants

    async def peek(ctx: Any, job: Any) -> Any:
        rows = await ctx.db.fetch("SELECT DISTINCT tenant_id FROM plugin_runs")
        return sorted(r["tenant_id"] for r in rows)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "peek", peek)

    await setup(client)
    await start_worker(setup)
    job_id = await client.add_job("testp", "peek", None, tenant_id=other)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    status = await client.get_job_status("testp", "peek", job_id)
    assert status is not None
    assert status.returnvalue == [other]


async def test_example_plugin_tables_are_isolated(
    client: JobScheduler, db: asyncpg.Pool, two_tenants: tuple[str, str]
) -> None:
    """The example plugin's table, created from its schema, isolates tenants the same way."""
    from drm_taskiq_example.plugin import plugin as example

    assert example.schema is not None
    await store.apply_plugin_schema(db, example.id, example.schema)
    await store.apply_plugin_schema(db, example.id, example.schema)  # idempotent
    mine, other = two_tenants
    for tenant_id in (mine, other):
        await db.execute(
            "INSERT INTO example_activities (tenant_id, source, payload) VALUES ($1, 's', '{}')",
            tenant_id,
        )
    ctx = create_plugin_context("example", mine, scheduler=client)
    rows = await ctx.db.fetch("SELECT tenant_id FROM example_activities")
    assert [r["tenant_id"] for r in rows] == [mine]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ctx.db.execute(
            "INSERT INTO example_activities (tenant_id, source, payload) VALUES ($1, 's', '{}')",
            other,
        )
    assert await ctx.db.execute("DELETE FROM example_activities") == "DELETE 1"
    assert await db.fetchval("SELECT count(*) FROM example_activities") == 1
    with pytest.raises(asyncpg.PostgresError):
        await ctx.db.execute("ALTER TABLE example_activities DISABLE ROW LEVEL SECURITY")


async def test_a_plugins_context_scheduler_manages_its_own_jobs_only(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """ctx.scheduler is bound to its plugin: another plugin's id is refused (naming plugin_id)
    by every method, nothing of the other plugin changes (its handler, its schedule, the queue),
    list_schedules shows the plugin's own schedules; the operator's tenant-bound scheduler
    still manages every plugin."""
    await store.ensure_tenant(db, tenant, plugins={"testp": {}, "other": {}})

    async def theirs(ctx: Any, job: Any) -> str:
        return "theirs"

    async def mine(ctx: Any, job: Any) -> str:
        return "mine"

    operator = client.for_tenant(tenant)
    await operator.register_job("other", "work", theirs, {"cron": "0 3 * * *"})
    ctx = create_plugin_context("testp", tenant, scheduler=client)
    await ctx.scheduler.register_job("testp", "own", mine, {"cron": "0 4 * * *"})
    own_id = await ctx.scheduler.add_job("testp", "own", {"n": 1})
    counts = await client.broker.queue.counts()

    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: ctx.scheduler.register_job("other", "work", mine),
        lambda: ctx.scheduler.register_job("other", "new", mine, {"cron": "* * * * *"}),
        lambda: ctx.scheduler.remove_job("other", "work"),
        lambda: ctx.scheduler.add_job("other", "work", {"n": 2}),
        lambda: ctx.scheduler.get_job_status("other", "work", own_id),
        lambda: ctx.scheduler.retry_job("other", "work", own_id),
        lambda: ctx.scheduler.list_failed("other"),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidInputError) as refused:
            await attempt()
        assert refused.value.field == "plugin_id"
        assert "'testp'" in str(refused.value)
    assert client.jobs[("other", "work")].handler is theirs
    assert ("other", "new") not in client.jobs
    assert await client.broker.queue.counts() == counts
    schedules = await db.fetch("SELECT plugin_id, job_name FROM schedules ORDER BY plugin_id")
    assert [tuple(r) for r in schedules] == [("other", "work"), ("testp", "own")]

    assert [i.plugin_id for i in await ctx.scheduler.list_schedules()] == ["testp"]
    assert {i.plugin_id for i in await operator.list_schedules()} == {"other", "testp"}
    status = await ctx.scheduler.get_job_status("testp", "own", own_id)
    assert status is not None and status.state == "waiting"
    await operator.remove_job("other", "work")  # the operator's scheduler: any plugin
    assert [r["plugin_id"] for r in await db.fetch("SELECT plugin_id FROM schedules")] == ["testp"]


async def test_a_plugin_schema_runs_again_only_when_it_changed(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """A plugin's schema runs at the first start and again only when its text changed (each
    run of drm_tenant_table() locks the table for a moment; every worker start did it); each
    plugin has its own; plugin code cannot read the checksums."""
    sql = "CREATE TABLE IF NOT EXISTS schema_runs (n INT); INSERT INTO schema_runs VALUES (1);"

    async def runs() -> int:
        return int(await db.fetchval("SELECT count(*) FROM schema_runs"))

    assert await store.apply_plugin_schema(db, "p1", sql)
    assert not await store.apply_plugin_schema(db, "p1", sql)  # the next process start
    assert await runs() == 1
    assert await store.apply_plugin_schema(db, "p1", sql + " -- v2")
    assert await runs() == 2
    assert await store.apply_plugin_schema(db, "p2", sql)
    assert await runs() == 3
    ctx = create_plugin_context("testp", tenant, scheduler=client)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await ctx.db.fetch("SELECT * FROM plugin_schemas")
