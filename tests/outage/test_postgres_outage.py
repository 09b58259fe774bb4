"""PostgreSQL outages: run rows wait in the Redis ledger stream and are written when it returns."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from drm_taskiq import store
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.redis_queue import LEDGER_GROUP, QueueKeys, RedisQueue
from drm_taskiq.runlog import RunLedger
from drm_taskiq.settings import Settings
from tests.outage.conftest import (
    PLUGIN_ID,
    TENANT,
    WorkerProcesses,
    pg_counts,
    try_count_runs,
)
from tests.support.ledger import ledger_entry
from tests.support.private_pg import PrivatePostgres
from tests.support.processes import wait_event
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(90)]


async def work(ctx: Any, job: Any) -> Any:
    await asyncio.sleep(0.05)
    return job.data


async def register_work(scheduler: JobScheduler) -> None:
    await scheduler.register_job("testp", "work", work)


async def test_postgres_stopped_mid_run_loses_no_row(
    pg_settings: Settings,
    private_pg: PrivatePostgres,
    pg_client: JobScheduler,
    pg_start_worker: Any,
    redis_client: aioredis.Redis,
) -> None:
    """Stop PostgreSQL during a run of 500 jobs, start it again: exactly 500 rows, none twice."""
    keys = QueueKeys(pg_settings.key_prefix, pg_settings.queue)
    await register_work(pg_client)
    job_ids = [await pg_client.add_job("testp", "work", n, tenant_id=TENANT) for n in range(500)]
    with capture_logs() as logs:
        await pg_start_worker(register_work)
        await wait_until(
            lambda: _at_least(try_count_runs(pg_settings), 100), timeout=30, what="100 rows"
        )
        # Down for 3 s: shorter than the worker's 5 s tenant-config cache, which every run
        # reads (see test_job_without_database_access_runs_during_a_long_postgres_outage).
        private_pg.stop()
        stopped_at = time.monotonic()
        backlog_at_stop = await redis_client.xlen(keys.ledger)
        await asyncio.sleep(3)
        backlog_before_start = await redis_client.xlen(keys.ledger)
        assert await try_count_runs(pg_settings) == -1
        private_pg.start()
        down_s = time.monotonic() - stopped_at
        await wait_until(
            lambda: _at_least(try_count_runs(pg_settings), 500), timeout=30, what="500 rows"
        )
        await wait_until(lambda: _ledger_empty(redis_client, keys), timeout=10, what="ledger")
    assert down_s >= 3
    assert backlog_before_start > backlog_at_stop  # jobs kept completing while PG was down
    counts = await pg_counts(pg_settings)
    assert counts == {
        "runs": 500,
        "distinct_runs": 500,
        "success": 500,
        "jobs": 500,
        "completed": 500,
    }
    for job_id in job_ids[::50]:
        status = await pg_client.get_job_status("testp", "work", job_id)
        assert status is not None and status.state == "completed"
    events = [entry["event"] for entry in logs]
    assert "ledger_write_failed" in events
    assert "ledger_recovered" in events
    assert await redis_client.xlen(keys.ledger) == 0


async def _at_least(count: Any, wanted: int) -> bool:
    return int(await count) >= wanted


async def _ledger_empty(redis_client: aioredis.Redis, keys: QueueKeys) -> bool:
    if await redis_client.xlen(keys.ledger):
        return False
    pending = await redis_client.xpending(keys.ledger, LEDGER_GROUP)
    return int(pending["pending"]) == 0


async def test_rows_survive_worker_sigkill_while_postgres_is_down(
    pg_settings: Settings,
    private_pg: PrivatePostgres,
    pg_client: JobScheduler,
    pg_db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    worker_procs: WorkerProcesses,
) -> None:
    """Jobs completed while PostgreSQL is down, then the worker is SIGKILLed: 50 rows later."""
    keys = QueueKeys(pg_settings.key_prefix, pg_settings.queue)
    first = worker_procs.start(pg_settings)
    await wait_event(first, "plugin_loaded", plugin_id=PLUGIN_ID)
    # Delayed so that none can run before PostgreSQL is down (the worker needs it to start).
    job_ids = [
        await pg_client.add_job(PLUGIN_ID, "noop", n, {"delay": 1500}, tenant_id=TENANT)
        for n in range(50)
    ]
    private_pg.stop()
    assert await redis_client.zcard(keys.delayed) == 50

    async def states() -> list[str]:
        async with redis_client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "state")
            return [(value or b"").decode() for value in await pipe.execute()]

    await wait_until(
        lambda: _all_equal(states(), "completed"), timeout=20, procs=[first], what="50 completed"
    )
    await wait_event(first, "ledger_write_failed")
    assert await redis_client.xlen(keys.ledger) == 50
    dead_consumer = first.events("worker_started")[0]["worker_id"]
    pending = await _pending_by_consumer(redis_client, keys)
    assert set(pending) <= {dead_consumer}
    held_by_dead = pending.get(dead_consumer, 0)
    assert held_by_dead > 0  # the dead worker had read entries it could not write

    first.killpg()
    await wait_until(lambda: first.returncode is not None, timeout=10, what="worker0 to die")
    private_pg.start()
    # A long claim idle time keeps the second worker from claiming the dead worker's entries
    # itself while the test runs (the claim is exercised explicitly below).
    second = worker_procs.start(pg_settings, DRM_LEDGER_CLAIM_IDLE_MS=600_000)
    await wait_event(second, "plugin_loaded", plugin_id=PLUGIN_ID)
    # The entries nobody had read are written by the new worker at once...
    await wait_until(
        lambda: _at_least(try_count_runs(pg_settings), 50 - held_by_dead),
        timeout=20,
        procs=[second],
        what="rows of the unread entries",
    )
    # ...those the dead worker had read stay pending until RunLedger.claim_abandoned takes them:
    # after DRM_LEDGER_CLAIM_IDLE_MS. Claim them here with a short idle time, as a worker
    # would after that time.
    await asyncio.sleep(1)
    assert (await pg_counts(pg_settings))["runs"] == 50 - held_by_dead
    assert await _pending_by_consumer(redis_client, keys) == {dead_consumer: held_by_dead}
    ledger = RunLedger(
        RedisQueue(redis_client, pg_settings.key_prefix, pg_settings.queue),
        pg_db,
        consumer="outage-test-claimer",
        claim_idle_ms=200,
    )
    await asyncio.sleep(0.3)
    claimed: int | BaseException
    try:
        claimed = await ledger.claim_abandoned()
    except IndexError as exc:  # see the assertion at the end
        claimed = exc
    assert await _pending_by_consumer(redis_client, keys) == {ledger.consumer: held_by_dead}
    assert await ledger.drain() == held_by_dead
    counts = await pg_counts(pg_settings)
    assert counts == {"runs": 50, "distinct_runs": 50, "success": 50, "jobs": 50, "completed": 50}
    assert await redis_client.xlen(keys.ledger) == 0
    assert await _pending_by_consumer(redis_client, keys) == {}
    assert sorted(await states()) == [""] * 50  # recorded jobs left Redis
    assert claimed == held_by_dead, (
        f"RunLedger.claim_abandoned() gave {claimed!r} for {held_by_dead} claimed entries"
    )


async def noop(ctx: Any, job: Any) -> Any:
    return job.data


async def register_noop(scheduler: JobScheduler) -> None:
    await scheduler.register_job("testp", "noop", noop)


async def test_job_without_database_access_runs_during_a_long_postgres_outage(
    pg_settings: Settings,
    private_pg: PrivatePostgres,
    pg_client: JobScheduler,
    pg_start_worker: Any,
    redis_client: aioredis.Redis,
) -> None:
    """A handler that does not use the database completes while PostgreSQL is down for > 5 s."""
    await register_noop(pg_client)
    await pg_start_worker(register_noop)
    await pg_client.add_job("testp", "noop", 0, tenant_id=TENANT)
    await wait_until(lambda: _at_least(try_count_runs(pg_settings), 1), what="first row")
    job_id = await pg_client.add_job("testp", "noop", 1, {"delay": 5500}, tenant_id=TENANT)
    private_pg.stop()
    job_key = QueueKeys(pg_settings.key_prefix, pg_settings.queue).job(job_id)

    async def finished() -> str | None:
        state = await redis_client.hget(job_key, "state")
        return state.decode() if state in (b"completed", b"failed") else None

    state = await wait_until(finished, timeout=15, what="job finished")
    private_pg.start()
    await wait_until(lambda: _at_least(try_count_runs(pg_settings), 2), what="second row")
    status = await pg_client.get_job_status("testp", "noop", job_id)
    assert status is not None
    assert (state, status.state, status.failed_reason) == ("completed", "completed", None)


async def test_one_abandoned_entry_does_not_stop_the_ledger_writer(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """A ledger entry left pending by a dead worker is claimed and written; the writer lives on."""
    await store.ensure_tenant(db, TENANT, plugins={"testp": {}})
    queue = RedisQueue(redis_client, settings.key_prefix, settings.queue)
    await redis_client.xgroup_create(queue.keys.ledger, LEDGER_GROUP, id="0", mkstream=True)
    await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry("job-1", tenant=TENANT)})
    await redis_client.xreadgroup(LEDGER_GROUP, "dead-worker", {queue.keys.ledger: ">"})
    await asyncio.sleep(0.2)
    ledger = RunLedger(queue, db, consumer="live-worker", block_ms=50, claim_idle_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(ledger.run(stop))
    try:
        await asyncio.sleep(0.5)
        await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry("job-2", tenant=TENANT)})
        await asyncio.sleep(1)
        if task.done():
            raise AssertionError(f"the ledger writer stopped: {task.exception()!r}")
        await wait_until(
            lambda: db.fetchval("SELECT count(*) = 2 FROM plugin_runs"), timeout=5, what="2 rows"
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=10)


async def test_a_dedicated_writer_that_cannot_write_hands_the_ledger_to_the_workers(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis, monkeypatch: Any
) -> None:
    """A dedicated writer (a scheduler) whose PostgreSQL pool fails stops renewing its
    announcement; once it expires the worker's writer, which can reach PostgreSQL, writes the
    rows. When the dedicated writer works again it takes the ledger back."""
    monkeypatch.setattr(RunLedger, "CHECK_EVERY_S", 0.05)
    monkeypatch.setattr(RunLedger, "WRITER_TTL_MS", 400)
    await store.ensure_tenant(db, TENANT, plugins={"testp": {}})
    queue = RedisQueue(redis_client, settings.key_prefix, settings.queue)
    broken = await store.create_pool(settings, max_size=1)
    await broken.close()  # acquire() now fails: this writer cannot write a batch
    dedicated = RunLedger(queue, broken, consumer="sched-cut-off", dedicated=True, block_ms=50)
    worker = RunLedger(queue, db, consumer="worker-ok", block_ms=50)
    await dedicated.ensure_group()
    assert not await dedicated.standing_by()  # announced before its first batch
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in (dedicated, worker)]
    try:
        await asyncio.sleep(0.1)
        assert worker._standing_by
        for i in range(5):
            await redis_client.xadd(
                queue.keys.ledger, {"e": ledger_entry(f"cut-{i}", tenant=TENANT)}
            )
        # the dedicated writer fails, its announcement expires, the worker writes every row
        # (the ones the dedicated writer had read are claimed once idle: claim_idle_ms)
        worker.claim_idle_ms = 200
        await wait_until(
            lambda: db.fetchval("SELECT count(*) = 5 FROM plugin_runs"), timeout=20, what="5 rows"
        )
        assert not worker._standing_by
        # the dedicated writer gets a working pool: after its next batch it announces itself
        dedicated.pool = db
        await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry("cut-5", tenant=TENANT)})
        await wait_until(lambda: worker._standing_by, timeout=20, what="the worker to stand by")
        await wait_until(
            lambda: db.fetchval("SELECT count(*) = 6 FROM plugin_runs"), timeout=20, what="6 rows"
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=15)
    assert await db.fetchval("SELECT count(DISTINCT plugin_run_id) FROM plugin_runs") == 6


async def _all_equal(values: Any, wanted: str) -> bool:
    return all(value == wanted for value in await values)


async def _pending_by_consumer(redis_client: aioredis.Redis, keys: QueueKeys) -> dict[str, int]:
    summary = await redis_client.xpending(keys.ledger, LEDGER_GROUP)
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): int(c["pending"])
        for c in summary["consumers"]
        if int(c["pending"])
    }
