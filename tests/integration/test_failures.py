"""Retries with backoff, permanent failures, timeouts and their plugin_runs rows."""

from __future__ import annotations

import itertools
import json
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq import JobScheduler, UnrecoverableError
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


async def _rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM plugin_runs ORDER BY (result->>'attempt')::int"))


async def test_fails_twice_then_succeeds_with_backoff(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """attempts=3, fixed 400 ms: rows error, error, success with attempt numbers and real gaps."""

    async def flaky(ctx: Any, job: Any) -> str:
        if job.attempts_made < 2:
            raise RuntimeError(f"boom {job.attempts_made}")
        return "ok"

    async def setup(s: JobScheduler) -> None:
        await s.register_job(
            "testp", "flaky", flaky, {"attempts": 3, "backoff": {"type": "fixed", "delay": 400}}
        )

    await setup(client)
    with capture_logs() as logs:
        await start_worker(setup)
        job_id = await client.add_job("testp", "flaky", None, tenant_id=tenant)
        await wait_for(lambda: db.fetchval("SELECT count(*) = 3 FROM plugin_runs"), timeout=20)
    rows = await _rows(db)
    assert [r["status"] for r in rows] == ["error", "error", "success"]
    assert [json.loads(r["result"])["attempt"] for r in rows] == [1, 2, 3]
    assert rows[0]["error"] == "RuntimeError: boom 0"
    for earlier, later in itertools.pairwise(rows):
        gap = (later["executed_at"] - earlier["executed_at"]).total_seconds()
        assert gap >= 0.35, f"retry ran after {gap:.3f} s; backoff is 0.4 s"
    status = await client.get_job_status("testp", "flaky", job_id)
    assert status is not None and status.state == "completed" and status.attempts_made == 3
    scheduled = [e for e in logs if e["event"] == "job_retry_scheduled"]
    assert [e["delay_ms"] for e in scheduled] == [400, 400]


async def test_exponential_backoff_gaps_double(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """Exponential backoff of 300 ms waits about 300 then 600 ms between attempts."""

    async def always(ctx: Any, job: Any) -> None:
        raise RuntimeError("nope")

    async def setup(s: JobScheduler) -> None:
        await s.register_job(
            "testp",
            "always",
            always,
            {"attempts": 3, "backoff": {"type": "exponential", "delay": 300}},
        )

    await setup(client)
    await start_worker(setup)
    job_id = await client.add_job("testp", "always", None, tenant_id=tenant)
    await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM jobs"), timeout=20)
    rows = await _rows(db)
    gaps = [
        (b["executed_at"] - a["executed_at"]).total_seconds() for a, b in itertools.pairwise(rows)
    ]
    assert gaps[0] >= 0.28 and gaps[1] >= 0.58, gaps
    status = await client.get_job_status("testp", "always", job_id)
    assert status is not None
    assert (status.state, status.attempts_made, status.failed_reason) == (
        "failed",
        3,
        "RuntimeError: nope",
    )


async def test_unrecoverable_error_fails_at_once(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """UnrecoverableError ends the job after one attempt whatever `attempts` says."""

    async def fatal(ctx: Any, job: Any) -> None:
        raise UnrecoverableError("bad input")

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "fatal", fatal, {"attempts": 5})

    await setup(client)
    with capture_logs() as logs:
        await start_worker(setup)
        job_id = await client.add_job("testp", "fatal", None, tenant_id=tenant)
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM jobs"), timeout=20)
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 1
    status = await client.get_job_status("testp", "fatal", job_id)
    assert status is not None and status.state == "failed" and status.attempts_made == 1
    failed = [e for e in logs if e["event"] == "job_failed_permanently"]
    assert failed and failed[0]["job_id"] == job_id and failed[0]["tenant_id"] == tenant
    assert failed[0]["plugin_id"] == "testp" and failed[0]["attempt"] == 1


async def test_timeout_cuts_the_attempt_and_records_it(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A handler over its timeout is cut off near the timeout and recorded as timed out."""
    import asyncio

    async def slow(ctx: Any, job: Any) -> None:
        await asyncio.sleep(30)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "slow", slow, {"timeout": 300})

    await setup(client)
    with capture_logs() as logs:
        await start_worker(setup)
        job_id = await client.add_job("testp", "slow", None, tenant_id=tenant)
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM jobs"), timeout=20)
    row = (await _rows(db))[0]
    meta = json.loads(row["result"])
    assert row["status"] == "error"
    assert "timed out after 300 ms" in row["error"]
    assert meta["timedOut"] is True
    assert meta["durationMs"] < 3000
    status = await client.get_job_status("testp", "slow", job_id)
    assert (
        status is not None
        and status.state == "failed"
        and "timed out" in (status.failed_reason or "")
    )
    assert any(e["event"] == "job_timed_out" and e["job_id"] == job_id for e in logs)
