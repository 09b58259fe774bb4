"""Cron that fires exactly once per slot, with any number of scheduler processes.

Each firing is identified by (schedule id, slot time) and enqueued with the job id
``cron:{schedule id}:{slot ms}``, which the broker accepts once; the last fired slot of every
schedule is shared in Redis, so a scheduler that starts, restarts or lags never fires a slot
another one fired. Slots are computed by croniter in the schedule's IANA time zone.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from croniter import croniter
from redis.exceptions import RedisError
from taskiq import ScheduleSource, TaskiqScheduler
from taskiq.kicker import AsyncKicker
from taskiq.schedule_sources import LabelScheduleSource

from drm_taskiq.options import LABEL_DEDUP, JobOptions, task_name, to_croniter

if TYPE_CHECKING:
    from drm_taskiq.jobs import JobScheduler
    from drm_taskiq.queue_broker import DrmBroker

log = structlog.get_logger()

MissedPolicy = Literal["latest", "skip"]
ON_TIME_S = 5.0  # a slot fired later than this after its time counts as missed
CRON_DEDUP_TTL_S = 3600
FIRE_CONCURRENCY = 256  # schedules fired at once within one tick


@dataclass(slots=True)
class CronSchedule:
    """One schedule: what to enqueue, and when."""

    schedule_id: str
    task_name: str
    cron: str
    tz: str = "UTC"
    labels: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    missed: MissedPolicy = "latest"
    overlap: Literal["allow", "skip"] = "allow"
    tenant_id: str = ""
    plugin_id: str = ""

    def key(self) -> tuple[Any, ...]:
        return (
            self.task_name,
            self.cron,
            self.tz,
            json.dumps(self.labels, sort_keys=True, default=str),
        )


def next_slot(cron: str, tz: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC.

    Daylight-saving rule (as classic cron): a local time that does not exist (spring forward)
    fires at the first instant after the gap; a local time that happens twice (fall back) fires
    once, at its first occurrence, unless the hour field is a wildcard (``*`` or ``*/n``), in
    which case every real hour fires.
    """
    zone = ZoneInfo(tz)
    expression = to_croniter(cron)
    hour_field = cron.split()[-4]
    hour_wildcard = hour_field == "*" or hour_field.startswith("*/")
    current = after.astimezone(zone)
    for _ in range(4):
        nxt: datetime = croniter(expression, current).get_next(datetime)
        if hour_wildcard or not _second_occurrence(nxt, zone):
            return nxt.astimezone(UTC)
        current = nxt
    return nxt.astimezone(UTC)


def _second_occurrence(moment: datetime, zone: ZoneInfo) -> bool:
    """Whether ``moment`` is the repeated (second) instance of an ambiguous local time."""
    naive = moment.astimezone(zone).replace(tzinfo=None)
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return False
    return moment.astimezone(UTC) == second.astimezone(UTC)


def due_slots(
    cron: str, tz: str, last: datetime, now: datetime, limit: int = 1000
) -> list[datetime]:
    """Slots in (last, now], oldest first (at most ``limit``: the newest ones)."""
    slots: list[datetime] = []
    current = last
    while True:
        current = next_slot(cron, tz, current)
        if current > now:
            return slots[-limit:]
        slots.append(current)
        if len(slots) > limit * 2:
            slots = slots[-limit:]


def slots_to_fire(slots: list[datetime], now: datetime, missed: MissedPolicy) -> list[datetime]:
    """Which due slots to fire: every on-time one (at most ``ON_TIME_S`` late); when none is on
    time, the newest missed one under policy ``latest`` and nothing under ``skip``."""
    if not slots:
        return []
    on_time = [s for s in slots if (now - s).total_seconds() <= ON_TIME_S]
    if on_time:
        return on_time
    return slots[-1:] if missed == "latest" else []


