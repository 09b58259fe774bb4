"""The cron engine's batch path against real Redis and PostgreSQL: many schedules in one slot,
two schedulers splitting the work, failed chunks, claims of a dead scheduler, reloads."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs
from taskiq import BrokerMessage, TaskiqMessage, TaskiqMiddleware

from drm_taskiq import JobScheduler
from drm_taskiq.cron import CLAIM_TTL_MS, CronEngine
from drm_taskiq.options import task_name

pytestmark = pytest.mark.asyncio

SLOT = datetime(2030, 1, 1, 0, 1, tzinfo=UTC)  # a '* * * * *' slot
SLOT_MS = int(SLOT.timestamp() * 1000)


async def noop(ctx: Any, job: Any) -> None:
    return None


async def _insert_schedules(db: asyncpg.Pool, count: int, per_tenant: int = 100) -> list[str]:
    """``count`` '* * * * *' schedules of plugin testp, ``per_tenant`` per tenant, as
    register_job stores them (inserted directly: register_job limits schedules per tenant)."""
    tenants = math.ceil(count / per_tenant)
    await db.execute(
        "INSERT INTO tenants (tenant_id) SELECT 'scale' || t FROM generate_series(1, $1::int) t",
        tenants,
    )
    await db.execute(
        "INSERT INTO tenant_plugins (tenant_id, plugin_id, enabled)"
        " SELECT 'scale' || t, 'testp', TRUE FROM generate_series(1, $1::int) t",
        tenants,
    )
    rows = await db.fetch(
        "INSERT INTO schedules (schedule_id, tenant_id, plugin_id, job_name, cron, tz, options)"
        " SELECT 'scale' || (n / $2 + 1) || ':testp:c' || (n % $2), 'scale' || (n / $2 + 1),"
        " 'testp', 'c' || (n % $2), '* * * * *', 'UTC', '{}'::jsonb"
        " FROM generate_series(0, $1::int - 1) n RETURNING schedule_id",
        count,
        per_tenant,
    )
    return [row["schedule_id"] for row in rows]


async def _slot_jobs(client: JobScheduler, redis_client: Any, slot_ms: int) -> list[str]:
    members = await redis_client.zrange(client.broker.queue.keys.wait, 0, -1)
    return [m.decode() for m in members if m.decode().endswith(f":{slot_ms}")]


def _fired(logs: list[dict[str, Any]]) -> tuple[int, int]:
    events = [e for e in logs if e["event"] == "schedules_fired"]
    return sum(e["count"] for e in events), sum(e["duplicates"] for e in events)


async def test_two_engines_split_a_slot_and_fire_each_schedule_once(
    client: JobScheduler, db: asyncpg.Pool, redis_client: Any
) -> None:
    """Two schedulers ticking together on 1,000 schedules enqueue one job per schedule."""
    ids = await _insert_schedules(db, 1000)
    first = CronEngine(client.broker, client, chunk_size=100)
    second = CronEngine(client.broker, client, chunk_size=100)
    start = SLOT - timedelta(seconds=30)
    await asyncio.gather(first.tick(start), second.tick(start))
    assert await redis_client.hlen(first.last_key) == 1000
    with capture_logs() as logs:
        for offset_ms in (50, 700, 1400):  # the slot, then the re-checks of claimed chunks
            now = SLOT + timedelta(milliseconds=offset_ms)
            await asyncio.wait_for(asyncio.gather(first.tick(now), second.tick(now)), 60)
    jobs = await _slot_jobs(client, redis_client, SLOT_MS)
    assert sorted(jobs) == sorted(f"cron:{sid}:{SLOT_MS}" for sid in ids)
    assert _fired(logs) == (1000, 0)  # every job created once, no wasted enqueue
    fired_by = [e for e in logs if e["event"] == "schedules_fired"]
    assert all(e["slot"] == SLOT.isoformat() for e in fired_by)
    last = await redis_client.hvals(first.last_key)
    assert Counter(int(v) for v in last) == {SLOT_MS: 1000}
    lastjob = await redis_client.hgetall(first.lastjob_key)
    assert {k.decode(): v.decode() for k, v in lastjob.items()} == {
        sid: f"cron:{sid}:{SLOT_MS}" for sid in ids
    }
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


async def test_a_failed_chunk_is_retried_at_the_next_tick(
    client: JobScheduler, db: asyncpg.Pool, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enqueue pipeline that fails leaves its schedules unfired; the next tick fires them."""
    ids = await _insert_schedules(db, 300)
    engine = CronEngine(client.broker, client, chunk_size=100)
    await engine.tick(SLOT - timedelta(seconds=30))
    real = client.broker.queue.enqueue_many
    calls = 0

    async def flaky(requests: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("connection reset")
        return await real(requests)

    monkeypatch.setattr(client.broker.queue, "enqueue_many", flaky)
    with capture_logs() as logs:
        await engine.tick(SLOT + timedelta(milliseconds=50))
    [failed] = [e for e in logs if e["event"] == "schedules_fire_failed"]
    assert failed["chunks"] == 1
    lost = failed["schedules"]
    assert 0 < lost < 300
    assert len(await _slot_jobs(client, redis_client, SLOT_MS)) == 300 - lost
    last = [int(v) for v in await redis_client.hmget(engine.last_key, ids)]
    assert sum(1 for v in last if v < SLOT_MS) == lost  # not marked fired

    with capture_logs() as logs:
        await engine.tick(SLOT + timedelta(milliseconds=1100))
    assert _fired(logs) == (lost, 0)
    jobs = await _slot_jobs(client, redis_client, SLOT_MS)
    assert sorted(jobs) == sorted(f"cron:{sid}:{SLOT_MS}" for sid in ids)
    last = [int(v) for v in await redis_client.hmget(engine.last_key, ids)]
    assert set(last) == {SLOT_MS}


async def test_every_chunk_failing_raises_and_nothing_is_lost(
    client: JobScheduler, db: asyncpg.Pool, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Redis refuses every chunk the tick raises (the loop backs off); a later tick fires."""
    ids = await _insert_schedules(db, 50)
    engine = CronEngine(client.broker, client)
    await engine.tick(SLOT - timedelta(seconds=30))
    real = client.broker.queue.enqueue_many

    async def down(requests: Any) -> Any:
        raise RedisConnectionError("connection refused")

    monkeypatch.setattr(client.broker.queue, "enqueue_many", down)
    with pytest.raises(RedisConnectionError):
        await engine.tick(SLOT + timedelta(milliseconds=50))
    monkeypatch.setattr(client.broker.queue, "enqueue_many", real)
    await engine.tick(SLOT + timedelta(milliseconds=1100))
    jobs = await _slot_jobs(client, redis_client, SLOT_MS)
    assert sorted(jobs) == sorted(f"cron:{sid}:{SLOT_MS}" for sid in ids)


async def test_chunks_claimed_by_a_dead_scheduler_fire_after_the_claim_expires(
    client: JobScheduler, db: asyncpg.Pool, redis_client: Any
) -> None:
    """A scheduler that claimed chunks and died delays them by the claim's lifetime only."""
    ids = await _insert_schedules(db, 200)
    engine = CronEngine(client.broker, client, chunk_size=100)
    await engine.tick(SLOT - timedelta(seconds=30))
    for index in range(2):  # what a scheduler that died right after claiming leaves behind
        key = f"{engine.claim_prefix}:{SLOT_MS}:2:{index}"
        await redis_client.set(key, "dead-scheduler", px=CLAIM_TTL_MS)
    with capture_logs() as logs:
        await engine.tick(SLOT + timedelta(milliseconds=50))
    assert await _slot_jobs(client, redis_client, SLOT_MS) == []
    assert _fired(logs) == (0, 0)
    await asyncio.sleep(CLAIM_TTL_MS / 1000 + 0.1)
    with capture_logs() as logs:
        await engine.tick(SLOT + timedelta(milliseconds=600))
    assert _fired(logs) == (200, 0)
    jobs = await _slot_jobs(client, redis_client, SLOT_MS)
    assert sorted(jobs) == sorted(f"cron:{sid}:{SLOT_MS}" for sid in ids)


async def test_batch_message_is_what_kiq_sends(
    client: JobScheduler, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cron firing sends the bytes and job fields that AsyncKicker.kiq would send."""
    scoped = client.for_tenant(tenant)
    await scoped.register_job(
        "testp", "beat", noop, {"cron": "* * * * *", "priority": 7, "attempts": 3, "timeout": 9000}
    )
    engine = CronEngine(client.broker, client)
    await engine.load()
    schedule = engine.schedules[f"{tenant}:testp:beat"]
    template = await engine._template(schedule)
    request = await engine._request(schedule, template, SLOT_MS)

    sent: list[BrokerMessage] = []

    async def capture(message: BrokerMessage) -> None:
        sent.append(message)

    monkeypatch.setattr(client.broker, "kick", capture)
    labels = {**schedule.labels, "dedup": 3600, "schedule_id": schedule.schedule_id}
    await (
        client.broker.find_task(task_name("testp", "beat"))  # type: ignore[union-attr]
        .kicker()
        .with_labels(**labels)
        .with_task_id(request.job_id)
        .kiq(*schedule.args, **schedule.kwargs)
    )
    [kicked] = sent
    assert request.message == kicked.message
    assert request.fields == {
        "name": kicked.task_name,
        "plugin": "testp",
        "job": "beat",
        "tenant": tenant,
    }
    assert (request.priority, request.delay_ms, request.dedup_ttl_ms) == (7, 0, 3_600_000)
    decoded = client.broker.formatter.loads(request.message)
    assert decoded.task_id == f"cron:{tenant}:testp:beat:{SLOT_MS}"
    assert decoded.kwargs == {"tenant_id": tenant}


async def test_table_is_re_read_only_when_it_changed(
    client: JobScheduler, tenant: str, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polls read a fingerprint; the rows are re-read after a change, and only then."""
    engine = CronEngine(client.broker, client)
    await engine.load()
    loads = 0
    real = engine.load

    async def counted() -> None:
        nonlocal loads
        loads += 1
        await real()

    monkeypatch.setattr(engine, "load", counted)

    async def poll() -> None:
        engine._loaded_at = 0  # the poll interval has passed
        await engine.tick(datetime.now(UTC))

    await poll()
    await poll()
    assert loads == 0
    await client.for_tenant(tenant).register_job("testp", "beat", noop, {"cron": "* * * * *"})
    await poll()
    assert loads == 1
    assert set(engine.schedules) == {f"{tenant}:testp:beat"}
    await poll()
    assert loads == 1
    await db.execute("UPDATE schedules SET cron = '*/5 * * * *'")  # even without updated_at
    await poll()
    assert (loads, engine.schedules[f"{tenant}:testp:beat"].cron) == (2, "*/5 * * * *")
    await db.execute("UPDATE tenant_plugins SET enabled = FALSE WHERE tenant_id = $1", tenant)
    await poll()
    assert (loads, engine.schedules) == (3, {})


async def test_other_middlewares_see_every_cron_firing(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """A middleware added to the broker changes cron messages (pre_send) and sees them sent."""
    sent: list[str] = []

    class Stamp(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            message.labels["stamp"] = f"for-{message.task_id}"
            return message

        def post_send(self, message: TaskiqMessage) -> None:
            sent.append(message.task_id)

    client.broker.add_middlewares(Stamp())
    await client.for_tenant(tenant).register_job("testp", "beat", noop, {"cron": "* * * * *"})
    engine = CronEngine(client.broker, client)
    await engine.tick(SLOT - timedelta(seconds=30))
    await engine.tick(SLOT + timedelta(milliseconds=50))
    job_id = f"cron:{tenant}:testp:beat:{SLOT_MS}"
    assert sent == [job_id]
    raw = await redis_client.hget(client.broker.queue.keys.job(job_id), "msg")
    message = client.broker.formatter.loads(raw)
    assert (message.task_id, message.labels["stamp"]) == (job_id, f"for-{job_id}")
