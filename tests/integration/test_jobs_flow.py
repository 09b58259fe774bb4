"""Jobs from add_job to plugin_runs rows, through real Redis, PostgreSQL and taskiq's Receiver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from drm_taskiq import InvalidInputError, JobScheduler, UnknownJobError, UnknownTenantError
from tests.conftest import wait_for
from tests.support.waiting import key_gone

pytestmark = pytest.mark.asyncio


async def echo(ctx: Any, job: Any) -> Any:
    await job.update_progress({"pct": 100})
    return {"echo": job.data, "tenant": ctx.tenant_id}


async def register_echo(scheduler: JobScheduler, **options: Any) -> None:
    await scheduler.register_job("testp", "echo", echo, options or None)


async def rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM plugin_runs ORDER BY executed_at"))


async def test_job_runs_and_leaves_one_success_row(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job added with add_job runs once and leaves one success row with JobMetadata."""
    await register_echo(client)
    await start_worker(register_echo)
    job_id = await client.add_job("testp", "echo", {"x": 1}, tenant_id=tenant)
    await wait_for(lambda: _count(db), timeout=20)
    [row] = await rows(db)
    assert row["plugin_id"] == "testp"
    assert row["tenant_id"] == tenant
    assert row["hook_name"] == "job:echo"
    assert row["status"] == "success"
    assert row["error"] is None
    assert row["args_hash"] is None
    meta = json.loads(row["result"])
    assert meta["jobId"] == job_id
    assert meta["jobName"] == "echo"
    assert meta["attemptsMade"] == 1
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None
    assert status.state == "completed"
    assert status.returnvalue == {"echo": {"x": 1}, "tenant": tenant}
    assert status.progress == {"pct": 100}
    assert status.attempts_made == 1
    assert status.finished_on is not None
    assert status.processed_on is not None and status.processed_on <= status.finished_on


