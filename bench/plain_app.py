"""The baseline: plain taskiq with taskiq-redis's ListQueueBroker (LPUSH/BRPOP), no result
backend, no middlewares, no logging. Run as ``taskiq worker bench.plain_app:broker``.

Tasks:
- ``bench:noop``: does nothing (what the drain and enqueue benchmarks run).
- ``bench:mark``: appends the time it ran to a Redis list (the end marker of a drain).
- ``bench:lat``: appends (start time - enqueue time) in ms to a Redis list (latency benchmark).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis.asyncio as aioredis
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import ListQueueBroker

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_PLAIN_QUEUE", "bench_plain")

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


@broker.task(task_name="bench:lat")
async def lat(key: str, sent: float) -> None:
    started = time.time()
    await client().rpush(key, repr((started - sent) * 1000))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _ready(_: TaskiqState) -> None:
    key = os.environ.get("BENCH_READY_KEY")
    if key:
        await client().sadd(key, os.getpid())
