"""Failed-job administration, schedule introspection and pruning, refused jobs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq import JobScheduler, define_plugin, store
from drm_taskiq.cron import CronEngine
from drm_taskiq.errors import UnknownJobError
from drm_taskiq.redis_queue import LEDGER_GROUP, Settlement, now_ms
from drm_taskiq.settings import Settings
from tests.conftest import started_client, wait_for
from tests.support.processes import binary, process_env

pytestmark = pytest.mark.asyncio

calls: dict[str, int] = {}


async def fails_until_fixed(ctx: Any, job: Any) -> str:
    calls[job.id] = calls.get(job.id, 0) + 1
    if not ctx.config.get("fixed"):
        raise RuntimeError("not fixed yet")
    return "fixed"


async def setup(s: JobScheduler) -> None:
    await s.register_job("testp", "fix", fails_until_fixed, {"attempts": 2})


async def test_failed_jobs_listed_and_retried(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A failed job stays queryable, is listed, and retry_job runs it again to completion."""
    await setup(client)
    worker = await start_worker(setup)
    job_id = await client.add_job("testp", "fix", {"k": 1}, {"priority": 3}, tenant_id=tenant)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs WHERE state = 'failed'"))
    failed = await client.list_failed("testp", tenant_id=tenant)
    assert [f.id for f in failed] == [job_id]
    assert failed[0].attempts_made == 2
    assert failed[0].failed_reason == "RuntimeError: not fixed yet"
    assert await client.list_failed("testp", tenant_id="other") == []
    await db.execute("UPDATE tenant_plugins SET config = '{\"fixed\": true}'")
    worker.scheduler.forget_cached()
    await client.for_tenant(tenant).retry_job("testp", "fix", job_id)
    await wait_for(
        lambda: db.fetchval("SELECT state = 'completed' FROM jobs WHERE job_id = $1", job_id)
    )
    status = await client.get_job_status("testp", "fix", job_id)
    assert status is not None
    assert (status.state, status.returnvalue) == ("completed", "fixed")
    runs = await db.fetch("SELECT status, result FROM plugin_runs ORDER BY executed_at")
    assert [r["status"] for r in runs] == ["error", "error", "success"]
    last = json.loads(runs[-1]["result"])
    assert (last["attempt"], last["generation"]) == (1, 1)
    assert await client.list_failed("testp", tenant_id=tenant) == []
    assert not await client.retry_job("testp", "fix", job_id)


