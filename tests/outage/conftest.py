"""Fixtures for the outage tests: a PostgreSQL or Redis server of the test's own, clients and
workers bound to it, and real ``taskiq worker`` processes.

Every server and process started here is stopped in a ``finally`` at teardown, whatever the test
did. A test that stopped its private PostgreSQL gets it started again before clients and workers
are closed, so that they shut down cleanly (and the ledger drains).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from drm_taskiq import store
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.settings import Settings
from tests.conftest import WorkerHandle, started_client
from tests.outage.outage_plugin import PLUGIN_ID, PLUGIN_SPEC
from tests.outage.outage_plugin import plugin as outage_plugin
from tests.support.private_pg import PrivatePostgres
from tests.support.processes import Proc, binary, process_env
from tests.support.services import PrivateRedis

TENANT = "acme"
TENANT_PLUGINS: dict[str, Any] = {"testp": {}, PLUGIN_ID: {}}


# --------------------------------------------------------------------------- private PostgreSQL
@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A started PostgreSQL server of the test's own; stopped and deleted at teardown."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_settings(settings: Settings, private_pg: PrivatePostgres) -> Settings:
    """The test's settings (shared Redis, own key prefix), with the private PostgreSQL."""
    return settings.model_copy(update={"database_url": private_pg.url})


def ensure_running(server: PrivatePostgres) -> None:
    """Start ``server`` again if the test left it stopped (teardown needs it)."""
    if not server.running:
        server.start()


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except TimeoutError:  # pragma: no cover  (a connection stuck on a dead server)
        pool.terminate()


@pytest.fixture
async def pg_db(pg_settings: Settings, private_pg: PrivatePostgres) -> AsyncIterator[asyncpg.Pool]:
    """The migrated schema on the private server, tenant ``acme`` with testp and outage enabled."""
    await store.migrate(pg_settings)
    pool = await store.create_pool(pg_settings)
    try:
        await store.ensure_tenant(pool, TENANT, plugins=TENANT_PLUGINS)
        yield pool
    finally:
        ensure_running(private_pg)
        await _close_pool(pool)


@pytest.fixture
async def pg_client(
    pg_settings: Settings,
    pg_db: asyncpg.Pool,
    private_pg: PrivatePostgres,
    redis_client: aioredis.Redis,
) -> AsyncIterator[JobScheduler]:
    """A started client JobScheduler on the private PostgreSQL (plugin ``outage`` loaded)."""
    async with started_client(
        pg_settings, [outage_plugin], lambda: ensure_running(private_pg)
    ) as scheduler:
        yield scheduler


@pytest.fixture
async def pg_start_worker(
    pg_settings: Settings,
    pg_db: asyncpg.Pool,
    private_pg: PrivatePostgres,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers on the private PostgreSQL; stopped at teardown."""
    async with _workers(pg_settings, lambda: ensure_running(private_pg)) as start:
        yield start


@contextlib.asynccontextmanager
async def _workers(
    settings: Settings, restore: Callable[[], None]
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers with ``settings`` (plus overrides); at the end ``restore`` the
    server the test may have left stopped, then stop every worker (or close the broker of one
    whose listener died)."""
    workers: list[WorkerHandle] = []

    async def start(
        setup: Callable[[JobScheduler], Any] | None = None, **overrides: Any
    ) -> WorkerHandle:
        handle = WorkerHandle(settings.model_copy(update=overrides), setup)
        workers.append(handle)
        await handle.start()
        return handle

    try:
        yield start
    finally:
        restore()
        for handle in workers:
            if handle.task is not None and not handle.task.done():
                await handle.stop()
            elif handle.broker._started_up:
                await handle.broker.shutdown()


# --------------------------------------------------------------------------- private Redis
@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A started redis-server of the test's own (AOF on); stopped and deleted at teardown."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_settings(settings: Settings, private_redis: PrivateRedis) -> Settings:
    """The test's settings (shared PostgreSQL, own schema), with the private Redis."""
    return settings.model_copy(update={"redis_url": private_redis.url})


@pytest.fixture
async def redis_tenant(db: asyncpg.Pool) -> str:
    """Tenant ``acme`` in the shared PostgreSQL schema, with testp and outage enabled."""
    await store.ensure_tenant(db, TENANT, plugins=TENANT_PLUGINS)
    return TENANT


@pytest.fixture
async def redis_client_scheduler(
    redis_settings: Settings, db: asyncpg.Pool, redis_tenant: str
) -> AsyncIterator[JobScheduler]:
    """A started client JobScheduler on the private Redis (plugin ``outage`` loaded)."""
    async with started_client(redis_settings, [outage_plugin]) as scheduler:
        yield scheduler


@pytest.fixture
async def redis_start_worker(
    redis_settings: Settings, db: asyncpg.Pool, private_redis: PrivateRedis
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers on the private Redis; stopped at teardown (Redis restarted
    first if the test left it stopped)."""

    def restore() -> None:
        if private_redis.proc is None:
            private_redis.start()

    async with _workers(redis_settings, restore) as start:
        yield start


# --------------------------------------------------------------------------- real processes
class WorkerProcesses:
    """Starts real worker processes configured like a test's settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, settings: Settings, *extra_args: str, **env: str | int | float) -> Proc:
        """``taskiq worker drm_taskiq.broker:broker --workers 1`` configured like ``settings``,
        with the ``outage`` plugin; ``env`` overrides variables."""
        argv = [binary("taskiq"), "worker", "drm_taskiq.broker:broker", "--workers", "1"]
        proc = Proc(
            f"worker{len(self.procs)}",
            [*argv, *extra_args],
            process_env(settings, PLUGIN_SPEC, **env),
            self.workdir,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    def report(self) -> str:
        return "\n".join(proc.tail() for proc in self.procs)


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Real worker processes; every process group is SIGKILLed at teardown, logs printed."""
    processes = WorkerProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.close()
        if processes.procs:
            print(processes.report())


# --------------------------------------------------------------------------- PostgreSQL reads
async def pg_counts(settings: Settings) -> dict[str, int]:
    """Row counts on a fresh connection (the server may have restarted since the pool opened)."""
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM plugin_runs) AS runs,"
            " (SELECT count(DISTINCT plugin_run_id) FROM plugin_runs) AS distinct_runs,"
            " (SELECT count(*) FROM plugin_runs WHERE status = 'success') AS success,"
            " (SELECT count(*) FROM jobs) AS jobs,"
            " (SELECT count(*) FROM jobs WHERE state = 'completed') AS completed"
        )
    finally:
        await conn.close()
    assert row is not None
    return {key: int(value) for key, value in row.items()}


async def try_count_runs(settings: Settings) -> int:
    """``plugin_runs`` rows now, or -1 while the server is unreachable."""
    try:
        return (await pg_counts(settings))["runs"]
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1
