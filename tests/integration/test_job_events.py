"""Job events: ``register_job(..., on_completed=..., on_failed=...)`` callbacks, run in the worker
once an attempt's outcome is recorded, with the context of the job's tenant."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq import InvalidInputError, JobEvent, JobScheduler, UnrecoverableError, store
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


class Recorder:
    """The callbacks' calls: (hook, tenant of the context, config of the context, event)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], JobEvent]] = []

    async def completed(self, ctx: Any, event: JobEvent) -> None:
        self.calls.append(("completed", ctx.tenant_id, dict(ctx.config), event))

    async def failed(self, ctx: Any, event: JobEvent) -> None:
        self.calls.append(("failed", ctx.tenant_id, dict(ctx.config), event))

    def events(self, job_id: str) -> list[tuple[str, str, int]]:
        return [(hook, e.state, e.attempt) for hook, _, _, e in self.calls if e.job_id == job_id]


async def echo(ctx: Any, job: Any) -> Any:
    return {"echo": job.data}


async def flaky(ctx: Any, job: Any) -> str:
    if job.attempts_made < 2:
        token = ctx.config.get("api_token")
        raise RuntimeError(f"flaky attempt {job.attempts_made + 1} with {token}")
    return "third time"


async def fatal(ctx: Any, job: Any) -> None:
    raise UnrecoverableError("bad input")


def _setup(recorder: Recorder) -> Any:
    async def setup(s: JobScheduler) -> None:
        hooks = {"on_completed": recorder.completed, "on_failed": recorder.failed}
        await s.register_job("testp", "echo", echo, **hooks)
        await s.register_job(
            "testp",
            "flaky",
            flaky,
            {"attempts": 3, "backoff": {"type": "fixed", "delay": 100}},
            **hooks,
        )
        await s.register_job("testp", "fatal", fatal, {"attempts": 5}, **hooks)

    return setup


