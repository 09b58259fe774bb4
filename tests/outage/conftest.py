"""Fixtures for the outage tests: a PostgreSQL or Redis server of the test's own, clients and
workers bound to it, and real ``taskiq worker`` processes.

Every server and process started here is stopped in a ``finally`` at teardown, whatever the test
did. A test that stopped its private PostgreSQL gets it started again before clients and workers
are closed, so that they shut down cleanly (and the ledger drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from drm_taskiq import store
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.settings import Settings
from tests.conftest import WorkerHandle
from tests.outage.outage_plugin import PLUGIN_ID, PLUGIN_SPEC
from tests.outage.outage_plugin import plugin as outage_plugin
from tests.support.private_pg import PrivatePostgres
from tests.support.services import PrivateRedis
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANT = "acme"
TENANT_PLUGINS: dict[str, Any] = {"testp": {}, PLUGIN_ID: {}}
BIN_DIR = Path(sys.executable).parent
_OWN_NAMES = ("REDIS_URL", "DATABASE_URL", "WORKER_CONCURRENCY")


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
    scheduler = JobScheduler(DrmBroker(pg_settings, own_process=False), plugins=[outage_plugin])
    await scheduler.start()
    try:
        await scheduler.load_plugins()
        yield scheduler
    finally:
        ensure_running(private_pg)
        await scheduler.close()


@pytest.fixture
async def pg_start_worker(
    pg_settings: Settings,
    pg_db: asyncpg.Pool,
    private_pg: PrivatePostgres,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers on the private PostgreSQL; stopped at teardown."""
    workers: list[WorkerHandle] = []

    async def start(
        setup: Callable[[JobScheduler], Any] | None = None, **overrides: Any
    ) -> WorkerHandle:
        handle = WorkerHandle(pg_settings.model_copy(update=overrides), setup)
        workers.append(handle)
        await handle.start()
        return handle

    try:
        yield start
    finally:
        ensure_running(private_pg)
        for handle in workers:
            if handle.task is not None and not handle.task.done():
                await handle.stop()
            elif handle.broker._started_up:  # the listener died: close the broker anyway
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
    scheduler = JobScheduler(DrmBroker(redis_settings, own_process=False), plugins=[outage_plugin])
    await scheduler.start()
    try:
        await scheduler.load_plugins()
        yield scheduler
    finally:
        await scheduler.close()


@pytest.fixture
async def redis_start_worker(
    redis_settings: Settings, db: asyncpg.Pool, private_redis: PrivateRedis
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers on the private Redis; stopped at teardown (Redis restarted
    first if the test left it stopped)."""
    workers: list[WorkerHandle] = []

    async def start(
        setup: Callable[[JobScheduler], Any] | None = None, **overrides: Any
    ) -> WorkerHandle:
        handle = WorkerHandle(redis_settings.model_copy(update=overrides), setup)
        workers.append(handle)
        await handle.start()
        return handle

    try:
        yield start
    finally:
        if private_redis.proc is None:
            private_redis.start()
        for handle in workers:
            if handle.task is not None and not handle.task.done():
                await handle.stop()
            elif handle.broker._started_up:
                await handle.broker.shutdown()


# --------------------------------------------------------------------------- real processes
class WorkerProcess:
    """``taskiq worker drm_taskiq.broker:broker`` in its own process group, logs in files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._stdout = self.stdout_path.open("wb")
        self._stderr = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace") + self.stdout_path.read_text(
            "utf-8", errors="replace"
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog JSON events written so far, optionally only those named ``name``."""
        found = []
        for raw in self.output().splitlines():
            line = raw.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def killpg(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to the whole process group (taskiq's main process and its child)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def close(self) -> None:
        self.killpg(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._stdout.close()
        self._stderr.close()

    def tail(self, lines: int = 60) -> str:
        kept = self.output().splitlines()[-lines:]
        return "\n".join([f"--- {self.name} (last {len(kept)} lines) ---", *kept])


class WorkerProcesses:
    """Starts real worker processes configured like a test's settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[WorkerProcess] = []

    def start(
        self, settings: Settings, *extra_args: str, **env: str | int | float
    ) -> WorkerProcess:
        binary = BIN_DIR / "taskiq"
        if not binary.exists():
            pytest.skip(f"taskiq not found next to {sys.executable}")
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("DRM_") and key not in _OWN_NAMES
        }
        python_path = [str(REPO_ROOT)]
        if os.environ.get("PYTHONPATH"):
            python_path.append(os.environ["PYTHONPATH"])
        environment.update(
            PYTHONPATH=os.pathsep.join(python_path),
            PYTHONUNBUFFERED="1",
            REDIS_URL=settings.redis_url,
            DATABASE_URL=settings.database_url,
            WORKER_CONCURRENCY="10",
            DRM_DB_SCHEMA=settings.db_schema,
            DRM_KEY_PREFIX=settings.key_prefix,
            DRM_PLUGINS=PLUGIN_SPEC,
            DRM_ENTRY_POINTS="false",
            DRM_ALLOW_UNSIGNED_PLUGINS="true",  # test plugins are not signed
            DRM_LEASE_MS=str(settings.lease_ms),
            DRM_STALLED_INTERVAL_MS=str(settings.stalled_interval_ms),
            DRM_LEDGER_FLUSH_MS=str(settings.ledger_flush_ms),
            DRM_LOG_FORMAT="json",
        )
        environment.update({key: str(value) for key, value in env.items()})
        argv = [str(binary), "worker", "drm_taskiq.broker:broker", "--workers", "1", *extra_args]
        proc = WorkerProcess(f"worker{len(self.procs)}", argv, environment, self.workdir)
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


async def wait_event(
    proc: WorkerProcess, event: str, timeout: float = 30.0, **fields: Any
) -> dict[str, Any]:
    """Wait until ``proc`` logged ``event`` with ``fields``; fail if it exits first."""

    def found() -> dict[str, Any] | None:
        for item in proc.events(event):
            if all(item.get(key) == value for key, value in fields.items()):
                return item
        return None

    return await wait_until(found, timeout=timeout, procs=[proc], what=f"{proc.name}: {event}")


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
