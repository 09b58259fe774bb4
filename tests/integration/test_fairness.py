"""Fairness between tenants within a priority, and per-tenant running limits."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from drm_taskiq import JobScheduler, store
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


async def test_small_tenant_not_starved_by_a_backlog(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """B's 50 jobs, queued after A's 5,000, all start before A's backlog is a tenth done."""
    await store.ensure_tenant(db, "small", plugins={"testp": {}})
    started: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        started.append(ctx.tenant_id)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    task = client.broker.find_task("plugin:testp:w")
    assert task is not None
    for start in range(0, 5000, 500):
        await asyncio.gather(*(task.kiq(start + i, tenant_id=tenant) for i in range(500)))
    for i in range(50):
        await client.add_job("testp", "w", i, tenant_id="small")
    await start_worker(setup, worker_concurrency=20)
    await wait_for(lambda: started.count("small") == 50, timeout=120)
    a_done = started[: max(i for i, t in enumerate(started) if t == "small") + 1].count(tenant)
    assert a_done < 500, f"{a_done} of A's jobs started before B's last one"


async def test_priority_still_beats_fairness(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A lower priority number runs first whatever the tenant; FIFO holds within a tenant."""
    await store.ensure_tenant(db, "other", plugins={"testp": {}})
    order: list[tuple[str, int]] = []

    async def work(ctx: Any, job: Any) -> None:
        order.append((ctx.tenant_id, job.data))

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    for i in range(5):
        await client.add_job("testp", "w", i, {"priority": 5}, tenant_id=tenant)
    for i in range(5):
        await client.add_job("testp", "w", 100 + i, {"priority": 1}, tenant_id="other")
    await start_worker(setup, worker_concurrency=1)
    await wait_for(lambda: len(order) == 10)
    assert [t for t, _ in order[:5]] == ["other"] * 5
    assert [d for t, d in order if t == tenant] == [0, 1, 2, 3, 4]


async def test_tenant_running_limit_across_two_workers(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """With a limit of 2 for one tenant, two workers never run more than 2 of its jobs at once."""
    await store.ensure_tenant(db, "free", plugins={"testp": {}})
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def work(ctx: Any, job: Any) -> None:
        running[ctx.tenant_id] = running.get(ctx.tenant_id, 0) + 1
        peak[ctx.tenant_id] = max(peak.get(ctx.tenant_id, 0), running[ctx.tenant_id])
        await asyncio.sleep(0.05)
        running[ctx.tenant_id] -= 1

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    await client.set_tenant_concurrency(tenant, 2)
    for i in range(30):
        await client.add_job("testp", "w", i, tenant_id=tenant)
        await client.add_job("testp", "w", i, tenant_id="free")
    await start_worker(setup, worker_concurrency=8)
    await start_worker(setup, worker_concurrency=8)
    await wait_for(lambda: db.fetchval("SELECT count(*) = 60 FROM jobs"), timeout=60)
    assert peak[tenant] == 2
    assert peak["free"] > 2
    assert await client.broker.queue.running_per_tenant() == {}


async def test_the_fair_queuing_floor_is_the_highest_time_taken(
    client: JobScheduler, redis_client: Any
) -> None:
    """take.lua raises ``~floor`` to the highest fair-queuing time it leased, never lowers it,
    and leaves it alone when it leases nothing; a tenant new to the queue starts there."""
    queue = client.broker.queue

    async def enqueue(job_id: str, tenant_id: str) -> None:
        await queue.enqueue(
            job_id, b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={"tenant": tenant_id}
        )

    async def floor() -> int:
        return int(await redis_client.hget(queue.keys.fair, "~floor") or 0)

    for i in range(4):
        await enqueue(f"a{i}", "a")  # times 1..4
    await enqueue("b0", "b")  # time 1
    taken, _ = await queue.take("w:1", 3, 30_000)
    assert [d.job_id for d in taken] == ["a0", "b0", "a1"]
    assert await floor() == 2
    await queue.take("w:2", 1, 30_000)  # a2, time 3
    assert await floor() == 3
    await redis_client.hset(queue.keys.fair, "~floor", 10)
    await queue.take("w:3", 1, 30_000)  # a3, time 4: below the floor, which stays
    assert await floor() == 10
    assert (await queue.take("w:4", 5, 30_000))[0] == []
    assert await floor() == 10
    await enqueue("c0", "c")
    assert await redis_client.hget(queue.keys.job("c0"), "seq") == b"11"
