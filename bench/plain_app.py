"""The baseline: plain taskiq with taskiq-redis's ListQueueBroker (LPUSH/BRPOP), no result
backend, no middlewares, no logging. Run as ``taskiq worker bench.plain_app:broker``.

Tasks:
- ``bench:noop``: does nothing (what the drain and enqueue benchmarks run).
- ``bench:mark``: appends the time it ran to a Redis list (the end marker of a drain).
- ``bench:lat``: appends (start time - enqueue time) in ms to a Redis list (latency benchmark).

With ``BENCH_PLAIN_ROWS`` (the ``latency_rows`` phase), ``bench:lat`` also records a row per
job in ``plain_runs`` (``plugin_runs``' columns, keys and indexes) in the schema
``BENCH_PLAIN_SCHEMA``, after it took its sample: ``insert`` (one INSERT per job, as a handler
would write it) or ``copy`` (rows buffered, one COPY every 200 ms): what plain taskiq's latency
is with a run ledger of the simplest kinds on the same machine.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import ListQueueBroker

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_PLAIN_QUEUE", "bench_plain")
ROWS = os.environ.get("BENCH_PLAIN_ROWS", "")  # "", "insert" or "copy"
ROW_COLUMNS = ("plugin_run_id", "plugin_id", "tenant_id", "hook_name", "status", "executed_at")

broker = ListQueueBroker(url=REDIS_URL, queue_name=QUEUE)
_client: aioredis.Redis | None = None


def client() -> aioredis.Redis:
    global _client  # noqa: PLW0603
    if _client is None:
        _client = aioredis.from_url(REDIS_URL)
    return _client


@broker.task(task_name="bench:noop")
async def noop(data: Any = None) -> None:
    return None


@broker.task(task_name="bench:mark")
async def mark(key: str) -> None:
    await client().rpush(key, repr(time.time()))


_pool: asyncpg.Pool | None = None
_buffer: list[tuple[Any, ...]] = []


@broker.task(task_name="bench:lat")
async def lat(key: str, sent: float) -> None:
    started = time.time()
    await client().rpush(key, repr((started - sent) * 1000))
    if ROWS:
        row = (uuid.uuid4(), "bench", "acme", "job:lat", "success", datetime.now(UTC))
        if ROWS == "copy":
            _buffer.append(row)
        else:
            assert _pool is not None
            await _pool.execute(
                "INSERT INTO plain_runs (plugin_run_id, plugin_id, tenant_id, hook_name, status,"
                " executed_at) VALUES ($1, $2, $3, $4, $5, $6)",
                *row,
            )


async def _copy_every(seconds: float) -> None:
    assert _pool is not None
    while True:
        await asyncio.sleep(seconds)
        rows, _buffer[:] = list(_buffer), []
        if rows:
            await _pool.copy_records_to_table("plain_runs", records=rows, columns=ROW_COLUMNS)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _ready(state: TaskiqState) -> None:
    global _pool  # noqa: PLW0603
    if ROWS:
        _pool = await asyncpg.create_pool(
            os.environ["BENCH_DATABASE_URL"],
            min_size=1,
            max_size=4,
            server_settings={"search_path": os.environ["BENCH_PLAIN_SCHEMA"]},
        )
        if ROWS == "copy":
            state.copier = asyncio.create_task(_copy_every(0.2))
    key = os.environ.get("BENCH_READY_KEY")
    if key:
        await client().sadd(key, os.getpid())
