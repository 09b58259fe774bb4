"""The cron engine against real Redis and PostgreSQL: registration, exactly-once, changes."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from drm_taskiq import JobScheduler
from drm_taskiq.cron import CronEngine

pytestmark = pytest.mark.asyncio


async def noop(ctx: Any, job: Any) -> None:
    return None


async def _wait_ids(client: JobScheduler, redis_client: Any) -> list[str]:
    members = await redis_client.zrange(client.broker.queue.keys.wait, 0, -1)
    return sorted(m.decode() for m in members)


async def test_two_engines_fire_each_slot_once(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """Two schedulers ticking over the same slots enqueue one job per slot."""
    await client.for_tenant(tenant).register_job("testp", "beat", noop, {"cron": "*/2 * * * * *"})
    first, second = CronEngine(client.broker, client), CronEngine(client.broker, client)
    base = datetime(2030, 1, 1, tzinfo=UTC)
    await first.tick(base)
    await second.tick(base)
    for step in range(1, 21):
        now = base + timedelta(seconds=step, milliseconds=100)
        await first.tick(now)
        await second.tick(now)
        await second.tick(now)
    ids = await _wait_ids(client, redis_client)
    slots = sorted(int(i.rsplit(":", 1)[1]) for i in ids)
    assert len(slots) == 10 == len(set(slots))
    assert all(b - a == 2000 for a, b in itertools.pairwise(slots))
    assert all(i.startswith(f"cron:{tenant}:testp:beat:") for i in ids)


async def test_registered_and_removed_while_running(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """A schedule registered or removed at run time is picked up at the next reload."""
    engine = CronEngine(client.broker, client)
    base = datetime(2030, 1, 1, tzinfo=UTC)
    await engine.tick(base)
    assert engine.schedules == {}
    scoped = client.for_tenant(tenant)
    await scoped.register_job("testp", "beat", noop, {"cron": "* * * * * *"})
    engine._loaded_at = 0  # the poll interval has passed
    await engine.tick(base + timedelta(seconds=1))
    await engine.tick(base + timedelta(seconds=2, milliseconds=50))
    assert len(await _wait_ids(client, redis_client)) == 1
    await scoped.remove_job("testp", "beat")
    engine._loaded_at = 0
    await engine.tick(base + timedelta(seconds=3, milliseconds=50))
    assert engine.schedules == {}
    assert len(await _wait_ids(client, redis_client)) == 1


async def test_missed_slots_fire_latest_once(
    client: JobScheduler, tenant: str, redis_client: Any
) -> None:
    """After the scheduler was away for many slots, the default policy fires one late run."""
    await client.for_tenant(tenant).register_job("testp", "beat", noop, {"cron": "* * * * *"})
    engine = CronEngine(client.broker, client)
    base = datetime(2030, 1, 1, tzinfo=UTC)
    await engine.tick(base)
    later = CronEngine(client.broker, client)
    await later.tick(base + timedelta(minutes=30, seconds=20))
    ids = await _wait_ids(client, redis_client)
    assert len(ids) == 1
    assert ids[0].endswith(str(int((base + timedelta(minutes=30)).timestamp() * 1000)))


async def test_schedule_stored_per_tenant(
    client: JobScheduler, tenant: str, db: asyncpg.Pool
) -> None:
    """register_job with cron upserts one schedules row per (tenant, plugin, job)."""
    scoped = client.for_tenant(tenant)
    await scoped.register_job("testp", "beat", noop, {"cron": "0 * * * *", "tz": "Europe/Berlin"})
    await scoped.register_job("testp", "beat", noop, {"cron": "5 * * * *", "tz": "Europe/Berlin"})
    rows = await db.fetch("SELECT tenant_id, plugin_id, job_name, cron, tz FROM schedules")
    assert [tuple(r) for r in rows] == [(tenant, "testp", "beat", "5 * * * *", "Europe/Berlin")]
    await asyncio.sleep(0)


async def test_static_label_schedules_fire_with_stable_ids(
    client: JobScheduler, redis_client: Any
) -> None:
    """A task declared with the schedule label fires under the id label:{task}:{index}."""

    async def housekeeping() -> None:
        return None

    client.broker.register_task(
        housekeeping,
        task_name="housekeeping",
        schedule=[{"cron": "*/2 * * * * *"}, {"cron": "0 3 * * *", "cron_offset": "Asia/Tokyo"}],
    )
    first, second = CronEngine(client.broker, client), CronEngine(client.broker, client)
    await first.load()
    await second.load()
    assert (
        set(first.schedules)
        == set(second.schedules)
        == {
            "label:housekeeping:0",
            "label:housekeeping:1",
        }
    )
    assert first.schedules["label:housekeeping:1"].tz == "Asia/Tokyo"
    base = datetime(2030, 1, 1, tzinfo=UTC)
    await first.tick(base)
    await first.tick(base + timedelta(seconds=2, milliseconds=50))
    await second.tick(base + timedelta(seconds=2, milliseconds=60))
    ids = await _wait_ids(client, redis_client)
    assert ids == [
        f"cron:label:housekeeping:0:{int((base + timedelta(seconds=2)).timestamp() * 1000)}"
    ]