async def test_jobs_of_disabled_plugin_are_refused(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job whose plugin was disabled for the tenant after enqueueing is refused, not run."""
    ran: list[str] = []

    async def handler(ctx: Any, job: Any) -> None:
        ran.append(job.id)

    async def register(s: JobScheduler) -> None:
        await s.register_job("testp", "h", handler, {"attempts": 3})

    await register(client)
    job_id = await client.add_job("testp", "h", None, tenant_id=tenant)
    await db.execute("UPDATE tenant_plugins SET enabled = FALSE")
    await start_worker(register)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    status = await client.get_job_status("testp", "h", job_id)
    assert status is not None
    assert status.state == "failed"
    assert status.attempts_made == 1
    assert "refused" in (status.failed_reason or "")
    assert ran == []


async def noop(ctx: Any, job: Any) -> None:
    return None


async def test_list_schedules_with_next_runs_and_last_status(
    client: JobScheduler, tenant: str, start_worker: Any, db: asyncpg.Pool
) -> None:
    """list_schedules shows next fire times in the schedule's zone, last fire and its status."""
    scoped = client.for_tenant(tenant)
    await scoped.register_job("testp", "hourly", noop, {"cron": "0 9 * * *", "tz": "Asia/Tokyo"})
    [info] = await scoped.list_schedules(count=3)
    assert info.cron == "0 9 * * *"
    assert len(info.next_runs) == 3
    assert all(run.astimezone(UTC).hour == 0 for run in info.next_runs)
    assert info.next_runs[1] - info.next_runs[0] == timedelta(days=1)
    assert (info.last_fired, info.last_status) == (None, None)

    engine = CronEngine(client.broker, client)
    now = datetime.now(UTC)
    await engine.tick(now - timedelta(days=2))
    await engine.tick(now)
    [info] = await scoped.list_schedules()
    assert info.last_fired is not None
    assert info.last_status == "waiting"
    await start_worker(lambda s: s.register_job("testp", "hourly", noop))
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    [info] = await scoped.list_schedules()
    assert info.last_status == "completed"


async def test_prune_removes_orphaned_and_disabled_schedules(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """Schedules of vanished plugins or disabled tenants are removed at scheduler start-up."""
    from drm_taskiq import store

    await store.ensure_tenant(db, "other", plugins={"testp": {}, "gone": {}})
    await client.for_tenant(tenant).register_job("testp", "a", noop, {"cron": "* * * * *"})
    await client.for_tenant("other").register_job("testp", "a", noop, {"cron": "* * * * *"})
    await client.for_tenant("other").register_job("gone", "b", noop, {"cron": "* * * * *"})
    await db.execute("UPDATE tenant_plugins SET enabled = FALSE WHERE tenant_id = 'other'")
    client.loaded_plugins["testp"] = define_plugin(id="testp", name="t", version="1")
    pruned = await client.prune_schedules()
    assert sorted(pruned) == ["other:gone:b", "other:testp:a"]
    assert await db.fetchval("SELECT array_agg(schedule_id) FROM schedules") == [
        f"{tenant}:testp:a"
    ]


async def test_prune_keeps_unknown_plugins_when_a_plugin_failed_to_load(
    client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """If a plugin failed to load, schedules of unknown plugins are reported, not deleted."""
    await client.for_tenant(tenant).register_job("testp", "a", noop, {"cron": "* * * * *"})
    client.plugin_load_errors.append("broken")
    assert await client.prune_schedules() == []
    assert await db.fetchval("SELECT count(*) FROM schedules") == 1


async def test_overlap_skip_skips_while_previous_run_waits(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """With overlap=skip a slot is skipped while the previous run is still waiting."""
    await client.for_tenant(tenant).register_job(
        "testp", "o", noop, {"cron": "* * * * * *", "overlap": "skip"}
    )
    engine = CronEngine(client.broker, client)
    base = datetime(2030, 1, 1, tzinfo=UTC)
    for step in range(5):
        await engine.tick(base + timedelta(seconds=step, milliseconds=10))
    assert await redis_client.zcard(client.broker.queue.keys.wait) == 1


async def test_jobs_of_a_deleted_tenant_are_refused_and_the_worker_goes_on(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job whose tenant was deleted is refused (logged), and later jobs still run."""
    from structlog.testing import capture_logs

    from drm_taskiq import store

    ran: list[str] = []

    async def handler(ctx: Any, job: Any) -> None:
        ran.append(ctx.tenant_id)

    async def register(s: JobScheduler) -> None:
        await s.register_job("testp", "h", handler)

    await register(client)
    await store.ensure_tenant(db, "gone", plugins={"testp": {}})
    doomed = await client.add_job("testp", "h", None, tenant_id="gone")
    await db.execute("DELETE FROM tenants WHERE tenant_id = 'gone'")
    with capture_logs() as logs:
        await start_worker(register)
        await wait_for(lambda: [e for e in logs if e["event"] == "job_refused"], timeout=10)
        await client.add_job("testp", "h", None, tenant_id=tenant)
        await wait_for(lambda: ran == [tenant], timeout=10)
    [refused] = [e for e in logs if e["event"] == "job_refused"]
    assert (refused["job_id"], refused["tenant_id"]) == (doomed, "gone")
    assert await db.fetchval("SELECT count(*) FROM plugin_runs WHERE tenant_id = 'gone'") == 0


def _cli(settings: Settings, *args: str) -> list[str]:
    """``drm-taskiq ARGS`` against the test's schema and key prefix: its output lines."""
    env = process_env(settings, "tests.plugins.accept:plugin")
    done = subprocess.run(
        [binary("drm-taskiq"), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


async def test_dead_lettered_jobs_are_listed_and_purged(
    client: JobScheduler,
    start_worker: Any,
    redis_client: Any,
    db: asyncpg.Pool,
    tenant: str,
    settings: Settings,
) -> None:
    """Jobs whose message does not decode are dead-lettered (each attempt has its plugin_runs
    row): listed oldest first with their state and reason (not their message); purging empties
    the list in steps and deletes the ones still failed, not one retried since (or gone)."""
    queue = client.broker.queue
    keys = queue.keys
    ids = ["p1", "p2", "p3"]
    for job_id in ids:
        await redis_client.hset(
            keys.job(job_id),
            mapping={"msg": b"\xff\x00garbage", "pri": 0, "tenant": tenant, "plugin": "testp"},
        )
        await redis_client.zadd(keys.wait, {job_id: 0})
    await start_worker(None)
    await wait_for(lambda: _dead_count(redis_client, keys.dead, 3))
    dead = await client.list_dead(limit=10)
    assert [d["id"] for d in dead] == ids
    assert {d["state"] for d in dead} == {"failed"}
    assert all("not registered" in d["reason"] for d in dead)
    assert all("msg" not in d for d in dead)
    await wait_for(lambda: db.fetchval("SELECT count(*) = 3 FROM plugin_runs"))  # each attempt
    assert {r["error"] for r in await db.fetch("SELECT error FROM plugin_runs")} == {
        "message could not be decoded or its task is not registered"
    }
    assert [d["id"] for d in await client.list_dead(limit=2)] == ["p1", "p2"]
    lines = _cli(settings, "dead")
    assert lines[-1] == "3 dead-lettered job(s)"
    assert [line.split()[:3] for line in lines[:-1]] == [[i, "failed", tenant] for i in ids]

    await redis_client.hset(keys.job("p2"), "state", "waiting")  # as retry_job leaves it
    await redis_client.delete(keys.job("p3"))
    assert [d["state"] for d in await client.list_dead()] == ["failed", "waiting", "gone"]
    assert await queue.purge_dead(per_call=2) == (3, 1)
    assert await redis_client.llen(keys.dead) == 0
    assert not await redis_client.exists(keys.job("p1"))
    assert await redis_client.hget(keys.job("p2"), "state") == b"waiting"
    assert await client.list_dead() == []
    await redis_client.rpush(keys.dead, "p4")
    await redis_client.hset(keys.job("p4"), mapping={"state": "failed", "tenant": tenant})
    assert _cli(settings, "dead", "--purge") == ["removed 1 dead-letter entry, deleted 1 job(s)"]
    assert not await redis_client.exists(keys.job("p4"))
    assert await client.purge_dead() == (0, 0)


async def _dead_count(redis_client: Any, key: str, n: int) -> bool:
    return int(await redis_client.llen(key)) >= n


async def test_a_plugin_enabled_for_a_tenant_at_run_time_is_loaded_for_it(
    settings: Settings, db: asyncpg.Pool, tenant: str
) -> None:
    """sync_plugins calls on_load for the tenants that enabled a plugin after the process
    loaded it (once each; not for a disabled one), so their cron jobs are registered without a
    restart; the background sync (DRM_PLUGIN_SYNC_S) does it by itself."""
    loads: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        return None

    async def on_load(ctx: Any) -> None:
        loads.append(ctx.tenant_id)
        await ctx.scheduler.register_job("synced", "nightly", work, {"cron": "0 2 * * *"})

    plugin = define_plugin(id="synced", name="s", version="1", on_load=on_load)
    await store.ensure_tenant(db, tenant, plugins={"synced": {}})
    async with started_client(settings.model_copy(update={"plugin_sync_s": 0.2}), [plugin]) as s:
        assert loads == [tenant]
        assert await s.sync_plugins() == 0
        await store.ensure_tenant(db, "globex", plugins={"synced": {}})
        await store.ensure_tenant(db, "initech", plugins={"synced": {}})
        await db.execute("UPDATE tenant_plugins SET enabled = false WHERE tenant_id = 'initech'")
        assert await s.sync_plugins() == 1
        assert loads == [tenant, "globex"]
        assert await s.sync_plugins() == 0
        rows = await db.fetch("SELECT tenant_id FROM schedules ORDER BY tenant_id")
        assert [r["tenant_id"] for r in rows] == [tenant, "globex"]

        s.start_plugin_sync()
        await store.ensure_tenant(db, "umbrella", plugins={"synced": {}})
        await wait_for(lambda: "umbrella" in loads, timeout=10)
        await s.stop_plugin_sync()
    assert loads == [tenant, "globex", "umbrella"]


async def test_a_plugin_disabled_for_a_tenant_at_run_time_is_unloaded_for_it(
    settings: Settings, db: asyncpg.Pool, tenant: str
) -> None:
    """sync_plugins calls on_unload for a tenant that disabled a plugin (or was deleted) since
    the process loaded it for that tenant, once, and removes the plugin's schedules there; the
    other tenants keep theirs. Enabled again, it is loaded again."""
    calls: list[tuple[str, str]] = []

    async def work(ctx: Any, job: Any) -> None:
        return None

    async def on_load(ctx: Any) -> None:
        calls.append(("load", ctx.tenant_id))
        await ctx.scheduler.register_job("toggled", "nightly", work, {"cron": "0 2 * * *"})

    configs: list[dict[str, Any]] = []

    async def on_unload(ctx: Any) -> None:
        calls.append(("unload", ctx.tenant_id))
        configs.append(dict(ctx.config))

    plugin = define_plugin(
        id="toggled", name="t", version="1", on_load=on_load, on_unload=on_unload
    )
    await store.ensure_tenant(db, tenant, plugins={"toggled": {}})
    await store.ensure_tenant(db, "globex", plugins={"toggled": {"region": "eu"}})

    async def scheduled() -> list[str]:
        rows = await db.fetch(
            "SELECT tenant_id FROM schedules WHERE plugin_id = 'toggled' ORDER BY tenant_id"
        )
        return [r["tenant_id"] for r in rows]

    async with started_client(settings, [plugin]) as s:
        assert sorted(calls) == [("load", tenant), ("load", "globex")]
        calls.clear()
        await db.execute(
            "UPDATE tenant_plugins SET enabled = false"
            " WHERE tenant_id = 'globex' AND plugin_id = 'toggled'"
        )
        assert await s.sync_plugins() == 0  # nothing loaded; one unloaded
        assert calls == [("unload", "globex")]
        assert configs == [{"region": "eu"}]  # the configuration it was loaded with
        assert await scheduled() == [tenant]
        assert await s.sync_plugins() == 0
        assert calls == [("unload", "globex")]  # once
        await db.execute(
            "UPDATE tenant_plugins SET enabled = true"
            " WHERE tenant_id = 'globex' AND plugin_id = 'toggled'"
        )
        assert await s.sync_plugins() == 1
        assert calls == [("unload", "globex"), ("load", "globex")]
        assert await scheduled() == sorted([tenant, "globex"])


async def test_a_job_of_a_plugin_enabled_after_the_worker_started_runs(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str, redis_client: Any
) -> None:
    """A worker started while no tenant had the plugin enabled does not know its jobs. A job of
    it taken after a tenant enabled it, before the worker's next periodic sync, is not
    dead-lettered: the worker syncs at once, the job waits again (no attempt counted) and runs."""
    ran: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        ran.append(job.id)

    async def on_load(ctx: Any) -> None:
        await ctx.scheduler.register_job("late", "w", work)

    plugin = define_plugin(id="late", name="l", version="1", on_load=on_load)

    def setup(s: JobScheduler) -> None:
        s.loaded_plugins["late"] = plugin  # loaded; no tenant had it enabled: no on_load ran

    worker = await start_worker(setup)
    assert worker.broker.find_task("plugin:late:w") is None
    await store.ensure_tenant(db, tenant, plugins={"late": {}})
    await client.register_job("late", "w", work)
    with capture_logs() as logs:
        job_id = await client.add_job("late", "w", {"n": 1}, tenant_id=tenant)
        await wait_for(lambda: ran == [job_id], timeout=20)
        await wait_for(
            lambda: db.fetchval("SELECT state = 'completed' FROM jobs WHERE job_id = $1", job_id)
        )
    events = [e["event"] for e in logs]
    assert "job_requeued_task_registered" in events
    assert "job_dead_lettered" not in events
    assert await redis_client.llen(client.broker.queue.keys.dead) == 0
    runs = await db.fetch("SELECT status FROM plugin_runs")
    assert [r["status"] for r in runs] == ["success"]  # the requeue is not an attempt


async def test_add_job_knows_a_plugin_enabled_after_the_client_started(
    settings: Settings, db: asyncpg.Pool, tenant: str
) -> None:
    """A client (an application) started while no tenant had the plugin enabled: add_job for a
    tenant that enabled it since syncs and enqueues (two at once: both), instead of raising
    UnknownJobError; a job of a plugin still enabled nowhere is refused as before."""

    async def work(ctx: Any, job: Any) -> None:
        return None

    async def on_load(ctx: Any) -> None:
        await ctx.scheduler.register_job("late", "w", work)

    plugin = define_plugin(id="late", name="l", version="1", on_load=on_load)
    async with started_client(settings, [plugin]) as client:
        assert client.broker.find_task("plugin:late:w") is None
        with pytest.raises(UnknownJobError):
            await client.add_job("late", "w", {"n": 0}, tenant_id=tenant)
        await store.ensure_tenant(db, tenant, plugins={"late": {}})
        await asyncio.sleep(1.1)  # the refusal just above synced: one on-demand sync a second
        ids = await asyncio.gather(  # the second waits for the first one's sync
            *(client.add_job("late", "w", {"n": n}, tenant_id=tenant) for n in (1, 2))
        )
        for job_id in ids:
            status = await client.get_job_status("late", "w", job_id)
            assert status is not None and status.state == "waiting"


async def test_queue_stats_show_the_queue_at_a_glance(
    client: JobScheduler, redis_client: Any, settings: Settings, tenant: str
) -> None:
    """queue_stats (and ``drm-taskiq queue``, which needs Redis only): jobs per state, the age
    of the job first in line, the next delayed job's due time, running jobs per tenant, the
    ledger's unwritten and read entries, dead letters and paused plugins."""
    queue = client.broker.queue
    empty = await client.queue_stats()
    assert empty == {
        "queue": settings.queue,
        "waiting": 0,
        "delayed": 0,
        "active": 0,
        "next_waiting_age_ms": None,
        "next_delayed_due_in_ms": None,
        "running_per_tenant": {},
        "ledger": {"unwritten": 0, "being_written": 0, "dedicated_writer": False},
        "dead": 0,
        "paused": 0,
        "workers": [],
    }

    async def enqueue(job_id: str, delay_ms: int = 0) -> None:
        await queue.enqueue(
            job_id, b"{}", priority=0, delay_ms=delay_ms, dedup_ttl_ms=0, fields={"tenant": tenant}
        )

    for job_id in ("a", "b", "c"):
        await enqueue(job_id)
    await enqueue("later", delay_ms=60_000)
    [taken], _ = await queue.take("w:1", 1, 30_000)
    await queue.finish_many([Settlement(taken, "completed", "null", 0, None, now_ms())])
    [running], _ = await queue.take("w:2", 1, 30_000)
    await asyncio.sleep(0.05)
    await redis_client.rpush(queue.keys.dead, "x")
    await redis_client.sadd(queue.keys.paused, f"{tenant}:testp")
    stats = await client.queue_stats()
    assert (stats["waiting"], stats["delayed"], stats["active"]) == (1, 1, 1)
    assert 50 <= stats["next_waiting_age_ms"] < 60_000  # "c" has waited since it was enqueued
    assert 0 < stats["next_delayed_due_in_ms"] <= 60_000
    assert stats["running_per_tenant"] == {tenant: 1}
    assert stats["ledger"] == {"unwritten": 1, "being_written": 0, "dedicated_writer": False}
    assert (stats["dead"], stats["paused"]) == (1, 1)
    assert running.job_id == "b"

    # a writer has read the entry and not written it yet
    await redis_client.xgroup_create(queue.keys.ledger, LEDGER_GROUP, id="0", mkstream=True)
    await redis_client.xreadgroup(LEDGER_GROUP, "w", {queue.keys.ledger: ">"}, count=10)
    await redis_client.set(queue.keys.ledger_writer, "w", px=5000)
    printed = json.loads("\n".join(_cli(settings, "queue")))
    assert printed["ledger"] == {"unwritten": 1, "being_written": 1, "dedicated_writer": True}
    assert (printed["waiting"], printed["active"]) == (1, 1)


async def test_the_age_of_the_job_first_in_line_counts_from_its_return_to_waiting(
    client: JobScheduler, tenant: str
) -> None:
    """next_waiting_age_ms measures how long the job first in line has been ready to run: for a
    job put back after a stall (or a delay over, a retry) from then, not from its creation."""
    queue = client.broker.queue
    await queue.enqueue(
        "s", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={"tenant": tenant}
    )
    [_], _ = await queue.take("gone:1", 1, 1000)  # a worker that dies with it
    await asyncio.sleep(1.2)  # the lease runs out
    [stalled] = await queue.recover_stalled("checker", 3, 100) or []
    assert stalled.action == "requeued"
    stats = await client.queue_stats()
    assert stats["waiting"] == 1
    assert stats["next_waiting_age_ms"] < 1000  # created over 1.2 s ago, ready again just now


async def test_live_workers_are_listed_and_gone_ones_forgotten(
    client: JobScheduler, start_worker: Any, redis_client: Any, settings: Settings
) -> None:
    """A worker records itself every few seconds (host, pid, start, jobs held, capacity):
    queue_stats lists it while it runs and not once it stopped; an entry not renewed for
    WORKER_GONE_MS is not listed, and a live worker's next heartbeat deletes it."""
    key = client.broker.queue.keys.workers
    old = json.dumps({"host": "h", "pid": 1, "started": 0, "capacity": 1, "running": 0, "seen": 1})
    await redis_client.hset(key, "dead-worker", old)
    assert (await client.queue_stats())["workers"] == []
    handle = await start_worker(None, worker_concurrency=7)

    async def listed() -> list[dict[str, Any]]:
        return list((await client.queue_stats())["workers"])

    [worker] = await wait_for(listed, timeout=10)
    assert worker["id"] == handle.broker.worker_id
    assert (worker["pid"], worker["capacity"], worker["running"]) == (os.getpid(), 7, 0)
    assert worker["started"] <= worker["seen"] <= now_ms()
    assert await redis_client.hexists(key, "dead-worker") == 0  # dropped by the heartbeat
    await handle.stop()
    assert await listed() == []
