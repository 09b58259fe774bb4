"""taskiq results (`wait_result`, `get_result`): ready when a job settles, from its hash in
Redis, before the run ledger has written them, and the same from PostgreSQL afterwards."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from taskiq import AsyncTaskiqTask
from taskiq.depends.progress_tracker import TaskProgress, TaskState
from taskiq.exceptions import ResultGetError

from drm_taskiq import JobScheduler, UnrecoverableError
from drm_taskiq.runlog import RunLedger
from tests.conftest import wait_for
from tests.support.waiting import key_gone

pytestmark = pytest.mark.asyncio


async def echo(ctx: Any, job: Any) -> Any:
    return {"echo": job.data, "tenant": ctx.tenant_id}


async def fatal(ctx: Any, job: Any) -> None:
    raise UnrecoverableError("bad input")


async def setup(s: JobScheduler) -> None:
    await s.register_job("testp", "echo", echo)
    await s.register_job("testp", "fatal", fatal)


async def _written(client: JobScheduler, db: asyncpg.Pool, job_id: str) -> None:
    """Once the job has finished, let the run ledger write what is pending (no writer runs in
    these tests), and wait until the job's hash has left Redis."""
    redis = client.broker.queue.redis
    key = client.broker.queue.keys.job(job_id)
    await wait_for(lambda: _finished(redis, key))
    ledger = RunLedger(client.broker.queue, db, consumer="test")
    await ledger.ensure_group()
    await ledger.drain()
    await wait_for(lambda: key_gone(redis, key))


async def _finished(redis: aioredis.Redis, key: str) -> bool:
    return await redis.hget(key, "state") in (b"completed", b"failed")


