"""Secret plugin config values never reach logs, errors or plugin_runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from drm_taskiq import JobScheduler
from drm_taskiq.logs import mask_secrets
from drm_taskiq.redaction import forget_all, secret_values
from tests.conftest import wait_for

SECRET = "sk-live-4f9a8b7c6d5e"


@pytest.fixture(autouse=True)
def _clean_secrets() -> Iterator[None]:
    forget_all()
    yield
    forget_all()


def test_secret_keys_are_recognised() -> None:
    """Keys like password, api_key, *_token and *_secret mark secrets, at any depth."""
    config = {
        "api_key": "a1b2c3d4",
        "retention_s": 60,
        "nested": {"db_password": "hunter22", "name": "public"},
        "list": [{"refresh_token": "tok-123456"}],
    }
    assert sorted(secret_values(config)) == ["a1b2c3d4", "hunter22", "tok-123456"]


@pytest.mark.asyncio
async def test_secret_in_error_and_return_value_is_masked(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A handler that leaks its API key in an error or result leaves *** in runs and logs."""
    await db.execute(
        "UPDATE tenant_plugins SET config = $1::jsonb WHERE tenant_id = $2",
        json.dumps({"api_key": SECRET}),
        tenant,
    )

    async def leaky(ctx: Any, job: Any) -> Any:
        ctx.logger.info("calling the API", meta={"key": ctx.config["api_key"]})
        if job.data == "fail":
            raise RuntimeError(f"401 for key {ctx.config['api_key']}")
        return {"used": ctx.config["api_key"]}

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "leaky", leaky)

    await setup(client)
    with capture_logs(processors=[]) as logs:
        await start_worker(setup)
        ok = await client.add_job("testp", "leaky", "ok", tenant_id=tenant)
        await client.add_job("testp", "leaky", "fail", tenant_id=tenant)
        await wait_for(lambda: db.fetchval("SELECT count(*) = 2 FROM jobs"), timeout=15)
    rows = await db.fetch("SELECT result::text, error FROM plugin_runs")
    stored = json.dumps([dict(r) for r in rows]) + json.dumps(
        [dict(r) for r in await db.fetch("SELECT returnvalue::text, failed_reason FROM jobs")]
    )
    assert SECRET not in stored
    assert "401 for key ***" in stored
    status = await client.get_job_status("testp", "leaky", ok)
    assert status is not None
    assert status.returnvalue == {"used": "***"}
    rendered = [mask_secrets(json.dumps(event, default=str)) for event in logs]
    assert all(SECRET not in line for line in rendered)
