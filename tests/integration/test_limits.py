"""Limits from settings and the per-(tenant, plugin) circuit breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq import JobScheduler, LimitExceededError, RateLimitedError, store
from drm_taskiq.cron import CronEngine
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


async def noop(ctx: Any, job: Any) -> None:
    return None


@pytest.fixture
async def limited(settings: Settings, db: asyncpg.Pool, tenant: str) -> Any:
    """A client whose settings have small limits."""
    small = settings.model_copy(
        update={"tenant_enqueue_rate": 5, "max_schedules_per_tenant": 2, "breaker_threshold": 3}
    )
    scheduler = JobScheduler(DrmBroker(small, own_process=False), plugins=[])
    await scheduler.start()
    yield scheduler
    await scheduler.close()


async def test_enqueue_rate_limit_per_tenant(
    limited: JobScheduler, tenant: str, db: asyncpg.Pool, redis_client: Any
) -> None:
    """Over the per-second limit add_job raises RateLimitedError; other tenants are unaffected."""
    await store.ensure_tenant(db, "other", plugins={"testp": {}})
    await limited.register_job("testp", "n", noop)
    accepted = 0
    refused: list[RateLimitedError] = []
    for _ in range(50):
        try:
            await limited.add_job("testp", "n", None, tenant_id=tenant)
            accepted += 1
        except RateLimitedError as exc:
            refused.append(exc)
            break
    assert refused, "50 jobs in a burst were all accepted with a limit of 5 per second"
    caught = refused[0]
    assert caught.field == "tenant_id"
    assert "enqueue limit of 5 jobs per second" in str(caught)
    assert 1 <= accepted <= 5
    await limited.add_job("testp", "n", None, tenant_id="other")
    assert await redis_client.zcard(limited.broker.queue.keys.wait) == accepted + 1


async def test_schedules_per_tenant_limit(limited: JobScheduler, tenant: str) -> None:
    """A tenant cannot register more cron schedules than the limit; updating one is allowed."""
    scoped = limited.for_tenant(tenant)
    await scoped.register_job("testp", "a", noop, {"cron": "* * * * *"})
    await scoped.register_job("testp", "b", noop, {"cron": "* * * * *"})
    await scoped.register_job("testp", "b", noop, {"cron": "5 * * * *"})
    with pytest.raises(LimitExceededError) as caught:
        await scoped.register_job("testp", "c", noop, {"cron": "* * * * *"})
    assert caught.value.field == "options.cron"
    assert "the limit is 2" in str(caught.value)


async def test_circuit_breaker_pauses_and_resumes(
    limited: JobScheduler, settings: Settings, start_worker: Any, tenant: str, redis_client: Any
) -> None:
    """After N consecutive failures the plugin's schedules pause for the tenant until resumed."""

    async def boom(ctx: Any, job: Any) -> None:
        raise RuntimeError("down")

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "boom", boom)

    await setup(limited)
    await limited.for_tenant(tenant).register_job("testp", "tick", noop, {"cron": "* * * * * *"})
    with capture_logs() as logs:
        await start_worker(setup, breaker_threshold=3)
        for _ in range(3):
            await limited.add_job("testp", "boom", None, tenant_id=tenant)
        await wait_for(lambda: limited.paused_plugins(tenant), timeout=15)
    opened = [e for e in logs if e["event"] == "circuit_opened"]
    assert len(opened) == 1
    assert (opened[0]["tenant_id"], opened[0]["plugin_id"]) == (tenant, "testp")
    assert await limited.paused_plugins() == [(tenant, "testp")]

    engine = CronEngine(limited.broker, limited)
    base = datetime.now(UTC)
    for step in range(3):
        await engine.tick(base + timedelta(seconds=step))
    schedule_id = f"{tenant}:testp:tick"
    assert await redis_client.hget(engine.lastjob_key, schedule_id) is None

    assert await limited.resume_plugin("testp", tenant_id=tenant)
    assert not await limited.resume_plugin("testp", tenant_id=tenant)
    assert await limited.paused_plugins() == []
    await engine.tick(base + timedelta(seconds=4))
    await engine.tick(base + timedelta(seconds=5, milliseconds=100))
    fired = await redis_client.hget(engine.lastjob_key, schedule_id)
    assert fired is not None
    assert fired.startswith(f"cron:{schedule_id}:".encode())


async def test_success_resets_the_failure_count(
    client: JobScheduler, start_worker: Any, tenant: str, db: asyncpg.Pool
) -> None:
    """Failures separated by a success never open the circuit."""
    outcomes = iter([True, True, False, True, True, False])

    async def mixed(ctx: Any, job: Any) -> None:
        if next(outcomes):
            raise RuntimeError("flaky")

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "mixed", mixed)

    await setup(client)
    await start_worker(setup, breaker_threshold=3, worker_concurrency=1)
    for _ in range(6):
        await client.add_job("testp", "mixed", None, tenant_id=tenant)
    await wait_for(lambda: db.fetchval("SELECT count(*) = 6 FROM jobs"), timeout=15)
    assert await client.paused_plugins() == []