class CronEngine:
    """Fires due schedules; one instance per scheduler process."""

    def __init__(self, broker: DrmBroker, jobs: JobScheduler, *, tick_s: float = 0.2) -> None:
        self.broker = broker
        self.jobs = jobs
        self.tick_s = tick_s
        self.schedules: dict[str, CronSchedule] = {}
        self._next: dict[str, datetime] = {}
        self._last: dict[str, datetime] = {}
        self._loaded_at = 0.0
        base = f"{{{broker.settings.key_prefix}:{broker.settings.queue}}}"
        self.last_key = f"{base}:cron:last"
        self.lastjob_key = f"{base}:cron:lastjob"

    async def load(self) -> None:
        """Read plugin schedules from PostgreSQL and static ones from task labels."""
        found: dict[str, CronSchedule] = {}
        rows = await self.jobs.pool.fetch(
            "SELECT s.schedule_id, s.tenant_id, s.plugin_id, s.job_name, s.cron, s.tz, s.options,"
            " s.data FROM schedules s JOIN tenant_plugins tp ON tp.tenant_id = s.tenant_id"
            " AND tp.plugin_id = s.plugin_id AND tp.enabled"
        )
        for row in rows:
            options = json.loads(row["options"]) if row["options"] else {}
            try:
                opts = JobOptions.coerce(options)
            except ValueError:
                log.error("schedule_options_invalid", schedule_id=row["schedule_id"])
                opts = JobOptions()
            found[row["schedule_id"]] = CronSchedule(
                schedule_id=row["schedule_id"],
                task_name=task_name(row["plugin_id"], row["job_name"]),
                cron=row["cron"],
                tz=row["tz"],
                labels=opts.labels(self.broker.settings.default_timeout_ms),
                args=[json.loads(row["data"])] if row["data"] else [],
                kwargs={"tenant_id": row["tenant_id"]},
                missed=opts.missed,
                overlap=opts.overlap,
                tenant_id=row["tenant_id"],
                plugin_id=row["plugin_id"],
            )
        for schedule in await label_schedules(self.broker):
            found[schedule.schedule_id] = schedule
        for schedule_id in list(self.schedules):
            if schedule_id not in found:
                log.info("schedule_removed", schedule_id=schedule_id)
                self._next.pop(schedule_id, None)
        for schedule_id, schedule in found.items():
            old = self.schedules.get(schedule_id)
            if old is None or old.key() != schedule.key():
                self._next.pop(schedule_id, None)
                if old is None:
                    log.info(
                        "schedule_added",
                        schedule_id=schedule_id,
                        cron=schedule.cron,
                        tz=schedule.tz,
                    )
        self.schedules = found
        self._loaded_at = time.monotonic()

    async def _last_fired(self, schedule_id: str, now: datetime) -> datetime:
        redis = self.broker.redis
        raw = await redis.hget(self.last_key, schedule_id)
        if raw is None:
            await redis.hsetnx(self.last_key, schedule_id, int(now.timestamp() * 1000))
            raw = await redis.hget(self.last_key, schedule_id)
        return datetime.fromtimestamp(int(raw or 0) / 1000, tz=UTC)

    async def tick(self, now: datetime | None = None) -> int:
        """Fire every due slot; returns how many jobs were enqueued (or found already there).

        A failure to reload keeps the schedules already known; a failure of one schedule (a bad
        expression, a failed enqueue) is logged and does not stop the others. A slot whose
        enqueue failed is not marked fired, so the next tick tries it again.
        """
        now = now or datetime.now(UTC)
        if time.monotonic() - self._loaded_at >= self.broker.settings.schedule_poll_s:
            try:
                await self.load()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._loaded_at = time.monotonic()
                log.warning("schedules_reload_failed", error=f"{type(exc).__name__}: {exc}")
        due: list[CronSchedule] = []
        paused: set[tuple[str, str]] | None = None
        for schedule_id, schedule in list(self.schedules.items()):
            nxt = self._next.get(schedule_id)
            if nxt is not None and nxt > now:
                continue
            if schedule.tenant_id:
                paused = await self.broker.queue.paused() if paused is None else paused
                if (schedule.tenant_id, schedule.plugin_id) in paused:
                    self._skip_paused(schedule, now)
                    continue
            due.append(schedule)
        # Schedules are independent: fire them concurrently, so that many schedules sharing a
        # slot cost a few round trips of latency, not one per schedule.
        limit = asyncio.Semaphore(FIRE_CONCURRENCY)

        async def one(schedule: CronSchedule) -> int:
            async with limit:
                try:
                    return await self._tick_one(schedule, now)
                except RedisError:
                    raise
                except Exception as exc:
                    log.error(
                        "schedule_tick_failed",
                        schedule_id=schedule.schedule_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    self._next[schedule.schedule_id] = now + timedelta(seconds=5)
                    return 0

        return sum(await asyncio.gather(*(one(schedule) for schedule in due)))

    def _skip_paused(self, schedule: CronSchedule, now: datetime) -> None:
        """A paused (tenant, plugin) does not fire; its slots pass (``missed`` applies later)."""
        nxt = next_slot(schedule.cron, schedule.tz, now)
        if self._next.get(schedule.schedule_id) != nxt:
            log.info(
                "schedule_paused",
                schedule_id=schedule.schedule_id,
                tenant_id=schedule.tenant_id,
                plugin_id=schedule.plugin_id,
            )
        self._next[schedule.schedule_id] = nxt

    async def _tick_one(self, schedule: CronSchedule, now: datetime) -> int:
        schedule_id = schedule.schedule_id
        last = await self._last_fired(schedule_id, now)
        slots = due_slots(schedule.cron, schedule.tz, last, now)
        fired = 0
        for slot in slots_to_fire(slots, now, schedule.missed):
            result = await self._fire(schedule, slot)
            if result == "failed":  # not marked fired: the next tick tries this slot again
                self._next[schedule_id] = now + timedelta(seconds=1)
                return fired
            fired += result == "fired"
        newest = slots[-1] if slots else last
        if slots:
            await self._advance(schedule_id, newest)
        self._next[schedule_id] = next_slot(schedule.cron, schedule.tz, max(newest, last))
        return fired

    async def _advance(self, schedule_id: str, slot: datetime) -> None:
        value = int(slot.timestamp() * 1000)
        await self.broker.redis.eval(
            "local v = redis.call('HGET', KEYS[1], ARGV[1])"
            " if (not v) or tonumber(v) < tonumber(ARGV[2]) then"
            " redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 1",
            1,
            self.last_key,
            schedule_id,
            value,
        )

    async def _fire(
        self, schedule: CronSchedule, slot: datetime
    ) -> Literal["fired", "skipped", "failed"]:
        slot_ms = int(slot.timestamp() * 1000)
        job_id = f"cron:{schedule.schedule_id}:{slot_ms}"
        if schedule.overlap == "skip":
            previous = await self.broker.redis.hget(self.lastjob_key, schedule.schedule_id)
            if previous:
                state = await self.broker.redis.hget(
                    self.broker.queue.keys.job(_text(previous)), "state"
                )
                if state in (b"waiting", b"active", b"delayed"):
                    log.info(
                        "schedule_slot_skipped", schedule_id=schedule.schedule_id, reason="overlap"
                    )
                    return "skipped"
        labels = {
            **schedule.labels,
            LABEL_DEDUP: CRON_DEDUP_TTL_S,
            "schedule_id": schedule.schedule_id,
        }
        try:
            await (
                AsyncKicker(schedule.task_name, self.broker, labels)
                .with_task_id(job_id)
                .kiq(*schedule.args, **schedule.kwargs)
            )
        except Exception as exc:
            log.error("schedule_fire_failed", schedule_id=schedule.schedule_id, error=repr(exc))
            return "failed"
        await self.broker.redis.hset(self.lastjob_key, schedule.schedule_id, job_id)
        log.info(
            "schedule_fired",
            schedule_id=schedule.schedule_id,
            slot=slot.isoformat(),
            job_id=job_id,
            late_ms=int((datetime.now(UTC) - slot).total_seconds() * 1000),
        )
        return "fired"

    async def run(self) -> None:
        """Tick forever, a few times a second; errors are logged and retried."""
        failures = 0
        while True:
            try:
                await self.tick()
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                log.warning("scheduler_tick_failed", error=repr(exc), failures=failures)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
            except Exception as exc:
                log.exception("scheduler_tick_failed", error=repr(exc))
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.tick_s - (time.time() % self.tick_s))


