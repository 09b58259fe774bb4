"""Acceptance: real ``taskiq worker`` and ``taskiq scheduler`` processes, real Redis and PostgreSQL.

Each test starts its processes with the test's own schema and key prefix (see ``conftest.py``);
they load the ``accept`` plugin from ``tests/plugins/accept.py``.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from tests.acceptance.conftest import (
    DRM_RECEIVER,
    TASKIQ_RECEIVER,
    Proc,
    Processes,
    count_jobs,
    fetch_events,
    fetch_jobs,
    fetch_runs,
    wait_exit,
    wait_until,
)
from tests.plugins.accept import tick as accept_tick

from drm_taskiq import store
from drm_taskiq.cron import CronEngine
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.redis_queue import LEDGER_GROUP, QueueKeys
from drm_taskiq.runlog import RunLedger

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(90)]

TICK_CRON = "*/2 * * * * *"
SLOT_MS = 2000


async def _add(client: JobScheduler, tenant: str, job: str, items: list[Any]) -> list[str]:
    return [await client.add_job("accept", job, data, tenant_id=tenant) for data in items]


def _completed(db: asyncpg.Pool, n: int) -> Any:
    async def check() -> bool:
        return await count_jobs(db, "completed") >= n

    return check


async def _count(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


def _started(*procs: Proc) -> set[str]:
    return {event["job_id"] for proc in procs for event in proc.events("job_started")}


@pytest.mark.parametrize("receiver", [DRM_RECEIVER, TASKIQ_RECEIVER], ids=["drm", "taskiq"])
async def test_worker_process_runs_jobs_added_by_a_client(
    procs: Processes,
    accept_client: JobScheduler,
    db: asyncpg.Pool,
    accept_tenant: str,
    receiver: str,
) -> None:
    """20 jobs added with add_job are run by a worker process, one success row each, with
    drm-taskiq's receiver and with taskiq's own."""
    worker = await procs.ready_worker(receiver=receiver)
    [started] = worker.events("worker_started")
    assert started["receiver"] == ("drm" if receiver == DRM_RECEIVER else "taskiq")
    ids = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(20)])
    await wait_until(_completed(db, 20), timeout=30, procs=[worker], what="20 completed jobs")
    await asyncio.sleep(0.5)  # let any duplicate show up
    runs = await fetch_runs(db)
    assert len(runs) == 20
    assert Counter(run["job_id"] for run in runs) == Counter(ids)
    assert {(run["status"], run["hook_name"], run["attempt"]) for run in runs} == {
        ("success", "job:echo", 1)
    }
    assert {run["tenant_id"] for run in runs} == {accept_tenant}
    jobs = await fetch_jobs(db)
    assert sorted(job["job_id"] for job in jobs) == sorted(ids)
    assert {job["state"] for job in jobs} == {"completed"}
    status = await accept_client.get_job_status("accept", "echo", ids[7])
    assert status is not None and status.state == "completed" and status.returnvalue == {"n": 7}
    assert Counter(e["job_id"] for e in await fetch_events(db, "echo")) == Counter(ids)
    assert _started(worker) == set(ids)
    # each job's on_completed callback ran once, in the worker, with the tenant's ctx.db

    async def callbacks() -> list[asyncpg.Record]:
        return await fetch_events(db, "echo:completed")

    await wait_until(lambda: _count(callbacks, 20), timeout=10, what="20 on_completed callbacks")
    done = await callbacks()
    assert Counter(e["job_id"] for e in done) == Counter(ids)
    assert {(e["tenant_id"], e["attempt"]) for e in done} == {(accept_tenant, 1)}


async def test_sigkill_mid_job_every_job_completes_exactly_once(
    procs: Processes,
    accept_client: JobScheduler,
    db: asyncpg.Pool,
    accept_tenant: str,
    redis_client: aioredis.Redis,
    keys: QueueKeys,
) -> None:
    """A worker SIGKILLed mid-job: its jobs are re-run elsewhere, each completes exactly once."""
    first = await procs.ready_worker(WORKER_CONCURRENCY=4)
    second = await procs.ready_worker(WORKER_CONCURRENCY=4)
    ids = await _add(accept_client, accept_tenant, "sleep", [{"s": 2, "n": i} for i in range(12)])
    await wait_until(
        lambda: first.events("job_started") and second.events("job_started"),
        timeout=15,
        procs=[first, second],
        what="both workers running jobs",
    )
    assert await redis_client.zcard(keys.active) > 0
    killed = _started(first)
    first.killpg(signal.SIGKILL)
    assert await wait_exit(first, timeout=5) == -signal.SIGKILL
    assert await count_jobs(db) == 0  # nothing had finished yet: the victim's jobs are mid-run

    await wait_until(_completed(db, 12), timeout=40, procs=[second], what="12 completed jobs")
    await asyncio.sleep(1.0)  # let any duplicate show up
    jobs = await fetch_jobs(db)
    assert len(jobs) == 12
    assert sorted(job["job_id"] for job in jobs) == sorted(ids)
    assert {(job["state"], job["attempts_made"]) for job in jobs} == {("completed", 1)}
    runs = await fetch_runs(db)
    assert len(runs) == 12
    assert Counter(run["job_id"] for run in runs) == Counter(ids)
    assert {(run["status"], run["attempt"]) for run in runs} == {("success", 1)}
    # The victim's jobs went back through the stalled check and were run again by the survivor.
    assert killed and killed <= _started(second)
    requeued = {e["job_id"] for e in second.events("job_stalled") if e.get("action") == "requeued"}
    assert killed <= requeued
    # Handlers ran again only for the victim's jobs (at-least-once), at most twice.
    executions = Counter(e["job_id"] for e in await fetch_events(db, "sleep"))
    assert set(executions) == set(ids)
    assert {job_id for job_id, n in executions.items() if n > 1} <= killed
    assert max(executions.values()) <= 2
    assert await redis_client.zcard(keys.active) == 0
    assert await redis_client.zcard(keys.wait) == 0


async def test_sigterm_finishes_running_jobs_and_returns_the_rest(
    procs: Processes,
    accept_client: JobScheduler,
    db: asyncpg.Pool,
    accept_tenant: str,
    redis_client: aioredis.Redis,
    keys: QueueKeys,
) -> None:
    """SIGTERM: the 2 running jobs finish, the worker exits 0, the 4 others wait at once."""
    worker = await procs.ready_worker(WORKER_CONCURRENCY=2, DRM_SHUTDOWN_GRACE_S=10)
    ids = await _add(accept_client, accept_tenant, "sleep", [{"s": 1.5, "n": i} for i in range(6)])
    await wait_until(
        lambda: len(worker.events("job_started")) >= 2, timeout=15, procs=[worker],
        what="2 running jobs",
    )  # fmt: skip
    running = _started(worker)
    assert len(running) == 2
    worker.send(signal.SIGTERM)
    assert await wait_exit(worker, timeout=15) == 0
    exited = time.monotonic()
    [stopping] = worker.events("worker_stopping")
    assert stopping["running"] == 2  # the signal reached the worker while both jobs ran

    others = set(ids) - running
    waiting = {m.decode() for m in await redis_client.zrange(keys.wait, 0, -1)}
    states = {job_id: await redis_client.hget(keys.job(job_id), "state") for job_id in others}
    assert time.monotonic() - exited < 2.0
    assert waiting == others
    assert set(states.values()) == {b"waiting"}
    assert await redis_client.zcard(keys.active) == 0
    runs = await fetch_runs(db)
    assert sorted(run["job_id"] for run in runs) == sorted(running)
    assert {run["status"] for run in runs} == {"success"}
    assert _started(worker) == running  # nothing else was started during the shutdown

    fresh = await _fresh_worker_completes_each_once(procs, db, ids)
    assert _started(fresh) == others
    assert Counter(e["job_id"] for e in await fetch_events(db, "sleep")) == Counter(ids)


async def _fresh_worker_completes_each_once(
    procs: Processes, db: asyncpg.Pool, ids: list[str]
) -> Proc:
    """A new worker runs the jobs a stopped one left: each ends with one success row, attempt 1."""
    fresh = await procs.ready_worker(WORKER_CONCURRENCY=4)
    await wait_until(
        _completed(db, len(ids)), timeout=20, procs=[fresh], what=f"{len(ids)} completed jobs"
    )
    await asyncio.sleep(0.5)  # let any duplicate show up
    runs = await fetch_runs(db)
    assert Counter(run["job_id"] for run in runs) == Counter(ids)
    assert {(run["status"], run["attempt"]) for run in runs} == {("success", 1)}
    return fresh


async def test_sigterm_returns_jobs_leased_but_not_yet_handed_to_the_receiver(
    procs: Processes,
    accept_client: JobScheduler,
    db: asyncpg.Pool,
    accept_tenant: str,
    redis_client: aioredis.Redis,
    keys: QueueKeys,
) -> None:
    """SIGTERM while the worker holds leased jobs its receiver has not taken yet (4 leased, one
    slot): the running job finishes, the 3 others wait again at once, none is lost or re-run."""
    # enqueued before the worker starts: its first take leases 4 (a worker started first may
    # take the first job alone, and with one slot it leases no more until that job ends)
    ids = await _add(accept_client, accept_tenant, "sleep", [{"s": 1.5, "n": i} for i in range(6)])
    worker = await procs.ready_worker(
        args=("--max-async-tasks", "1"), WORKER_CONCURRENCY=4, DRM_SHUTDOWN_GRACE_S=10
    )
    await wait_until(
        lambda: worker.events("job_started"), timeout=15, procs=[worker], what="a running job"
    )
    assert await redis_client.zcard(keys.active) == 4  # leased: 1 running, 3 ready in memory
    running = _started(worker)
    worker.send(signal.SIGTERM)
    assert await wait_exit(worker, timeout=15) == 0
    assert _started(worker) == running and len(running) == 1
    waiting = {m.decode() for m in await redis_client.zrange(keys.wait, 0, -1)}
    assert waiting == set(ids) - running
    assert await redis_client.zcard(keys.active) == 0
    returned = {e["job_id"] for e in worker.events("job_returned_to_queue")}
    assert len(returned) == 3 and returned <= waiting

    await _fresh_worker_completes_each_once(procs, db, ids)


async def test_cron_fires_each_slot_once_with_two_schedulers(
    procs: Processes,
    db: asyncpg.Pool,
    accept_tenant: str,
    redis_client: aioredis.Redis,
    keys: QueueKeys,
) -> None:
    """Two schedulers, one SIGKILLed halfway: every 2-second slot runs once, none is missing."""
    env = {"ACCEPT_TICK_CRON": TICK_CRON}
    first = procs.scheduler(**env)
    second = procs.scheduler(**env)
    worker = procs.worker(**env)
    for proc, event in ((first, "scheduler_started"), (second, "scheduler_started"),
                        (worker, "plugin_loaded")):  # fmt: skip
        await procs.wait_event(proc, event)
    schedule_id = f"{accept_tenant}:accept:tick"
    assert await db.fetchval("SELECT cron FROM schedules WHERE schedule_id = $1", schedule_id) == (
        TICK_CRON
    )

    await asyncio.sleep(12)
    first.killpg(signal.SIGKILL)
    killed_ms = int(time.time() * 1000)
    await asyncio.sleep(12)
    second.killpg(signal.SIGKILL)
    stopped_ms = int(time.time() * 1000)

    async def drained() -> bool:
        busy = await redis_client.zcard(keys.wait) + await redis_client.zcard(keys.active)
        return busy == 0

    await wait_until(drained, timeout=10, procs=[worker], what="fired ticks to finish")
    await asyncio.sleep(0.5)  # the ledger flushes every 50 ms

    runs = [run for run in await fetch_runs(db) if run["hook_name"] == "job:tick"]
    pattern = re.compile(rf"^cron:{re.escape(schedule_id)}:(\d+)$")
    slots = []
    for run in runs:
        match = pattern.match(run["job_id"])
        assert match, run["job_id"]
        slots.append(int(match.group(1)))
    duplicates = [slot for slot, n in Counter(slots).items() if n > 1]
    assert duplicates == []
    assert {run["status"] for run in runs} == {"success"}
    slots.sort()
    missing = [s for s in range(slots[0], slots[-1], SLOT_MS) if s not in set(slots)]
    assert missing == []
    assert all(slot % SLOT_MS == 0 for slot in slots)
    assert len(slots) >= 10
    after_kill = [slot for slot in slots if slot > killed_ms]
    assert len(after_kill) >= 4  # the survivor kept firing
    assert slots[-1] >= stopped_ms - 3 * SLOT_MS
    # Each slot's handler ran once (plugin_runs alone could not show a second execution).
    executions = Counter(e["job_id"] for e in await fetch_events(db, "tick"))
    assert sorted(executions) == sorted(run["job_id"] for run in runs)
    assert set(executions.values()) == {1}


async def test_cron_slot_fired_again_after_its_job_finished_does_not_run_again(
    procs: Processes,
    accept_client: JobScheduler,
    db: asyncpg.Pool,
    accept_tenant: str,
    redis_client: aioredis.Redis,
    keys: QueueKeys,
) -> None:
    """A slot fired again by a lagging scheduler after its job finished does not run twice."""
    await procs.ready_worker()
    await accept_client.register_job(
        "accept", "tick", accept_tick, {"cron": TICK_CRON}, tenant_id=accept_tenant
    )
    engine = CronEngine(accept_client.broker, accept_client)
    await engine.load()
    schedule = engine.schedules[f"{accept_tenant}:accept:tick"]
    slot = datetime.fromtimestamp(time.time() // 2 * 2, tz=UTC)
    job_id = f"cron:{schedule.schedule_id}:{int(slot.timestamp() * 1000)}"
    # A second scheduler read cron:last before the first advanced it, then lagged: both fire.
    assert await engine._fire(schedule, slot)
    await wait_until(_completed(db, 1), timeout=15, what="the slot's job to complete")
    await wait_until(
        lambda: _missing(redis_client, keys.job(job_id)), timeout=10, what="the job to leave Redis"
    )
    await engine._fire(schedule, slot)
    await asyncio.sleep(2.0)
    executions = [e for e in await fetch_events(db, "tick") if e["job_id"] == job_id]
    assert len(executions) == 1


async def _missing(redis_client: aioredis.Redis, key: str) -> bool:
    return not await redis_client.exists(key)


# The variable a message names must be the one the user sets: WORKER_CONCURRENCY, not a
# prefixed spelling such as DRM_WORKER_CONCURRENCY.
_NAMES_WORKER_CONCURRENCY = re.compile(r"(?<![A-Za-z0-9_])WORKER_CONCURRENCY\b")


async def test_worker_with_invalid_worker_concurrency_exits_non_zero(procs: Processes) -> None:
    """`taskiq worker` with WORKER_CONCURRENCY=abc exits non-zero, naming the variable."""
    worker = procs.worker(WORKER_CONCURRENCY="abc")
    code = await wait_exit(worker, timeout=15)
    assert code != 0
    assert "WORKER_CONCURRENCY" in worker.stderr()


async def test_scheduler_with_invalid_worker_concurrency_exits_2(procs: Processes) -> None:
    """`taskiq scheduler` with WORKER_CONCURRENCY=abc exits 2 with the variable on stderr."""
    scheduler = procs.scheduler(WORKER_CONCURRENCY="abc")
    assert await wait_exit(scheduler, timeout=15) == 2
    assert "invalid settings" in scheduler.stderr()
    assert "WORKER_CONCURRENCY" in scheduler.stderr()
    assert "Traceback" not in scheduler.stderr()


async def test_invalid_worker_concurrency_message_names_the_variable_as_set(
    procs: Processes,
) -> None:
    """The settings error names WORKER_CONCURRENCY itself, not DRM_WORKER_CONCURRENCY."""
    worker = procs.worker(WORKER_CONCURRENCY="abc")
    await wait_until(
        lambda: "invalid settings" in worker.stderr(), timeout=15, what="the settings error"
    )
    [line] = {line for line in worker.stderr().splitlines() if "invalid settings" in line}
    assert _NAMES_WORKER_CONCURRENCY.search(line), line


async def test_tenant_running_limit_holds_across_two_worker_processes(
    procs: Processes, accept_client: JobScheduler, db: asyncpg.Pool, accept_tenant: str
) -> None:
    """With DRM_TENANT_CONCURRENCY=2, two worker processes never run more than 2 jobs at once."""
    workers = [await procs.ready_worker(DRM_TENANT_CONCURRENCY=2) for _ in range(2)]
    ids = await _add(accept_client, accept_tenant, "sleep", [{"s": 0.3}] * 10)
    await wait_until(_completed(db, 10), timeout=60, procs=workers, what="10 completed jobs")
    runs = await db.fetch(
        "SELECT (result->>'startedAt')::timestamptz AS started,"
        " (result->>'durationMs')::int AS ms FROM plugin_runs"
    )
    assert len(runs) == 10
    points = sorted(
        [(r["started"].timestamp(), 1) for r in runs]
        + [(r["started"].timestamp() + r["ms"] / 1000, -1) for r in runs],
        key=lambda p: (p[0], p[1]),
    )
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    assert peak == 2, f"{peak} jobs of one tenant ran at once"
    assert len({e["pid"] for e in await fetch_events(db, "sleep")}) == 2
    assert len(ids) == 10


async def test_ledger_in_its_own_process_writes_every_row_across_a_restart(
    procs: Processes, accept_client: JobScheduler, db: asyncpg.Pool, accept_tenant: str, keys: Any
) -> None:
    """DRM_LEDGER_IN_WORKER=false: the worker runs jobs and leaves their rows in Redis until a
    `drm-taskiq ledger` process writes them; SIGTERM stops it cleanly (exit 0), and the rows of
    the jobs that ran meanwhile are written by the next one, each exactly once."""
    worker = await procs.ready_worker(DRM_LEDGER_IN_WORKER="false")
    assert (await procs.wait_event(worker, "worker_started"))["ledger"] == "separate"
    first = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(10)])
    redis = accept_client.broker.redis
    await wait_until(
        lambda: _stream_length(redis, keys.ledger, 10), timeout=30, procs=[worker], what="entries"
    )
    assert await count_jobs(db) == 0, "the worker wrote rows although its ledger is off"
    ledger = procs.ledger()
    await procs.wait_event(ledger, "ledger_started")
    await wait_until(_completed(db, 10), timeout=30, procs=[ledger], what="10 rows")
    ledger.send(signal.SIGTERM)
    assert await wait_exit(ledger, timeout=15) == 0
    assert ledger.events("ledger_stopped")
    second = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(10, 20)])
    await wait_until(
        lambda: _stream_length(redis, keys.ledger, 10), timeout=30, procs=[worker], what="entries"
    )
    assert await count_jobs(db) == 10
    again = procs.ledger()
    await wait_until(_completed(db, 20), timeout=30, procs=[again], what="20 rows")
    await asyncio.sleep(0.5)  # let any duplicate show up
    runs = await fetch_runs(db)
    assert Counter(run["job_id"] for run in runs) == Counter(first + second)
    assert await redis.xlen(keys.ledger) == 0


async def _stream_length(redis: aioredis.Redis, key: str, at_least: int) -> bool:
    return int(await redis.xlen(key)) >= at_least


async def test_the_scheduler_writes_the_ledger_and_the_worker_takes_over_when_it_dies(
    procs: Processes, accept_client: JobScheduler, db: asyncpg.Pool, accept_tenant: str, keys: Any
) -> None:
    """A running scheduler is the ledger's dedicated writer: the worker's writer stands by (it
    never reads the stream) while the scheduler writes every row. When the scheduler is killed
    (SIGKILL: its announcement is left to expire), the worker writes again within seconds; after
    a clean stop (SIGTERM) it takes over at once. Every row exactly once.

    A killed writer may still be handed entries by Redis before Redis notices its connection is
    gone (they are pending for it): the worker claims them after DRM_LEDGER_CLAIM_IDLE_MS, short
    here."""
    redis = accept_client.broker.redis
    scheduler = await procs.ready_scheduler()
    assert (await procs.wait_event(scheduler, "scheduler_started"))["ledger"] == "in scheduler"
    worker = await procs.ready_worker(DRM_LEDGER_CLAIM_IDLE_MS=1000)
    worker_id = (await procs.wait_event(worker, "worker_started"))["worker_id"]
    await procs.wait_event(worker, "ledger_standing_by", timeout=10)
    first = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(10)])
    await wait_until(_completed(db, 10), timeout=30, procs=[worker, scheduler], what="10 rows")
    consumers = {c["name"] for c in await redis.xinfo_consumers(keys.ledger, LEDGER_GROUP)}
    assert worker_id.encode() not in consumers and worker_id not in consumers, consumers

    scheduler.killpg(signal.SIGKILL)
    second = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(10, 20)])
    await procs.wait_event(worker, "ledger_writing", timeout=RunLedger.WRITER_TTL_MS / 1000 + 10)
    await wait_until(_completed(db, 20), timeout=30, procs=[worker], what="20 rows")

    again = await procs.ready_scheduler()
    await wait_until(
        lambda: len(worker.events("ledger_standing_by")) == 2, timeout=10, what="standing by"
    )
    again.send(signal.SIGTERM)
    assert await wait_exit(again, timeout=15) == 0
    third = await _add(accept_client, accept_tenant, "echo", [{"n": i} for i in range(20, 25)])
    await wait_until(_completed(db, 25), timeout=30, procs=[worker], what="25 rows")
    assert len(worker.events("ledger_writing")) == 2
    await asyncio.sleep(0.5)  # let any duplicate show up
    runs = await fetch_runs(db)
    assert Counter(run["job_id"] for run in runs) == Counter(first + second + third)


async def test_a_plugin_enabled_for_a_tenant_while_processes_run_fires_its_cron(
    procs: Processes, db: asyncpg.Pool, accept_tenant: str
) -> None:
    """A tenant that enables the plugin while a scheduler and a worker run gets the plugin's
    on_load in both within DRM_PLUGIN_SYNC_S, without a restart: its cron ticks run."""
    env = {"ACCEPT_TICK_CRON": TICK_CRON, "DRM_PLUGIN_SYNC_S": 0.5}
    scheduler = procs.scheduler(**env)
    worker = procs.worker(**env)
    await procs.wait_event(scheduler, "scheduler_started")
    await procs.wait_event(worker, "plugin_loaded")
    await store.ensure_tenant(db, "globex", plugins={"accept": {}})
    for proc in (scheduler, worker):
        await procs.wait_event(proc, "plugin_enabled_loaded", tenant_id="globex")

    async def globex_ticked() -> bool:
        runs = await fetch_runs(db)
        return any(
            r["tenant_id"] == "globex" and r["hook_name"] == "job:tick" and r["status"] == "success"
            for r in runs
        )

    await wait_until(globex_ticked, timeout=20, procs=[scheduler, worker], what="a globex tick")
    await asyncio.sleep(1.2)  # two more syncs: on_load is not called again
    for proc in (scheduler, worker):
        assert [e["tenant_id"] for e in proc.events("plugin_enabled_loaded")] == ["globex"]
