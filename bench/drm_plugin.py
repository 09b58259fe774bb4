"""The ``bench`` plugin: the jobs drm-taskiq runs in the benchmarks.

Loaded by worker and scheduler processes through ``DRM_PLUGINS=bench.drm_plugin:plugin``.
Jobs (registered by ``on_load`` for every tenant that enables the plugin):

- ``noop``: does nothing; registered with ``attempts=3``, exponential backoff and a 30 s
  timeout, so the retry policy and the timeout are armed as in production.
- ``mark``: appends the time it ran to the Redis list ``job.data["k"]``.
- ``lat``: appends (start time - ``job.data["t"]``) in ms to the Redis list ``job.data["k"]``.

When ``BENCH_READY_KEY`` is set, ``on_load`` adds the process id to that Redis set (the suite
waits for every worker process this way).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from drm_taskiq import define_plugin

if TYPE_CHECKING:
    from drm_taskiq.context import PluginContext
    from drm_taskiq.jobs import Job

NOOP_OPTIONS: dict[str, Any] = {
    "attempts": 3,
    "backoff": {"type": "exponential", "delay": 1000},
    "timeout": 30_000,
}

_client: aioredis.Redis | None = None
# The per-job breakdown of ``lat`` costs two more Redis round trips in the worker (plain
# taskiq's handler makes one): only with BENCH_LAT_BREAKDOWN=1.
BREAKDOWN = os.environ.get("BENCH_LAT_BREAKDOWN") == "1"


def client() -> aioredis.Redis:
    global _client  # noqa: PLW0603
    if _client is None:
        _client = aioredis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return _client


async def noop(ctx: PluginContext, job: Job) -> None:
    return None


async def mark(ctx: PluginContext, job: Job) -> None:
    await client().rpush(job.data["k"], repr(time.time()))


async def lat(ctx: PluginContext, job: Job) -> None:
    started = time.time()
    sent = float(job.data["t"])
    await client().rpush(job.data["k"], repr((started - sent) * 1000))
    if not BREAKDOWN:
        return
    # Where the time went (ms; the job hash holds whole milliseconds): enqueue script run
    # (``ts``), LifecycleMiddleware.pre_execute (``mark_started``), the handler. (The lease time
    # is not shown: an idle worker's take is sent before the job exists, see wait_and_take.)
    # Reads private attributes: a diagnostic of the benchmark only.
    try:
        queue = job._queue
        ts = await queue.redis.hget(queue.keys.job(job.id), "ts")
        broker = ctx.scheduler.scheduler.broker
        pre = broker._started.get(job.id)
        parts = {
            "to_enqueued": int(ts) - sent * 1000,
            "to_pre_execute": pre - int(ts),
            "to_handler": started * 1000 - pre,
        }
        await client().rpush(job.data["k"] + ":parts", json.dumps(parts))
    except Exception:  # noqa: S110  (internals changed: no breakdown)
        pass


async def on_load(ctx: PluginContext) -> None:
    await ctx.scheduler.register_job(ctx.plugin_id, "noop", noop, NOOP_OPTIONS)
    await ctx.scheduler.register_job(ctx.plugin_id, "mark", mark, None)
    await ctx.scheduler.register_job(ctx.plugin_id, "lat", lat, None)
    key = os.environ.get("BENCH_READY_KEY")
    if key:
        await client().sadd(key, os.getpid())


plugin = define_plugin(id="bench", name="Benchmark", version="1.0.0", on_load=on_load)
