"""The run ledger on its own: rows/s one writer sustains, and its CPU cost per row.

The ledger stream of a queue is filled with N entries exactly as ``finish.lua`` writes them for a
completed attempt (same JSON fields). One :class:`drm_taskiq.runlog.RunLedger`, in this process,
then drains the stream (``RunLedger.drain()``: read a batch, write ``plugin_runs`` + ``jobs``
rows in one transaction, then settle.lua), for several batch sizes
(``DRM_LEDGER_BATCH``, default 500). The cost per row is split into the writer's own CPU (this
process), PostgreSQL's CPU (all its processes) and Redis's CPU.

In a worker under load the ledger reads whatever is in the stream as soon as anything is there
(XREADGROUP BLOCK returns at the first entry), so its batches are small; the drain benchmark
reports the largest backlog it saw (``ledger_peak``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import (
    PLUGIN_ID,
    TENANT,
    cpu_by_pid,
    cpu_delta,
    postgres_pids,
    redis_cpu_seconds,
    say,
)
from bench.profile import Recorder, merge, summarize
from bench.systems import DrmSystem

_FILL = """
local now = ARGV[4]
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local entry = {
    id = ARGV[1] .. i, plugin = ARGV[5], tenant = ARGV[6], job = ARGV[7], ts = now,
    started = now, at = now, attempt = 1, status = 'success', state = 'completed', final = 1,
    outcome = 'completed', value = 'null', extra = '{}', gen = 0
  }
  redis.call('XADD', KEYS[1], '*', 'e', cjson.encode(entry))
end
return 1
"""


async def run_ledger(
    drm: DrmSystem, *, rows: int, batches: list[int], profile_batch: int | None = None
) -> list[dict[str, Any]]:
    """One measured drain per batch size; with ``profile_batch``, one more drain of that batch
    size under py-spy (reported, not measured)."""
    from drm_taskiq import store  # noqa: PLC0415
    from drm_taskiq.redis_queue import RedisQueue  # noqa: PLC0415
    from drm_taskiq.runlog import RunLedger  # noqa: PLC0415

    queue = "ledger"
    settings = drm.settings(queue)
    pool = await store.create_pool(settings, max_size=2)
    fill = drm.redis.register_script(_FILL)
    results = []
    try:
        rq = RedisQueue(drm.redis, drm.namespace, queue)
        runs = [(batch, False) for batch in batches]
        if profile_batch is not None:
            runs.append((profile_batch, True))
        for batch, profiled in runs:
            say(
                f"drm-taskiq: run ledger, {rows} entries, batch {batch}"
                + (" (under py-spy)" if profiled else "")
            )
            ledger = RunLedger(rq, pool, consumer="bench", batch=batch, block_ms=200)
            # each run starts from an empty stream (a capped earlier run may have left entries)
            await drm.redis.delete(rq.keys.ledger)
            await ledger.ensure_group()
            prefix = f"L{batch}-{time.time_ns()}-"
            for first in range(1, rows + 1, 10_000):
                await fill(
                    keys=[rq.keys.ledger],
                    args=[
                        prefix,
                        first,
                        min(first + 9999, rows),
                        int(time.time() * 1000),
                        PLUGIN_ID,
                        TENANT,
                        "noop",
                    ],
                )
            before = int(await pool.fetchval("SELECT count(*) FROM plugin_runs"))
            recorder = Recorder("ledger") if profiled else None
            if recorder is not None:
                await recorder.start([os.getpid()])
            pg0, redis0 = cpu_by_pid(postgres_pids()), await redis_cpu_seconds(drm.redis)
            cpu0, t0 = time.process_time(), time.perf_counter()
            written = await ledger.drain(max_seconds=300)
            elapsed = time.perf_counter() - t0
            if recorder is not None:
                paths = await recorder.stop()
                if paths:
                    path = merge(paths, recorder.dir / "ledger.txt")
                    results.append(
                        {
                            "batch": batch,
                            "profile": True,
                            "file": str(path),
                            **summarize(path, focus=r"drm_taskiq/runlog\.py"),
                        }
                    )
                continue
            cpu = time.process_time() - cpu0
            pg = cpu_delta(pg0, cpu_by_pid(postgres_pids()))
            redis_cpu = await redis_cpu_seconds(drm.redis) - redis0
            after = int(await pool.fetchval("SELECT count(*) FROM plugin_runs"))
            left = int(await drm.redis.xlen(rq.keys.ledger))
            result = {
                "batch": batch,
                "entries": rows,
                "written": written,
                "rows_added": after - before,
                "stream_left": left,
                "seconds": round(elapsed, 3),
                "rows_per_s": round(written / elapsed, 1),
                "writer_cpu_us_per_row": round(cpu / max(written, 1) * 1e6, 1),
                "postgres_cpu_us_per_row": round(pg / max(written, 1) * 1e6, 1),
                "redis_cpu_us_per_row": round(redis_cpu / max(written, 1) * 1e6, 1),
            }
            results.append(result)
            say(
                f"  -> {result['rows_per_s']} rows/s, writer {result['writer_cpu_us_per_row']}"
                f" us/row, PostgreSQL {result['postgres_cpu_us_per_row']} us/row"
            )
    finally:
        await pool.close()
        await drm.clear(queue)
    return results
