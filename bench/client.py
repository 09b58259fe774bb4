"""A producer process: enqueue rate, or a steady stream for the latency benchmark.

``python -m bench.client '<json spec>'`` prints one JSON result on stdout. The spec:
``{"system": "drm"|"plain", "mode": "enqueue"|"latency", "namespace": ..., "queue": ...,
  "n": jobs per run, "producers": [1, 32], "rate": jobs/s, "duration": s, "key": list}``.

drm-taskiq is used as an application would: a started ``JobScheduler`` client with the bench
plugin's jobs registered, ``await task.kiq(data, tenant_id=...)`` through the validation and
lifecycle middlewares, and structlog JSON logs at INFO on stderr. Plain taskiq: ``await
task.kiq()`` on a ListQueueBroker, no middlewares, no logging.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import DATABASE_URL, REDIS_URL, TENANT, percentile

Kiq = Callable[[Any], Awaitable[Any]]


async def _drm_client(spec: dict[str, Any]) -> tuple[Callable[[str], Kiq], Callable[[], Any]]:
    from bench.drm_plugin import plugin  # noqa: PLC0415
    from drm_taskiq.jobs import JobScheduler  # noqa: PLC0415
    from drm_taskiq.logs import configure_logging  # noqa: PLC0415
    from drm_taskiq.queue_broker import DrmBroker  # noqa: PLC0415
    from drm_taskiq.settings import load_settings  # noqa: PLC0415

    settings = load_settings(
        redis_url=REDIS_URL,
        database_url=DATABASE_URL,
        db_schema=spec["namespace"],
        key_prefix=spec["namespace"],
        queue=spec["queue"],
        entry_points=False,
        migrate_on_start=False,
        tenant_enqueue_rate=0,
    )
    configure_logging(settings.log_format, settings.log_level)
    scheduler = JobScheduler(DrmBroker(settings, own_process=False), plugins=[plugin])
    await scheduler.start()
    await scheduler.load_plugins()
    if spec["mode"] == "latency" and os.environ.get("BENCH_LAT_BREAKDOWN") == "1":
        _time_sends(scheduler)

    def kiq(job: str) -> Kiq:
        task = scheduler.broker.find_task(f"plugin:bench:{job}")
        assert task is not None

        async def send(data: Any) -> Any:
            return await task.kiq(data, tenant_id=TENANT)

        return send

    return kiq, scheduler.close


async def _plain_client(spec: dict[str, Any]) -> tuple[Callable[[str], Kiq], Callable[[], Any]]:
    from taskiq.kicker import AsyncKicker  # noqa: PLC0415
    from taskiq_redis import ListQueueBroker  # noqa: PLC0415

    broker = ListQueueBroker(url=REDIS_URL, queue_name=f"{spec['namespace']}:{spec['queue']}")
    await broker.startup()

    def kiq(job: str) -> Kiq:
        kicker = AsyncKicker(f"bench:{job}", broker, {})

        async def send(data: Any) -> Any:
            if job == "lat":
                return await kicker.kiq(data["k"], data["t"])
            return await kicker.kiq(data) if data is not None else await kicker.kiq()

        return send

    return kiq, broker.shutdown


async def enqueue(spec: dict[str, Any], kiq: Callable[[str], Kiq]) -> dict[str, Any]:
    send = kiq("noop")
    for _ in range(200):  # warm-up: connections, tenant cache, code paths
        await send(None)
    out: dict[str, Any] = {}
    for producers in spec["producers"]:
        per = max(spec["n"] // producers, 1)

        async def producer(per: int = per) -> None:
            for _ in range(per):
                await send(None)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        total = per * producers
        out[str(producers)] = {
            "jobs": total,
            "seconds": round(elapsed, 3),
            "rate": round(total / elapsed, 1),
            "client_cpu_us_per_job": round(cpu / total * 1e6, 1),
        }
    return out


_sends: list[float] = []  # BENCH_LAT_BREAKDOWN: when each enqueue script call began


def _time_sends(scheduler: Any) -> None:
    """BENCH_LAT_BREAKDOWN (drm-taskiq only): record when each ``enqueue`` call of the queue
    begins, that is when the producer's own work before the send ends (a diagnostic of the
    benchmark: wraps one method of this producer's queue)."""
    queue = scheduler.broker.queue
    enqueue = queue.enqueue

    async def timed(*args: Any, **kwargs: Any) -> Any:
        _sends.append(time.time())
        return await enqueue(*args, **kwargs)

    queue.enqueue = timed


async def latency(spec: dict[str, Any], kiq: Callable[[str], Kiq]) -> dict[str, Any]:
    send = kiq("lat")
    rate, duration, key = float(spec["rate"]), float(spec["duration"]), spec["key"]
    count = int(rate * duration)
    calls: list[float] = []
    sent: list[float] = []
    start = time.perf_counter() + 0.05
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter()
        sent.append(time.time())
        await send({"k": key, "t": sent[-1]})
        calls.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {
        "jobs": count,
        "achieved_rate": round(count / elapsed, 1),
        "kiq_ms": {
            "p50": round(percentile(calls, 50), 3),
            "p99": round(percentile(calls, 99), 3),
            "max": round(max(calls), 3),
        },
    }
    if len(_sends) == len(sent):  # ms from the job's t to its enqueue call, in job order
        out["to_send_ms"] = [round((b - a) * 1000, 3) for a, b in zip(sent, _sends, strict=True)]
        out["sent_at"] = sent
    return out


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    make = _drm_client if spec["system"] == "drm" else _plain_client
    kiq, close = await make(spec)
    try:
        if spec["mode"] == "enqueue":
            return await enqueue(spec, kiq)
        return await latency(spec, kiq)
    finally:
        await close()


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