async def label_schedules(broker: DrmBroker) -> list[CronSchedule]:
    """Static schedules declared with the ``schedule`` label, with stable ids."""
    source = LabelScheduleSource(broker)
    await source.startup()
    schedules = []
    counters: dict[str, int] = {}
    for task in await source.get_schedules():
        if task.cron is None:
            continue
        index = counters.get(task.task_name, 0)
        counters[task.task_name] = index + 1
        tz = task.cron_offset if isinstance(task.cron_offset, str) else "UTC"
        schedules.append(
            CronSchedule(
                schedule_id=f"label:{task.task_name}:{index}",
                task_name=task.task_name,
                cron=task.cron,
                tz=tz,
                labels=dict(task.labels),
                args=list(task.args),
                kwargs=dict(task.kwargs),
            )
        )
    return schedules


class _NoSchedules(ScheduleSource):
    """Gives taskiq's own scheduler loop nothing to do: the cron engine fires instead."""

    async def get_schedules(self) -> list[Any]:
        return []


class DrmScheduler(TaskiqScheduler):
    """What ``taskiq scheduler drm_taskiq.scheduler:sched`` runs."""

    def __init__(self, broker: DrmBroker, jobs: JobScheduler) -> None:
        super().__init__(broker, sources=[_NoSchedules()])
        self.engine = CronEngine(broker, jobs)
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Start the broker (which loads plugins), then the cron engine."""
        await super().startup()
        await self.engine.jobs.prune_schedules()
        await self.engine.load()
        self._task = asyncio.create_task(self.engine.run(), name="drm-cron")
        log.info("scheduler_started", schedules=len(self.engine.schedules))

    async def shutdown(self) -> None:
        """Stop the cron engine and close connections."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await super().shutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
