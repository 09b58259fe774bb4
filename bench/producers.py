"""Enqueue rate (1 and 32 concurrent producers) and enqueue-to-start latency at a steady rate.

Producers run in their own process (``bench.client``), as an application would; latency is
measured against one real worker process (``--workers 1``) that is started, warmed up and idle
when the stream begins. Each ``lat`` job records (handler start time - time taken just before
``kiq``) in a Redis list; p50/p99 are computed over all jobs of the stream.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.common import (
    command_costs,
    log_dir,
    own_usec,
    percentile,
    redis_cpu_seconds,
    say,
    wait_until,
)
from bench.systems import System


async def run_client(
    system: System, spec: dict[str, Any], name: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    spec = {"system": system.name, "namespace": system.namespace, **spec}
    log = (log_dir() / f"client-{name}.log").open("wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.client",
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**system.client_env(spec["queue"]), **(env or {})},
        )
        out, _ = await proc.communicate()
    finally:
        log.close()
    if proc.returncode != 0:
        tail = (log_dir() / f"client-{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"client {name} failed ({proc.returncode}):\n{tail}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def run_enqueue(
    system: System, n: int, producers: list[int], env: dict[str, str] | None = None
) -> dict[str, Any]:
    say(
        f"{system.label}: enqueue {n} jobs with {producers} producer(s)"
        + (f", {env}" if env else "")
    )
    queue = "enqueue"
    try:
        result = await run_client(
            system,
            {"mode": "enqueue", "queue": queue, "n": n, "producers": producers},
            f"{system.name}-enqueue",
            env,
        )
    finally:
        await system.clear(queue)
    for key, value in result.items():
        say(f"  -> {key} producer(s): {value['rate']} jobs/s")
    return result


async def run_latency(
    system: System, rate: float, duration: float, worker_env: dict[str, str] | None = None
) -> dict[str, Any]:
    say(
        f"{system.label}: latency at {rate:g} jobs/s for {duration:g} s, 1 worker process"
        + (f", {worker_env}" if worker_env else "")
    )
    queue = tag = "latency"
    uniq = "w"
    key = f"{system.namespace}:lat"
    group = system.start_workers(queue, 1, tag, extra=worker_env)
    try:
        await system.wait_ready(group, tag, 1)
        uniq = f"w{time.time_ns() % 10**13:x}-"
        await system.warmup(queue, group, id_prefix=uniq)
        await asyncio.sleep(0.5)
        stats0 = await system.redis.info("commandstats")
        cpu0 = await redis_cpu_seconds(system.redis)
        produced = await run_client(
            system,
            {"mode": "latency", "queue": queue, "rate": rate, "duration": duration, "key": key},
            f"{system.name}-latency",
        )

        async def complete() -> bool:
            return int(await system.redis.llen(key)) >= produced["jobs"]

        await wait_until(complete, within=60, what="latency samples", procs=[group])
        # Redis's time per job during the round (the shared server's other clients included):
        # at a low rate each script runs with cold caches
        costs = command_costs(stats0, await system.redis.info("commandstats"), produced["jobs"])
        redis_time = {
            "cpu_us_per_job": round(
                (await redis_cpu_seconds(system.redis) - cpu0) * 1e6 / max(produced["jobs"], 1)
            ),
            "usec_per_job": own_usec(costs, system.name),
            "commands": costs[:6],
        }
        samples = [float(x) for x in await system.redis.lrange(key, 0, -1)]
        await asyncio.sleep(0.2)
        parts = [json.loads(x) for x in await system.redis.lrange(f"{key}:parts", 0, -1)]
    finally:
        group.stop()
        await system.clear(queue, {uniq: 300})
        await system.redis.delete(key, f"{key}:parts")
    result = {
        "rate": rate,
        "duration_s": duration,
        **produced,
        "p50_ms": round(percentile(samples, 50), 3),
        "p90_ms": round(percentile(samples, 90), 3),
        "p99_ms": round(percentile(samples, 99), 3),
        "max_ms": round(max(samples), 3),
        "samples": len(samples),
        "redis": redis_time,
        "samples_ms": samples,  # for the phase's pooled p99 (not kept in the JSON)
    }
    to_send = result.pop("to_send_ms", None)
    result.pop("sent_at", None)
    if parts and to_send and len(to_send) >= len(parts):
        # the producer's part of to_handed_out; jobs run in the order sent (one worker), and
        # the first jobs have no parts (the worker instruments itself at its first lat job)
        for part, before_send in zip(parts, to_send[len(to_send) - len(parts) :], strict=True):
            part["to_send"] = before_send
            part["send_to_handed_out"] = part["to_handed_out"] - before_send
    if parts:
        result["breakdown_ms"] = {
            name: {
                "p50": round(percentile([p[name] for p in parts], 50), 2),
                "p99": round(percentile([p[name] for p in parts], 99), 2),
                "mean": round(sum(p[name] for p in parts) / len(parts), 3),
            }
            for name in parts[0]
        }
    say(f"  -> p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    return result
