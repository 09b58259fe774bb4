"""Drain rate: how fast N waiting no-op jobs are run by real ``taskiq worker`` processes.

Method (the same for both systems):
1. start ``taskiq worker ... --workers W`` on an empty queue of its own; wait until every worker
   process has started (it adds its pid to a Redis set) and run 300 warm-up jobs through it;
2. SIGSTOP the worker processes, put N no-op jobs in the queue, then one marker job (it runs
   last: FIFO for plain taskiq, same priority and a later sequence number for drm-taskiq); with
   ``backlog`` B, B more no-op jobs go behind them (drm-taskiq: priority 10, plain: after the
   marker in the list), so the queue holds B..B+N jobs while the N are measured;
3. SIGCONT the workers: the clock starts;
4. end points: ``marker``: the time the marker job ran (it records it in Redis); for drm-taskiq
   also ``acked``: wait and active sets empty (every job settled in Redis, its ledger entry
   written) and ``recorded``: ledger stream empty as well (settle.lua runs only after the
   PostgreSQL commit, so every plugin_runs / jobs row is committed).
The rate is N / (end point - start). The headline for drm-taskiq is ``recorded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from bench.common import CpuProbe, ProcGroup, command_costs, own_usec, redis_cpu_seconds, say
from bench.systems import DrmSystem, System


async def _watch_ledger(system: System, queue: str, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        state = await system.pending(queue)
        peak[0] = max(peak[0], state.get("ledger", 0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)


async def run_drain(
    system: System,
    *,
    workers: int,
    n: int,
    tag: str,
    backlog: int = 0,
    on_start: Any = None,
    on_end: Any = None,
) -> dict[str, Any]:
    """Measure one drain; see the module docstring."""
    queue = tag
    say(f"{system.label}: drain {n} jobs, {workers} worker process(es), backlog {backlog}")
    group: ProcGroup = system.start_workers(queue, workers, tag)
    rows_before = await system.rows()
    uniq = ""
    result: dict[str, Any] = {
        "system": system.name,
        "workers": workers,
        "jobs": n,
        "backlog": backlog,
    }
    try:
        await system.wait_ready(group, tag, workers)
        # Job ids are new in every run: a plugin_run_id derives from the job id (and its creation
        # time), and a row whose id exists already would not be written again.
        uniq = f"{time.time_ns() % 10**13:x}-"
        await system.warmup(queue, group, id_prefix=f"w{uniq}")
        rows_before = await system.rows()
        pids = group.worker_pids()
        mem_empty = await system.used_memory()
        mark_key = f"{system.namespace}:mark:{tag}"
        system.pause(pids)
        try:
            t_fill = time.monotonic()
            await system.fill(queue, n, id_prefix=f"m{uniq}")
            await system.push_mark(queue, mark_key)
            if backlog:
                await system.fill(queue, backlog, id_prefix=f"b{uniq}", backlog=True)
            fill_s = time.monotonic() - t_fill
            mem_full = await system.used_memory()
            probe = CpuProbe(lambda: redis_cpu_seconds(system.redis), group.pids)
            await probe.start()
            stats0 = await system.redis.info("commandstats")
        except BaseException:
            system.resume(pids)
            raise
        if on_start is not None:
            await on_start(group)
        t0 = time.time()
        system.resume(pids)
        stop = asyncio.Event()
        peak = [0]
        watcher = asyncio.create_task(_watch_ledger(system, queue, stop, peak))
        t_mark = await system.wait_mark(mark_key, group, within=600)
        ends = {"marker": t_mark - t0}
        if isinstance(system, DrmSystem) and not backlog:
            acked = recorded = None
            deadline = time.monotonic() + 120
            while recorded is None and time.monotonic() < deadline:
                state = await system.pending(queue)
                now = time.time()
                if acked is None and state["waiting"] == 0 and state["active"] == 0:
                    acked = now - t0
                if acked is not None and state["ledger"] == 0 and state["active"] == 0:
                    recorded = now - t0
                    break
                await asyncio.sleep(0.001)
            ends["acked"] = acked
            ends["recorded"] = recorded
        stop.set()
        await watcher
        cpu = await probe.stop(n)
        stats1 = await system.redis.info("commandstats")
        rss = group.rss()
        if on_end is not None:
            await on_end(group)
        mem_peak = await system.used_memory()
        rows_after = await system.rows()
        headline = ends.get("recorded") or ends["marker"]
        result.update(
            rate=round(n / headline, 1),
            seconds=round(headline, 3),
            rates={k: (round(n / v, 1) if v else None) for k, v in ends.items()},
            end_points_s={k: (round(v, 3) if v else None) for k, v in ends.items()},
            ledger_peak=peak[0] if isinstance(system, DrmSystem) else None,
            cpu=cpu,
            worker_rss_mb=rss,
            redis_used_memory_mb={
                "idle": round(mem_empty / 2**20, 1),
                "filled": round(mem_full / 2**20, 1),
                "after": round(mem_peak / 2**20, 1),
            },
            redis_bytes_per_waiting_job=round((mem_full - mem_empty) / (n + 1 + backlog)),
            fill_s=round(fill_s, 2),
            redis_commands=command_costs(stats0, stats1, n)[:8],
            redis_usec_per_job=own_usec(command_costs(stats0, stats1, n), system.name),
        )
        if rows_before is not None and rows_after is not None:
            result["plugin_runs_rows"] = rows_after - rows_before
            if not backlog and result["plugin_runs_rows"] != n + 1:
                say(f"  warning: {result['plugin_runs_rows']} plugin_runs rows for {n + 1} jobs")
        say(
            f"  -> {result['rate']} jobs/s"
            + (f" (end points: {result['rates']})" if len(ends) > 1 else "")
        )
    finally:
        group.kill() if backlog else group.stop()
        await system.clear(queue, {f"m{uniq}": n, f"b{uniq}": backlog, f"w{uniq}": 300})
    return result
