"""Real ``taskiq worker`` / ``taskiq scheduler`` processes for the acceptance tests.

Each process runs with the test's own schema and key prefix, loads the ``accept`` test plugin
(``tests.plugins.accept:plugin``) and writes its output to files under ``tmp_path``; the last
lines of every log are printed at teardown (pytest shows them when the test fails). Every process
group is killed with SIGKILL at teardown, whatever the test did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from tests.conftest import started_client
from tests.plugins.accept import plugin as accept_plugin
from tests.support.processes import Proc, binary, process_env, wait_event
from tests.support.waiting import wait_until

from drm_taskiq import store
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.redis_queue import QueueKeys
from drm_taskiq.settings import Settings

PLUGIN_SPEC = "tests.plugins.accept:plugin"
DRM_RECEIVER = "drm_taskiq.receiver:Receiver"
TASKIQ_RECEIVER = "taskiq.receiver:Receiver"
TENANT = "acme"


class Processes:
    """Starts worker and scheduler processes configured like the test's ``settings``."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._counts: dict[str, int] = {}

    def env(self, **extra: str | int | float) -> dict[str, str]:
        """The environment of a process: the test's servers, schema, prefix and plugin."""
        defaults: dict[str, str | int | float] = {"WORKER_CONCURRENCY": 4, "DRM_LEASE_MS": 3000}
        return process_env(self.settings, PLUGIN_SPEC, **{**defaults, **extra})

    def _start(self, kind: str, argv: list[str], env: dict[str, str]) -> Proc:
        index = self._counts.get(kind, 0)
        self._counts[kind] = index + 1
        proc = Proc(f"{kind}{index}", argv, env, self.workdir)
        self.procs.append(proc)
        return proc

    def worker(
        self, *, receiver: str = DRM_RECEIVER, args: tuple[str, ...] = (), **env: str | int | float
    ) -> Proc:
        """``taskiq worker drm_taskiq.broker:broker --workers 1 --receiver ...`` (drm-taskiq's
        receiver, as documented, unless ``receiver`` names another); ``args``: more arguments;
        ``env`` overrides variables."""
        argv = [binary("taskiq"), "worker", "drm_taskiq.broker:broker", "--workers", "1"]
        argv += ["--receiver", receiver, *args]
        return self._start("worker", argv, self.env(**env))

    def scheduler(self, **env: str | int | float) -> Proc:
        """``taskiq scheduler drm_taskiq.scheduler:sched``; ``env`` overrides variables."""
        argv = [binary("taskiq"), "scheduler", "drm_taskiq.scheduler:sched"]
        return self._start("scheduler", argv, self.env(**env))

    def ledger(self, **env: str | int | float) -> Proc:
        """``drm-taskiq ledger``: the run ledger in a process of its own."""
        argv = [binary("drm-taskiq"), "ledger"]
        return self._start("ledger", argv, self.env(**env))

    async def wait_event(
        self, proc: Proc, event: str, timeout: float = 30.0, **fields: Any
    ) -> dict[str, Any]:
        """Wait until ``proc`` logged ``event`` (with ``fields``); fail if it exits first."""
        return await wait_event(proc, event, timeout, **fields)

    async def ready_worker(
        self, *, receiver: str = DRM_RECEIVER, args: tuple[str, ...] = (), **env: str | int | float
    ) -> Proc:
        """A worker that has loaded the ``accept`` plugin (its jobs are registered)."""
        proc = self.worker(receiver=receiver, args=args, **env)
        await self.wait_event(proc, "plugin_loaded", plugin_id="accept")
        return proc

    async def ready_scheduler(self, **env: str | int | float) -> Proc:
        """A scheduler whose cron engine is running."""
        proc = self.scheduler(**env)
        await self.wait_event(proc, "scheduler_started")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    def report(self) -> str:
        return "\n".join(proc.tail() for proc in self.procs)


async def wait_exit(proc: Proc, timeout: float) -> int:
    """Wait for ``proc``'s main process to exit; return its exit code (fail on timeout)."""
    await wait_until(
        lambda: proc.returncode is not None, timeout=timeout, what=f"{proc.name} to exit"
    )
    code = proc.returncode
    assert code is not None
    return code


# --------------------------------------------------------------------------- PostgreSQL reads
async def fetch_runs(db: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every plugin_runs row, with the job id and attempt from its JobMetadata."""
    return list(
        await db.fetch(
            "SELECT plugin_run_id, plugin_id, tenant_id, hook_name, status, error, executed_at,"
            " result, result->>'jobId' AS job_id, (result->>'attemptsMade')::int AS attempt"
            " FROM plugin_runs ORDER BY executed_at"
        )
    )


async def fetch_jobs(db: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every row of the jobs table (final states)."""
    return list(await db.fetch("SELECT * FROM jobs ORDER BY finished_at"))


async def fetch_events(db: asyncpg.Pool, job_name: str | None = None) -> list[asyncpg.Record]:
    """Every handler execution the accept plugin recorded (table created by its on_load)."""
    exists = await db.fetchval("SELECT to_regclass('accept_events') IS NOT NULL")
    if not exists:
        return []
    return list(
        await db.fetch(
            "SELECT * FROM accept_events WHERE $1::text IS NULL OR job_name = $1 ORDER BY id",
            job_name,
        )
    )


async def count_runs(db: asyncpg.Pool, status: str | None = None) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM plugin_runs WHERE $1::text IS NULL OR status = $1", status
        )
    )


async def count_jobs(db: asyncpg.Pool, state: str | None = None) -> int:
    return int(
        await db.fetchval("SELECT count(*) FROM jobs WHERE $1::text IS NULL OR state = $1", state)
    )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
async def accept_tenant(db: asyncpg.Pool) -> str:
    """The tenant ``acme`` with the ``accept`` plugin enabled (before any process starts)."""
    await store.ensure_tenant(db, TENANT, plugins={"accept": {}})
    return TENANT


@pytest.fixture
def procs(
    settings: Settings,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    accept_tenant: str,
    tmp_path: Path,
) -> Iterator[Processes]:
    """Start real processes; every process group is SIGKILLed at teardown, logs printed."""
    processes = Processes(settings, tmp_path)
    try:
        yield processes
    finally:
        processes.close()
        if processes.procs:
            print(processes.report())


@pytest.fixture
def keys(settings: Settings) -> QueueKeys:
    """The names of the test queue's Redis keys (wait, active, job hashes...)."""
    return QueueKeys(settings.key_prefix, settings.queue)


@pytest.fixture
async def accept_client(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis, accept_tenant: str
) -> AsyncIterator[JobScheduler]:
    """A started client JobScheduler with the accept plugin's jobs registered (by its on_load)."""
    async with started_client(settings, [accept_plugin]) as scheduler:
        yield scheduler
