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
# The per-job breakdown of ``lat`` costs one more Redis round trip in the worker (plain
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


_marks: dict[str, dict[str, float]] = {}


def _instrument(broker: Any) -> None:
    """Record, in float seconds, when the broker hands each job out and when its handler is
    marked started (BENCH_LAT_BREAKDOWN only; wraps two private methods of this worker's
    broker: a diagnostic of the benchmark)."""
    if getattr(broker, "_bench_instrumented", False):
        return
    hand_out, mark_started = broker._hand_out, broker.mark_started

    def timed_hand_out(delivery: Any) -> Any:
        _marks.setdefault(delivery.job_id, {})["handed_out"] = time.time()
        return hand_out(delivery)

    def timed_mark_started(job_id: str) -> None:
        _marks.setdefault(job_id, {})["pre_execute"] = time.time()
        mark_started(job_id)

    broker._hand_out, broker.mark_started = timed_hand_out, timed_mark_started
    broker._bench_instrumented = True


async def lat(ctx: PluginContext, job: Job) -> None:
    started = time.time()
    sent = float(job.data["t"])
    await client().rpush(job.data["k"], repr((started - sent) * 1000))
    if not BREAKDOWN:
        return
    # Where the time went (ms): from the producer's send to the broker handing the job out
    # (producer, enqueue script, the worker's wake-up and take), to the lifecycle middleware's
    # pre_execute (taskiq's receiver, parsing the message), to this handler (taskiq's
    # run_task, dependency injection, run_plugin_job). The first jobs of a worker have no
    # marks (instrumented at its first lat job).
    try:
        from drm_taskiq.broker import broker  # noqa: PLC0415  (this worker's, process-wide)

        _instrument(broker)
        marks = _marks.pop(job.id, None)
        if not marks or len(marks) < 2:
            return
        parts = {
            "to_handed_out": (marks["handed_out"] - sent) * 1000,
            "to_pre_execute": (marks["pre_execute"] - marks["handed_out"]) * 1000,
            "to_handler": (started - marks["pre_execute"]) * 1000,
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
