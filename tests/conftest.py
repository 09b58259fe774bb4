"""Shared fixtures: every test gets its own PostgreSQL schema and Redis key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from drm_taskiq import store
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.plugins import Plugin
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.receiver import Receiver
from drm_taskiq.settings import Settings, load_settings
from tests.support.services import DATABASE_URL, REDIS_URL, require
from tests.support.waiting import wait_until


@pytest.fixture
def namespace() -> str:
    """A unique name used as both schema and key prefix."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(namespace: str) -> Settings:
    """Settings pointing at the shared servers, isolated by schema and key prefix."""
    require("127.0.0.1", 6379, "Redis")
    require("127.0.0.1", 5432, "PostgreSQL")
    return load_settings(
        redis_url=REDIS_URL,
        database_url=DATABASE_URL,
        db_schema=namespace,
        key_prefix=namespace,
        entry_points=False,
        lease_ms=5000,
        stalled_interval_ms=500,
        ledger_flush_ms=50,
        worker_concurrency=10,
    )


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A plain Redis client; the test's keys are deleted afterwards."""
    client = aioredis.from_url(settings.redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{{{settings.key_prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A migrated schema of the test's own (dropped afterwards) and a pool on it."""
    await store.migrate(settings)
    pool = await store.create_pool(settings)
    yield pool
    await pool.close()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def tenant(db: asyncpg.Pool) -> str:
    """A tenant with the test plugin ``testp`` enabled."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    return "acme"


class WorkerHandle:
    """An in-process worker: a DrmBroker in worker mode driven by drm-taskiq's Receiver (taskiq's
    Receiver with the shortcut for leased jobs), as deployed."""

    def __init__(self, settings: Settings, setup: Callable[[JobScheduler], Any] | None) -> None:
        self.broker = DrmBroker(settings, own_process=False)
        self.broker.is_worker_process = True
        self.scheduler = JobScheduler(self.broker, plugins=[])
        self.setup = setup
        self.finish = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.broker.startup()
        if self.setup is not None:
            result = self.setup(self.scheduler)
            if asyncio.iscoroutine(result):
                await result
        receiver = Receiver(self.broker, max_async_tasks=100, run_startup=False)
        self.task = asyncio.create_task(receiver.listen(self.finish))

    async def stop(self) -> None:
        self.finish.set()
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=30)
            if not done:
                for task in asyncio.all_tasks():
                    task.print_stack(limit=4)
                raise AssertionError("the in-process worker did not stop within 30 s")
        await asyncio.wait_for(self.broker.shutdown(), timeout=30)


@contextlib.asynccontextmanager
async def started_client(
    settings: Settings, plugins: list[Plugin], before_close: Callable[[], None] = lambda: None
) -> AsyncIterator[JobScheduler]:
    """A started client JobScheduler with ``plugins`` loaded (their ``on_load`` ran);
    ``before_close`` runs before it is closed (to restart a server the test stopped)."""
    scheduler = JobScheduler(DrmBroker(settings, own_process=False), plugins=plugins)
    await scheduler.start()
    try:
        await scheduler.load_plugins()
        yield scheduler
    finally:
        before_close()
        await scheduler.close()


@pytest.fixture
async def client(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> AsyncIterator[JobScheduler]:
    """A started JobScheduler in client mode (enqueues, reads state)."""
    broker = DrmBroker(settings, own_process=False)
    scheduler = JobScheduler(broker, plugins=[])
    await scheduler.start()
    yield scheduler
    await scheduler.close()


@pytest.fixture
async def start_worker(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers; each is stopped at the end of the test."""
    workers: list[WorkerHandle] = []

    async def start(
        setup: Callable[[JobScheduler], Any] | None = None, **overrides: Any
    ) -> WorkerHandle:
        worker_settings = settings.model_copy(update=overrides) if overrides else settings
        handle = WorkerHandle(worker_settings, setup)
        await handle.start()
        workers.append(handle)
        return handle

    yield start
    for handle in workers:
        if handle.task is not None and not handle.task.done():
            await handle.stop()


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail on timeout."""
    return await wait_until(predicate, timeout=timeout, interval=interval)