async def test_a_result_is_ready_when_the_job_settles_not_when_the_ledger_writes_it(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """With no run-ledger writer anywhere (rows wait in Redis), `wait_result` still returns
    the job's result: it comes from the job's hash. Once the ledger has written the row and the
    hash has left Redis, `get_result` returns the same result from PostgreSQL."""
    await setup(client)
    await start_worker(setup, ledger_in_worker=False)
    task = client.broker.find_task("plugin:testp:echo")
    assert task is not None
    sent = await task.kiq({"n": 1}, tenant_id=tenant)
    result = await sent.wait_result(check_interval=0.05, timeout=20)
    assert not result.is_err
    assert result.return_value == {"echo": {"n": 1}, "tenant": tenant}
    assert await db.fetchval("SELECT count(*) FROM taskiq_results") == 0  # not written yet

    await _written(client, db, sent.task_id)
    assert await db.fetchval("SELECT count(*) FROM taskiq_results") == 1
    backend = client.broker.result_backend
    assert await backend.is_result_ready(sent.task_id)
    from_postgres = await backend.get_result(sent.task_id)
    assert from_postgres.model_dump() == result.model_dump()


async def test_a_failed_job_has_an_error_result_at_once(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job that failed for good gives an error result with its reason, from Redis before the
    ledger writes it and the same from PostgreSQL after."""
    await setup(client)
    await start_worker(setup, ledger_in_worker=False)
    task = client.broker.find_task("plugin:testp:fatal")
    assert task is not None
    sent = await task.kiq(None, tenant_id=tenant)
    result = await sent.wait_result(check_interval=0.05, timeout=20)
    assert result.is_err and result.return_value is None
    assert "bad input" in str(result.error)

    await _written(client, db, sent.task_id)
    from_postgres = await client.broker.result_backend.get_result(sent.task_id)
    assert from_postgres.model_dump() == result.model_dump()


async def test_a_job_that_has_not_finished_in_redis_is_not_ready_whatever_postgresql_holds(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """While a job's hash says it has not finished (it waits, runs, or was retried by hand
    after it failed), its result is not ready, even where PostgreSQL holds the result of an
    earlier run with that id, and get_result says so; an unknown id is not ready either."""
    await setup(client)
    await start_worker(setup, ledger_in_worker=False)
    job_id = await client.add_job("testp", "echo", 2, tenant_id=tenant)
    await _written(client, db, job_id)
    backend = client.broker.result_backend
    assert await backend.is_result_ready(job_id)  # from PostgreSQL

    key = client.broker.queue.keys.job(job_id)
    for state in ("waiting", "active", "delayed"):
        await client.broker.queue.redis.hset(key, "state", state)
        assert not await backend.is_result_ready(job_id)
        with pytest.raises(LookupError, match="has not finished"):
            await backend.get_result(job_id)
    await client.broker.queue.redis.delete(key)
    assert await backend.is_result_ready(job_id)
    assert (await backend.get_result(job_id)).return_value == {"echo": 2, "tenant": tenant}
    assert not await backend.is_result_ready("no-such-job")
    with pytest.raises(LookupError, match="no result"):
        await backend.get_result("no-such-job")
    with pytest.raises(ResultGetError):  # what taskiq's task.get_result() makes of it
        await AsyncTaskiqTask("no-such-job", backend).get_result()


async def test_a_finished_hash_without_valid_times_gives_a_result_without_duration(
    client: JobScheduler,
) -> None:
    """A finished job's hash whose start or finish time is not a number (not written by
    finish.lua) still gives its result, with an execution time of 0."""
    key = client.broker.queue.keys.job("hand-edited")
    await client.broker.queue.redis.hset(
        key, mapping={"state": "completed", "rv": '{"ok": true}', "processed": "x", "finished": "1"}
    )
    backend = client.broker.result_backend
    assert await backend.is_result_ready("hand-edited")
    result = await backend.get_result("hand-edited")
    assert (result.is_err, result.return_value, result.execution_time) == (False, {"ok": True}, 0.0)


async def test_taskiq_progress_is_the_jobs_progress_in_redis_and_then_in_postgresql(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """taskiq's progress API (what its ProgressTracker calls) keeps progress with the job: in
    its hash while the job is in Redis (`get_job_status` shows it), in its jobs row after the
    ledger wrote it; progress set with `ctx.update_progress` reads as a STARTED progress."""
    backend = client.broker.result_backend
    assert await backend.get_progress("no-such-job") is None
    await setup(client)
    job_id = await client.add_job("testp", "echo", 3, tenant_id=tenant)
    other = await client.add_job("testp", "echo", 4, tenant_id=tenant)
    # set while the jobs wait (a running job's tracker does the same), before a worker runs
    await backend.set_progress(job_id, TaskProgress(state=TaskState.STARTED, meta={"done": 3}))
    await client.broker.queue.set_progress(other, 50)  # what ctx.update_progress(50) does
    status = await client.get_job_status("testp", "echo", job_id, tenant_id=tenant)
    assert status is not None and status.progress == {"state": "STARTED", "meta": {"done": 3}}
    assert await backend.get_progress(other) == TaskProgress(state=TaskState.STARTED, meta=50)

    await start_worker(setup, ledger_in_worker=False)
    other_key = client.broker.queue.keys.job(other)
    await wait_for(lambda: _finished(client.broker.queue.redis, other_key))
    await _written(client, db, job_id)  # writes both
    await wait_for(lambda: key_gone(client.broker.queue.redis, other_key))
    assert await backend.get_progress(job_id) == TaskProgress(
        state=TaskState.STARTED, meta={"done": 3}
    )
    assert await backend.get_progress(other) == TaskProgress(state=TaskState.STARTED, meta=50)

    # a hash again for that id (a new run: retried by hand, or the id reused) without progress
    # yet: none, whatever the earlier run's jobs row holds
    await client.broker.queue.redis.hset(other_key, "state", "waiting")
    assert await backend.get_progress(other) is None


async def test_a_deleted_tenants_results_go_with_its_jobs(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool
) -> None:
    """taskiq_results reads the jobs table: deleting a tenant deletes its jobs' results."""
    from drm_taskiq import store

    await store.ensure_tenant(db, "leaving", plugins={"testp": {}})
    await setup(client)
    await start_worker(setup, ledger_in_worker=False)
    job_id = await client.add_job("testp", "echo", 5, tenant_id="leaving")
    await _written(client, db, job_id)
    assert await client.broker.result_backend.is_result_ready(job_id)
    await db.execute("DELETE FROM tenants WHERE tenant_id = 'leaving'")
    assert not await client.broker.result_backend.is_result_ready(job_id)
    assert await db.fetchval("SELECT count(*) FROM taskiq_results WHERE task_id = $1", job_id) == 0
