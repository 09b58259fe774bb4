"""Redis outages: a restarted Redis (AOF) loses no job; a Redis gone too long stops the worker."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq.errors import RedisUnavailableError
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.settings import Settings
from tests.outage.conftest import (
    PLUGIN_ID,
    TENANT,
    WorkerProcesses,
)
from tests.support.processes import wait_event
from tests.support.services import PrivateRedis
from tests.support.waiting import key_gone, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(90)]


async def _counts(db: asyncpg.Pool) -> dict[str, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM plugin_runs) AS runs,"
        " (SELECT count(DISTINCT plugin_run_id) FROM plugin_runs) AS distinct_runs,"
        " (SELECT count(*) FROM plugin_runs WHERE status = 'success') AS success,"
        " (SELECT count(*) FROM jobs) AS jobs,"
        " (SELECT count(*) FROM jobs WHERE state = 'completed') AS completed"
    )
    assert row is not None
    return {key: int(value) for key, value in row.items()}


async def test_redis_restart_mid_run_loses_and_repeats_nothing(
    redis_settings: Settings,
    private_redis: PrivateRedis,
    redis_client_scheduler: JobScheduler,
    redis_start_worker: Any,
    db: asyncpg.Pool,
) -> None:
    """Stop Redis for 3 s during 200 jobs (50 delayed 2 s), restart it: each completes once."""
    runs: collections.Counter[str] = collections.Counter()
    finished: set[str] = set()

    async def work(ctx: Any, job: Any) -> Any:
        runs[job.id] += 1
        await asyncio.sleep(0.3)
        finished.add(job.id)
        return job.data

    async def setup(scheduler: JobScheduler) -> None:
        await scheduler.register_job("testp", "work", work)

    client = redis_client_scheduler
    await setup(client)
    job_ids = [await client.add_job("testp", "work", n, tenant_id=TENANT) for n in range(150)]
    job_ids += [
        await client.add_job("testp", "work", n, {"delay": 2000}, tenant_id=TENANT)
        for n in range(150, 200)
    ]
    with capture_logs() as logs:
        # 200 slots (taskiq's Receiver runs at most 100 at once): once the 150 immediate jobs
        # have started, the listener has free capacity and keeps polling Redis through the
        # outage. (With every slot busy it only waits for capacity: it then logs neither
        # redis_unavailable nor redis_reconnected.)
        await redis_start_worker(setup, worker_concurrency=200)
        await wait_until(lambda: len(runs) >= 150, timeout=20, what="150 jobs started")
        private_redis.stop()
        started_at_stop, running_at_stop = len(runs), len(set(runs) - finished)
        await asyncio.sleep(3)
        private_redis.start()
        reloaded = (private_redis.dir / "redis.log").read_text("utf-8", errors="replace")
        await wait_until(
            lambda: _counts_reach(db, 200), timeout=40, interval=0.2, what="200 completed jobs"
        )
    assert running_at_stop > 0  # Redis went away while jobs were running...
    assert started_at_stop == 150  # ...and before the delayed ones were due
    assert await _counts(db) == {
        "runs": 200,
        "distinct_runs": 200,
        "success": 200,
        "jobs": 200,
        "completed": 200,
    }
    assert "DB loaded from append only file" in reloaded
    assert set(runs) == set(job_ids)
    repeated = {job_id: n for job_id, n in runs.items() if n != 1}
    assert repeated == {}, f"handlers ran more than once: {repeated}"
    events = [entry["event"] for entry in logs]
    assert "redis_unavailable" in events
    assert "redis_reconnected" in events
    assert events.index("redis_unavailable") < events.index("redis_reconnected")
    assert "redis_unavailable_giving_up" not in events


async def _counts_reach(db: asyncpg.Pool, wanted: int) -> bool:
    return (await _counts(db))["completed"] >= wanted


async def test_in_process_worker_gives_up_after_redis_outage_limit(
    redis_settings: Settings,
    private_redis: PrivateRedis,
    redis_start_worker: Any,
    db: asyncpg.Pool,
) -> None:
    """Redis gone longer than DRM_REDIS_OUTAGE_LIMIT_S: the worker's listen raises."""
    with capture_logs() as logs:
        handle = await redis_start_worker(redis_outage_limit_s=2)
        await asyncio.sleep(0.3)
        private_redis.stop()
        await wait_until(handle.task.done, timeout=15, what="listener to stop")
    error = handle.task.exception()
    # taskiq's Receiver runs the listener in an anyio task group: the error arrives wrapped.
    if isinstance(error, BaseExceptionGroup):
        [error] = error.exceptions
    assert isinstance(error, RedisUnavailableError), repr(error)
    events = [entry["event"] for entry in logs]
    assert "redis_unavailable" in events
    assert "redis_unavailable_giving_up" in events
    [giving_up] = [entry for entry in logs if entry["event"] == "redis_unavailable_giving_up"]
    assert 2 <= giving_up["seconds"] < 6


async def test_worker_process_exits_after_redis_outage_limit(
    redis_settings: Settings,
    private_redis: PrivateRedis,
    redis_tenant: str,
    worker_procs: WorkerProcesses,
) -> None:
    """A real worker logs redis_unavailable_giving_up and the whole command exits non-zero."""
    proc = worker_procs.start(redis_settings, DRM_REDIS_OUTAGE_LIMIT_S=2)
    await wait_event(proc, "plugin_loaded", plugin_id=PLUGIN_ID)
    private_redis.stop()
    await wait_event(proc, "redis_unavailable_giving_up", timeout=15)
    await wait_until(lambda: proc.returncode is not None, timeout=30, what="worker to exit")
    output = proc.output()
    assert proc.returncode != 0, output[-3000:]
    assert "Scheduling reload" not in output  # the supervisor stopped; no endless restarts


async def test_recorded_results_are_read_from_postgresql_while_redis_is_down(
    private_redis: PrivateRedis,
    redis_client_scheduler: JobScheduler,
    redis_start_worker: Any,
    db: asyncpg.Pool,
) -> None:
    """The result backend looks at a job's hash in Redis first; with Redis down it answers
    from PostgreSQL for results the run ledger has recorded, instead of failing."""

    async def setup(scheduler: JobScheduler) -> None:
        await scheduler.register_job("testp", "double", _double)

    client = redis_client_scheduler
    await setup(client)
    await redis_start_worker(setup)
    task = client.broker.find_task("plugin:testp:double")
    assert task is not None
    sent = await task.kiq(21, tenant_id=TENANT)
    assert (await sent.wait_result(check_interval=0.05, timeout=20)).return_value == 42
    key = client.broker.queue.keys.job(sent.task_id)
    await wait_until(
        lambda: key_gone(client.broker.queue.redis, key),
        timeout=20,
        what="the job's hash left Redis (recorded)",
    )
    private_redis.stop()
    backend = client.broker.result_backend
    assert await backend.is_result_ready(sent.task_id)
    result = await backend.get_result(sent.task_id)
    assert not result.is_err and result.return_value == 42


async def _double(ctx: Any, job: Any) -> int:
    return int(job.data) * 2