async def _count(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM plugin_runs"))


async def test_kiq_enqueues_exactly_as_add_job(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """`await task.kiq(data, tenant_id=...)` on the registered task runs like add_job."""
    await register_echo(client)
    await start_worker(register_echo)
    task = client.broker.find_task("plugin:testp:echo")
    assert task is not None
    sent = await task.kiq({"via": "kiq"}, tenant_id=tenant)
    await wait_for(lambda: _count(db))
    status = await client.get_job_status("testp", "echo", sent.task_id)
    assert status is not None and status.state == "completed"
    assert status.returnvalue["echo"] == {"via": "kiq"}


async def test_finished_jobs_leave_redis_and_status_comes_from_postgres(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str, redis_client: Any
) -> None:
    """Once recorded in PostgreSQL a job's hash leaves Redis; its status is still answered."""
    await register_echo(client)
    await start_worker(register_echo)
    job_id = await client.add_job("testp", "echo", 7, tenant_id=tenant)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    await wait_for(lambda: key_gone(redis_client, client.broker.queue.keys.job(job_id)))
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None
    assert (status.state, status.returnvalue["echo"], status.progress) == (
        "completed",
        7,
        {"pct": 100},
    )
    # the attempt's start, as its plugin_runs row has it (jobs.started_at, migration 0006)
    started = await db.fetchval(
        "SELECT executed_at FROM plugin_runs WHERE result->>'jobId' = $1", job_id
    )
    assert status.processed_on == started
    assert status.finished_on is not None and started <= status.finished_on


async def test_status_waiting_then_unknown_ids(client: JobScheduler, tenant: str) -> None:
    """Without a worker a job is waiting; unknown ids or another job's name give None."""
    await register_echo(client)
    job_id = await client.add_job("testp", "echo", None, tenant_id=tenant)
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None and status.state == "waiting" and status.attempts_made == 0
    assert status.processed_on is None
    assert await client.get_job_status("testp", "echo", "nope") is None
    assert await client.get_job_status("testp", "other", job_id) is None


async def test_delayed_job_reports_delayed_then_runs(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job with a delay is `delayed` in Redis until due, then runs."""
    await register_echo(client)
    job_id = await client.add_job("testp", "echo", 1, {"delay": 1500}, tenant_id=tenant)
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None and status.state == "delayed" and status.delayed_until is not None
    await start_worker(register_echo)
    await asyncio.sleep(0.5)
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None and status.state == "delayed"
    await wait_for(lambda: _count(db), timeout=10)
    row = await db.fetchrow("SELECT executed_at FROM plugin_runs")
    meta_ts = await db.fetchval("SELECT (result->>'timestamp')::timestamptz FROM plugin_runs")
    assert (row["executed_at"] - meta_ts).total_seconds() >= 1.4


async def test_caller_job_id_is_accepted_once(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """A second add_job with the same job id returns it and enqueues nothing."""
    await register_echo(client)
    first = await client.add_job("testp", "echo", 1, {"job_id": "order-42"}, tenant_id=tenant)
    second = await client.add_job("testp", "echo", 2, {"job_id": "order-42"}, tenant_id=tenant)
    assert first == second == "order-42"
    assert await redis_client.zcard(client.broker.queue.keys.wait) == 1


async def test_priority_lower_number_first(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """Waiting jobs run lowest priority number first, FIFO within a priority."""
    order: list[Any] = []

    async def record(ctx: Any, job: Any) -> None:
        order.append(job.data)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "rec", record)

    await setup(client)
    plan = [(10, "low-1"), (10, "low-2"), (1, "high-1"), (5, "mid"), (1, "high-2"), (0, "top")]
    for priority, name in plan:
        await client.add_job("testp", "rec", name, {"priority": priority}, tenant_id=tenant)
    await start_worker(setup, worker_concurrency=1)
    await wait_for(lambda: len(order) == len(plan))
    assert order == ["top", "high-1", "high-2", "mid", "low-1", "low-2"]


@pytest.mark.parametrize(
    ("data", "options", "field"),
    [
        ({"x": {1, 2}}, None, "data"),
        ("x" * (2 * 1024 * 1024), None, "data"),
        (None, {"priority": -1}, "options.priority"),
        (None, {"priority": 2**21 + 1}, "options.priority"),
        (None, {"attempts": 0}, "options.attempts"),
        (None, {"timeout": 0}, "options.timeout"),
        (None, {"backoff": {"type": "linear", "delay": 1}}, "options.backoff.type"),
        (None, {"cron": "* * *"}, "options.cron"),
        (None, {"bogus": 1}, "options.bogus"),
        (None, {"job_id": "a b"}, "options.job_id"),
    ],
)
async def test_bad_input_is_refused_before_enqueue(
    client: JobScheduler, tenant: str, redis_client: Any, data: Any, options: Any, field: str
) -> None:
    """Bad data or options raise an error naming the field; nothing reaches Redis."""
    await register_echo(client)
    with pytest.raises(InvalidInputError) as caught:
        await client.add_job("testp", "echo", data, options, tenant_id=tenant)
    assert caught.value.field == field
    assert await redis_client.zcard(client.broker.queue.keys.wait) == 0


async def test_unknown_job_tenant_and_bad_ids(
    client: JobScheduler, tenant: str, db: asyncpg.Pool, redis_client: Any
) -> None:
    """Unknown jobs, unknown or disabled tenants and malformed ids are refused by name."""
    await register_echo(client)
    with pytest.raises(UnknownJobError):
        await client.add_job("testp", "missing", None, tenant_id=tenant)
    with pytest.raises(UnknownTenantError, match="does not exist"):
        await client.add_job("testp", "echo", None, tenant_id="ghost")
    await db.execute("UPDATE tenant_plugins SET enabled = FALSE")
    client.broker.gate.forget()  # type: ignore[union-attr]
    with pytest.raises(UnknownTenantError, match="not enabled"):
        await client.add_job("testp", "echo", None, tenant_id=tenant)
    for bad in ("", "a:b", "{x}", "x" * 200, "new\nline"):
        with pytest.raises(InvalidInputError) as caught:
            await client.add_job("testp", "echo", None, tenant_id=bad)
        assert caught.value.field == "tenant_id"
    assert await redis_client.zcard(client.broker.queue.keys.wait) == 0


async def test_sync_handler_and_tenantless_cron_refused(client: JobScheduler) -> None:
    """Synchronous handlers and cron jobs without a tenant fail at registration."""

    def sync_handler(ctx: Any, job: Any) -> None:
        return None

    with pytest.raises(InvalidInputError) as caught:
        await client.register_job("testp", "sync", sync_handler)  # type: ignore[arg-type]
    assert caught.value.field == "handler"
    with pytest.raises(InvalidInputError) as caught:
        await client.register_job("testp", "c", echo, {"cron": "* * * * *"})
    assert caught.value.field == "tenant_id"


async def test_handler_context_has_tenant_config(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """ctx.config inside a handler is the tenant's tenant_plugins.config for the plugin."""
    await db.execute(
        "UPDATE tenant_plugins SET config = '{\"retention_s\": 60}'::jsonb WHERE tenant_id = $1",
        tenant,
    )

    async def show(ctx: Any, job: Any) -> Any:
        return {
            "config": ctx.config,
            "db_tenant": await ctx.db.fetchval("SELECT current_setting('app.tenant_id')"),
        }

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "show", show)

    await setup(client)
    await start_worker(setup)
    job_id = await client.add_job("testp", "show", None, tenant_id=tenant)
    await wait_for(lambda: _count(db))
    status = await client.get_job_status("testp", "show", job_id)
    assert status is not None
    assert status.returnvalue == {"config": {"retention_s": 60}, "db_tenant": tenant}
