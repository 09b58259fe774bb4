"""Cron: S schedules of one tenant firing on the same slot, two scheduler processes.

1. S rows are inserted into the ``schedules`` table of the bench schema, as ``register_job``
   would store them: 100 per tenant (``DRM_MAX_SCHEDULES_PER_TENANT``'s default; tenants
   ``cron1..cronT`` with the ``bench`` plugin enabled), jobs ``c1..c100``, the given cron
   expression, UTC.
2. Two ``taskiq scheduler drm_taskiq.scheduler:sched`` processes start. The suite waits until
   both run and every schedule has its shared "last fired" entry (the first pass is done).
3. The next slot at least 2 s away is the measured one. Between the first pass and the slot the
   schedulers are idle: their CPU use then is the cost of keeping S schedules loaded.
4. After the slot: every job ``cron:<tenant>:bench:cN:<slot ms>`` found in the wait set is one
   firing. ``enqueued within`` is (latest job hash ``ts``) - slot, i.e. when the last of the S
   jobs was enqueued; the duplicates check counts the jobs (one per schedule) and the jobs
   both schedulers report as created for that slot in their ``schedules_fired`` lines (a second
   enqueue of a slot would be counted twice; an enqueue refused because the id exists is
   counted as ``duplicates`` there: wasted work, not a duplicate job).
No worker runs: only enqueueing is measured.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    BIN_DIR,
    PLUGIN_ID,
    SCHEDULES_PER_TENANT,
    ProcGroup,
    cpu_seconds,
    drm_env,
    percentile,
    rss_mb,
    say,
    wait_until,
)
from bench.profile import Recorder, merge, summarize
from bench.systems import DrmSystem


def _next_slot(cron: str, after: float) -> float:
    from drm_taskiq.cron import next_slot  # noqa: PLC0415

    slot = next_slot(cron, "UTC", datetime.fromtimestamp(after, tz=UTC))
    return slot.timestamp()


async def run_cron(  # noqa: PLR0912
    drm: DrmSystem, *, schedules: int, cron: str, within: float, profile: bool = False
) -> dict[str, Any]:
    say(f"drm-taskiq: cron, {schedules} schedules '{cron}', 2 scheduler processes")
    queue = f"cron{schedules}"
    keys = drm.keys(queue)
    pool = drm.pool
    tenants = max(1, -(-schedules // SCHEDULES_PER_TENANT))
    per_tenant = -(-schedules // tenants)
    await pool.execute("DELETE FROM schedules")
    await pool.execute(
        "INSERT INTO tenants (tenant_id) SELECT 'cron' || t FROM generate_series(1, $1::int) t"
        " ON CONFLICT DO NOTHING",
        tenants,
    )
    await pool.execute(
        "INSERT INTO tenant_plugins (tenant_id, plugin_id, enabled)"
        " SELECT 'cron' || t, $2, TRUE FROM generate_series(1, $1::int) t"
        " ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET enabled = TRUE",
        tenants,
        PLUGIN_ID,
    )
    await pool.execute(
        "INSERT INTO schedules (schedule_id, tenant_id, plugin_id, job_name, cron, tz, options)"
        " SELECT 'cron' || t || ':' || $1 || ':c' || i, 'cron' || t, $1, 'c' || i, $2, 'UTC',"
        " '{}'::jsonb FROM generate_series(0, $3::int - 1) n,"
        " LATERAL (SELECT n / $4::int + 1 AS t, n % $4::int + 1 AS i) AS x",
        PLUGIN_ID,
        cron,
        schedules,
        per_tenant,
    )
    env = drm_env(drm.namespace, queue)
    argv = [str(BIN_DIR / "taskiq"), "scheduler", "drm_taskiq.scheduler:sched"]
    procs = [ProcGroup(f"scheduler{i}-{schedules}", argv, env) for i in range(2)]
    recorder = Recorder(f"scheduler-{schedules}") if profile else None
    result: dict[str, Any] = {
        "schedules": schedules,
        "cron": cron,
        "schedulers": 2,
        "tenants": tenants,
    }
    try:
        t_start = time.time()

        async def started() -> bool:
            return all(p.events("scheduler_started") for p in procs)

        await wait_until(started, within=120, what="schedulers started", procs=procs)

        async def first_pass() -> bool:
            return int(await drm.redis.hlen(f"{keys.base}:cron:last")) >= schedules

        await wait_until(first_pass, within=180, interval=0.2, what="first pass", procs=procs)
        result["startup_s"] = round(time.time() - t_start, 2)
        await asyncio.sleep(1.5)  # the slower scheduler finishes its own first pass
        slot = _next_slot(cron, time.time() + 2)
        slot_ms = round(slot * 1000)
        # idle cost: scheduler CPU between the first pass and the slot
        cpu0, t0 = [cpu_seconds(p.pids()) for p in procs], time.time()
        await asyncio.sleep(max(slot - time.time() - 0.3, 0))
        idle_s = time.time() - t0
        cpu1 = [cpu_seconds(p.pids()) for p in procs]
        result["idle_window_s"] = round(idle_s, 1)
        # (with a seconds cron an earlier slot may fire inside the window: not idle then)
        result["idle_cpu_pct_per_scheduler"] = (
            [round(100 * (b - a) / max(idle_s, 1e-9), 1) for a, b in zip(cpu0, cpu1, strict=True)]
            if len(cron.split()) == 5
            else None
        )
        if recorder is not None:
            await recorder.start([procs[1].worker_pids()[0]])
        suffix = f":{slot_ms}".encode()

        async def fired() -> list[bytes]:
            members: list[bytes] = await drm.redis.zrange(keys.wait, 0, -1)
            return [m for m in members if m.endswith(suffix)]

        ids: list[bytes] = []
        while time.time() < slot + within:
            ids = await fired()
            if len(ids) >= schedules:
                break
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            await asyncio.sleep(0.25)

        def logged() -> int:
            return sum(p.log_path.stat().st_size for p in procs)

        # let the slower scheduler finish its pass too (it logs every enqueue or duplicate it
        # meets): wait until neither scheduler has logged anything for 2 s
        last_count, quiet_since = -1, time.time()
        while time.time() < slot + within:
            count = logged()
            if count != last_count:
                last_count, quiet_since = count, time.time()
            elif time.time() - quiet_since >= 2:
                break
            await asyncio.sleep(0.5)
        cpu3 = [cpu_seconds(p.pids()) for p in procs]
        ids = await fired()  # again: jobs enqueued after the wait above count too
        if recorder is not None:
            outs = await recorder.stop()
            if outs:
                path = merge(outs, recorder.dir / f"scheduler-{schedules}.txt")
                result["profile"] = {"file": str(path), **summarize(path)}
        ts_values = []
        async with drm.redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.hget(keys.job(member.decode()), "ts")
            ts_values = [int(v) for v in await pipe.execute() if v is not None]
        late = sorted((v - slot_ms) / 1000 for v in ts_values)
        created = {p.name: 0 for p in procs}
        refused = {p.name: 0 for p in procs}
        summaries = {p.name: 0 for p in procs}
        slot_iso = datetime.fromtimestamp(slot, tz=UTC).isoformat()
        for proc in procs:
            for event in proc.events("schedules_fired"):
                if event.get("slot") != slot_iso:
                    continue
                summaries[proc.name] += 1
                created[proc.name] += int(event.get("count", 0))
                refused[proc.name] += int(event.get("duplicates", 0))
        burst_s = max(late[-1], 1e-3) if late else None
        result.update(
            slot=datetime.fromtimestamp(slot, tz=UTC).isoformat(),
            jobs=len(ids),
            distinct_jobs=len(set(ids)),
            all_enqueued=len(ids) == schedules,
            enqueued_within_s=round(late[-1], 3) if late else None,
            first_enqueued_s=round(late[0], 3) if late else None,
            p50_enqueued_s=round(percentile(late, 50), 3) if late else None,
            created_per_scheduler=created,
            refused_duplicates_per_scheduler=refused,
            schedules_fired_lines=summaries,
            # jobs created more than once for one id (by either scheduler)
            duplicates=sum(created.values()) - len(set(ids)),
            burst_cpu_s_per_scheduler=[round(b - a, 2) for a, b in zip(cpu1, cpu3, strict=True)],
            scheduler_cpu_us_per_schedule=(
                round(sum(b - a for a, b in zip(cpu1, cpu3, strict=True)) / 2 / schedules * 1e6)
            ),
            enqueue_ms_per_schedule=(
                round(burst_s * 1000 / schedules, 3) if burst_s is not None else None
            ),
            scheduler_rss_mb=[rss_mb(p.worker_pids()[0]) for p in procs],
        )
        say(
            f"  -> {result['jobs']}/{schedules} enqueued, last {result['enqueued_within_s']} s"
            f" after the slot, duplicates {result['duplicates']}, created per scheduler"
            f" {list(created.values())}, refused {list(refused.values())},"
            f" idle CPU {result['idle_cpu_pct_per_scheduler']} %"
        )
    finally:
        if recorder is not None and recorder.procs:
            await recorder.stop()
        for proc in procs:
            proc.kill()
        await pool.execute("DELETE FROM schedules")
        await drm.clear(queue)
    return result