async def test_callbacks_follow_each_attempt_with_the_jobs_tenant(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A completed job: on_completed once, with what the handler returned; a job that fails
    twice and then completes: on_failed ("retrying", with the next attempt's time) twice, then
    on_completed; a job that fails for good: on_failed ("failed") once. Each callback gets the
    job's tenant's context (its config), whichever tenant enqueued; the reason is masked."""
    await store.ensure_tenant(db, "other", plugins={"testp": {"region": "eu"}})
    await db.execute(
        "UPDATE tenant_plugins SET config = $2::jsonb WHERE tenant_id = $1",
        tenant,
        '{"api_token": "s3cr3t-value"}',
    )
    recorder = Recorder()
    await _setup(recorder)(client)
    await start_worker(_setup(recorder))
    ours = await client.add_job("testp", "echo", {"n": 1}, tenant_id=tenant)
    theirs = await client.add_job("testp", "echo", {"n": 2}, tenant_id="other")
    retried = await client.add_job("testp", "flaky", None, tenant_id=tenant)
    doomed = await client.add_job("testp", "fatal", None, tenant_id="other")
    await wait_for(lambda: len(recorder.calls) == 6, timeout=20)
    await asyncio.sleep(0.3)  # nothing more comes

    assert recorder.events(ours) == [("completed", "completed", 1)]
    assert recorder.events(retried) == [
        ("failed", "retrying", 1),
        ("failed", "retrying", 2),
        ("completed", "completed", 3),
    ]
    assert recorder.events(doomed) == [("failed", "failed", 1)]
    by_job = {e.job_id: (who, config, e) for _, who, config, e in recorder.calls}
    assert by_job[ours][:2] == (tenant, {"api_token": "s3cr3t-value"})
    assert by_job[theirs][:2] == ("other", {"region": "eu"})
    assert by_job[doomed][:2] == ("other", {"region": "eu"})
    event = by_job[ours][2]
    assert (event.plugin_id, event.job_name, event.tenant_id) == ("testp", "echo", tenant)
    assert (event.returnvalue, event.failed_reason, event.retry_at) == (
        {"echo": {"n": 1}},
        None,
        None,
    )
    assert by_job[retried][2].returnvalue == "third time"
    first_failure = next(e for _, _, _, e in recorder.calls if e.job_id == retried)
    assert (
        first_failure.failed_reason is not None and "flaky attempt 1" in first_failure.failed_reason
    )
    assert "s3cr3t-value" not in first_failure.failed_reason
    assert first_failure.retry_at is not None
    assert first_failure.retry_at <= datetime.now(UTC)  # it was due; the next attempt ran
    assert by_job[doomed][2].failed_reason == "UnrecoverableError: bad input"
    # the callbacks ran after the outcome was recorded in Redis: the job had its final state
    status = await client.get_job_status("testp", "flaky", retried)
    assert status is not None and status.state == "completed"


async def test_a_failing_callback_is_logged_and_changes_nothing(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """An exception in a callback is logged (job_event_handler_failed, secrets masked); the
    job's outcome and its plugin_runs row are as without it, and later jobs still run."""
    ran: list[str] = []

    async def broken(ctx: Any, event: JobEvent) -> None:
        ran.append(event.job_id)
        raise RuntimeError(f"callback broke with {ctx.config['api_token']}")

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "echo", echo, on_completed=broken)

    await db.execute(
        "UPDATE tenant_plugins SET config = $2::jsonb WHERE tenant_id = $1",
        tenant,
        '{"api_token": "hunter2-value"}',
    )
    await setup(client)
    with capture_logs() as logs:
        await start_worker(setup)
        first = await client.add_job("testp", "echo", 1, tenant_id=tenant)
        second = await client.add_job("testp", "echo", 2, tenant_id=tenant)
        await wait_for(lambda: len(ran) == 2, timeout=20)
        await wait_for(
            lambda: db.fetchval("SELECT count(*) = 2 FROM plugin_runs WHERE status = 'success'"),
            timeout=20,
        )
    failures = [e for e in logs if e["event"] == "job_event_handler_failed"]
    assert sorted(e["job_id"] for e in failures) == sorted([first, second])
    assert {e["hook"] for e in failures} == {"on_completed"}
    assert all("hunter2-value" not in e["error"] and "***" in e["error"] for e in failures)
    for job_id in (first, second):
        status = await client.get_job_status("testp", "echo", job_id)
        assert status is not None and status.state == "completed"


async def test_callbacks_are_async_functions_and_optional(client: JobScheduler) -> None:
    """A synchronous callback is refused naming its argument; without callbacks no event is
    built for the job (the worker keeps the names of the jobs that have some)."""

    def sync_callback(ctx: Any, event: JobEvent) -> None:
        return None

    with pytest.raises(InvalidInputError) as refused:
        await client.register_job("testp", "echo", echo, on_failed=sync_callback)  # type: ignore[arg-type]
    assert refused.value.field == "on_failed"
    recorder = Recorder()
    await client.register_job("testp", "echo", echo, on_completed=recorder.completed)
    assert "plugin:testp:echo" in client.broker.event_tasks
    await client.register_job("testp", "echo", echo)
    assert "plugin:testp:echo" not in client.broker.event_tasks
    await client.register_job("testp", "echo", echo, on_failed=recorder.failed)
    await client.remove_job("testp", "echo")
    assert "plugin:testp:echo" not in client.broker.event_tasks


async def test_an_attempt_whose_lease_was_lost_sends_no_event(
    client: JobScheduler, start_worker: Any, redis_client: Any, tenant: str
) -> None:
    """An attempt whose lease another worker took over (its token changed) is not recorded
    (job_lease_lost), and its callback does not run: another worker may be running the job."""
    recorder = Recorder()

    async def overtaken(ctx: Any, job: Any) -> str:
        key = client.broker.queue.keys.job(job.id)
        await redis_client.hset(key, "token", "another-worker:1")
        return "mine"

    async def setup(s: JobScheduler) -> None:
        await s.register_job(
            "testp", "echo", overtaken, on_completed=recorder.completed, on_failed=recorder.failed
        )

    await setup(client)
    with capture_logs() as logs:
        await start_worker(setup)
        job_id = await client.add_job("testp", "echo", None, tenant_id=tenant)
        await wait_for(lambda: [e for e in logs if e["event"] == "job_lease_lost"], timeout=20)
        await asyncio.sleep(0.3)
    assert recorder.calls == []
    [lost] = [e for e in logs if e["event"] == "job_lease_lost"]
    assert (lost["job_id"], lost["outcome"]) == (job_id, "completed")
