"""Cron that fires exactly once per slot, with any number of scheduler processes.

Each firing is identified by (schedule id, slot time) and enqueued with the job id
``cron:{schedule id}:{slot ms}``, which the broker accepts once; the last fired slot of every
schedule is shared in Redis, so a scheduler that starts, restarts or lags never fires a slot
another one fired. Slots are computed by croniter in the schedule's IANA time zone.

Schedules due in one tick are fired in chunks (docs/scheduling.md, "Scale"): per chunk, one
script reads the last fired slots (and claims the chunk), one pipeline enqueues the jobs and one
records them. Concurrent schedulers claim disjoint chunks; the job id alone keeps firings unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import heapq
import json
import math
import os
import signal
import socket
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from croniter import croniter
from redis.exceptions import RedisError
from taskiq import BrokerMessage, ScheduleSource, TaskiqMessage, TaskiqMiddleware, TaskiqScheduler
from taskiq.kicker import AsyncKicker
from taskiq.schedule_sources import LabelScheduleSource
from taskiq.utils import maybe_awaitable

from drm_taskiq.middlewares import LifecycleMiddleware, ValidationMiddleware
from drm_taskiq.options import (
    LABEL_DEDUP,
    LABEL_DELAY,
    LABEL_JOB,
    LABEL_PLUGIN,
    LABEL_PRIORITY,
    LABEL_SCHEDULE,
    LABEL_TENANT,
    JobOptions,
    check_job_id,
    label_int,
    task_name,
    to_croniter,
)
from drm_taskiq.redis_queue import EnqueueRequest
from drm_taskiq.runlog import RunLedger

if TYPE_CHECKING:
    from drm_taskiq.jobs import JobScheduler
    from drm_taskiq.queue_broker import DrmBroker

log = structlog.get_logger()

MissedPolicy = Literal["latest", "skip"]
ON_TIME_S = 5.0  # a slot fired later than this after its time counts as missed
ON_TIME_MS = int(ON_TIME_S * 1000)
CRON_DEDUP_TTL_S = 3600
CHUNK_SIZE = 500  # schedules per chunk: one claim, one read, one enqueue pipeline
CHUNKS_IN_FLIGHT = 8  # chunks of one tick processed at once (Redis works while we pack)
CLAIM_TTL_MS = 2000  # a chunk claimed by a scheduler that died is free again after this
CLAIM_RECHECK_MS = 500  # a chunk claimed elsewhere is looked at again after this
RETRY_MS = 1000  # a schedule whose firing failed or was held back is tried again after this
ERROR_RETRY_MS = 5000  # a schedule that raised (bad expression, bug) is tried again after this
_PLACEHOLDER_ID = "cron-template-9d1c4e7f"  # a valid job id replaced by each firing's id


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
        """What the firing depends on: a schedule whose key changed is looked at afresh."""
        return (
            self.task_name,
            self.cron,
            self.tz,
            json.dumps([self.labels, self.args, self.kwargs], sort_keys=True, default=str),
            self.missed,
            self.overlap,
        )


# ------------------------------------------------------------------------------ slot arithmetic
@functools.lru_cache(maxsize=4096)
def _parsed(cron: str, tz: str) -> tuple[croniter, ZoneInfo, bool]:
    """A croniter parsed once per (expression, zone), the zone, and whether the hour field is a
    wildcard. The croniter is reused with a new start time for every computation."""
    zone = ZoneInfo(tz)
    hour_field = cron.split()[-4]
    wildcard = hour_field == "*" or hour_field.startswith("*/")
    return croniter(to_croniter(cron), datetime(2000, 1, 1, tzinfo=zone)), zone, wildcard


@functools.lru_cache(maxsize=65536)
def next_slot_ms(cron: str, tz: str, after_ms: int) -> int:
    """:func:`next_slot` on epoch milliseconds, memoised: schedules sharing an expression and a
    last slot (the usual case for many schedules firing together) cost one computation."""
    iterator, zone, hour_wildcard = _parsed(cron, tz)
    current = datetime.fromtimestamp(after_ms / 1000, tz=zone)
    for _ in range(4):
        nxt: datetime = iterator.get_next(datetime, start_time=current)
        if hour_wildcard or not _second_occurrence(nxt, zone):
            break
        current = nxt
    return round(nxt.timestamp() * 1000)


def next_slot(cron: str, tz: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC.

    Daylight-saving rule (as classic cron): a local time that does not exist (spring forward)
    fires at the first instant after the gap; a local time that happens twice (fall back) fires
    once, at its first occurrence, unless the hour field is a wildcard (``*`` or ``*/n``), in
    which case every real hour fires.
    """
    return _from_ms(next_slot_ms(cron, tz, _to_ms(after)))


def _second_occurrence(moment: datetime, zone: ZoneInfo) -> bool:
    """Whether ``moment`` is the repeated (second) instance of an ambiguous local time."""
    naive = moment.astimezone(zone).replace(tzinfo=None)
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return False
    return moment.astimezone(UTC) == second.astimezone(UTC)


def due_slots_ms(
    cron: str, tz: str, last_ms: int, now_ms: int, limit: int = 1000
) -> tuple[list[int], int]:
    """Slots in (last, now], oldest first (at most ``limit``: the newest ones), and the first
    slot after now."""
    slots: list[int] = []
    current = last_ms
    while True:
        current = next_slot_ms(cron, tz, current)
        if current > now_ms:
            return slots[-limit:], current
        slots.append(current)
        if len(slots) > limit * 2:
            slots = slots[-limit:]


def due_slots(
    cron: str, tz: str, last: datetime, now: datetime, limit: int = 1000
) -> list[datetime]:
    """Slots in (last, now], oldest first (at most ``limit``: the newest ones)."""
    slots, _ = due_slots_ms(cron, tz, _to_ms(last), _to_ms(now), limit)
    return [_from_ms(slot) for slot in slots]


def slots_to_fire_ms(slots: list[int], now_ms: int, missed: MissedPolicy) -> list[int]:
    """:func:`slots_to_fire` on epoch milliseconds."""
    if not slots:
        return []
    oldest_on_time = now_ms - ON_TIME_MS
    if len(slots) == 1 and slots[0] >= oldest_on_time:
        return slots
    on_time = [s for s in slots if s >= oldest_on_time]
    if on_time:
        return on_time
    return slots[-1:] if missed == "latest" else []


def slots_to_fire(slots: list[datetime], now: datetime, missed: MissedPolicy) -> list[datetime]:
    """Which due slots to fire: every on-time one (at most ``ON_TIME_S`` late); when none is on
    time, the newest missed one under policy ``latest`` and nothing under ``skip``."""
    chosen = set(slots_to_fire_ms([_to_ms(s) for s in slots], _to_ms(now), missed))
    return [s for s in slots if _to_ms(s) in chosen]


def _to_ms(moment: datetime) -> int:
    return math.floor(moment.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# ------------------------------------------------------------------------------ firing
@dataclass(slots=True)
class _Template:
    """A schedule's message, built and checked once: each firing only changes the job id."""

    message: TaskiqMessage  # after the pre_send checks, with the placeholder id
    head: bytes | None  # the serialized message around the placeholder, when it splits
    tail: bytes
    priority: int
    delay_ms: int
    dedup_ttl_ms: int
    fields: dict[str, str]
    rate_limit: int


@dataclass(slots=True)
class _Plan:
    """What one schedule does in this tick."""

    schedule: CronSchedule
    newest_ms: int  # the newest due slot: cron:last moves there when nothing is held back
    next_ms: int  # the slot after it
    fire: list[int]
    held: bool = False  # a slot is held back (overlap): cron:last stays
    requests: list[EnqueueRequest] = field(default_factory=list)


@dataclass(slots=True)
class _Tally:
    """What a tick did, for its summary line."""

    created: int = 0
    duplicates: int = 0
    newest_ms: int = 0
    late_ms: int = 0
    chunks: int = 0
    left_to_others: int = 0
    failed_schedules: int = 0
    errors: list[RedisError] = field(default_factory=list)

    def count(self, created: int, slot_ms: int, done_ms: int) -> None:
        if created:
            self.created += 1
        else:
            self.duplicates += 1
        self.newest_ms = max(self.newest_ms, slot_ms)
        self.late_ms = max(self.late_ms, done_ms - slot_ms)


def _load_script(redis: Any, name: str) -> Any:
    text = (resources.files("drm_taskiq") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return redis.register_script(text)


class CronEngine:
    """Fires due schedules; one instance per scheduler process."""

    def __init__(
        self,
        broker: DrmBroker,
        jobs: JobScheduler,
        *,
        tick_s: float = 0.2,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.broker = broker
        self.jobs = jobs
        self.tick_s = tick_s
        self.chunk_size = chunk_size
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.schedules: dict[str, CronSchedule] = {}
        self._next: dict[str, int] = {}  # schedule id -> when to look at it next (ms)
        self._heap: list[int] = []  # the times in _at, as a heap
        self._at: dict[int, list[str]] = {}  # time -> ids to look at then (stale ones skipped)
        self._fresh: set[str] = set()  # new or changed: look at it in the next tick
        self._retrying: set[str] = set()  # _next is a retry time, not a slot
        self._claim_of: dict[str, str] = {}  # id -> the claim key it waits on
        self._unscheduled: set[str] = set()  # taken in this tick, no _next set yet
        self._templates: dict[str, _Template] = {}
        self._fingerprint: tuple[Any, ...] | None = None
        self._label_keys: dict[str, tuple[Any, ...]] = {}
        self._loaded_at = 0.0
        base = f"{{{broker.settings.key_prefix}:{broker.settings.queue}}}"
        self.last_key = f"{base}:cron:last"
        self.lastjob_key = f"{base}:cron:lastjob"
        self.claim_prefix = f"{base}:cron:claim"
        self._claim_script = _load_script(broker.redis, "cron_claim")
        self._advance_script = _load_script(broker.redis, "cron_advance")

    # -------------------------------------------------------------------------- loading
    async def load(self) -> None:
        """Read plugin schedules from PostgreSQL and static ones from task labels."""
        pool = self.jobs.pool
        fingerprint = await _fingerprint(pool)
        rows = await pool.fetch(
            "SELECT s.schedule_id, s.tenant_id, s.plugin_id, s.job_name, s.cron, s.tz, s.options,"
            " s.data FROM schedules s JOIN tenant_plugins tp ON tp.tenant_id = s.tenant_id"
            " AND tp.plugin_id = s.plugin_id AND tp.enabled"
        )
        found: dict[str, CronSchedule] = {}
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
        labelled = await label_schedules(self.broker)
        for schedule in labelled:
            found[schedule.schedule_id] = schedule
        self._replace(found)
        self._fingerprint = fingerprint
        self._label_keys = {s.schedule_id: s.key() for s in labelled}
        self._loaded_at = time.monotonic()

    def _replace(self, found: dict[str, CronSchedule]) -> None:
        for schedule_id in list(self.schedules):
            if schedule_id not in found:
                log.info("schedule_removed", schedule_id=schedule_id)
                self._forget(schedule_id)
        for schedule_id, schedule in found.items():
            old = self.schedules.get(schedule_id)
            if old is None or old.key() != schedule.key():
                self._forget(schedule_id)
                self._fresh.add(schedule_id)
                if old is None:
                    log.info(
                        "schedule_added",
                        schedule_id=schedule_id,
                        cron=schedule.cron,
                        tz=schedule.tz,
                    )
        self.schedules = found

    def _forget(self, schedule_id: str) -> None:
        self._next.pop(schedule_id, None)
        self._templates.pop(schedule_id, None)
        self._claim_of.pop(schedule_id, None)
        self._retrying.discard(schedule_id)
        self._fresh.discard(schedule_id)

    async def _refresh(self) -> None:
        """Every ``schedule_poll_s``: re-read the schedules when the table's fingerprint or the
        label schedules changed (a reload of thousands of rows costs far more than the check)."""
        if time.monotonic() - self._loaded_at < self.broker.settings.schedule_poll_s:
            return
        try:
            fingerprint = await _fingerprint(self.jobs.pool)
            labelled = {s.schedule_id: s.key() for s in await label_schedules(self.broker)}
            if fingerprint != self._fingerprint or labelled != self._label_keys:
                await self.load()
            self._loaded_at = time.monotonic()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._loaded_at = time.monotonic()
            log.warning("schedules_reload_failed", error=f"{type(exc).__name__}: {exc}")

    # -------------------------------------------------------------------------- ticking
    def _set_next(self, schedule_id: str, when_ms: int, *, retry: bool = False) -> None:
        self._next[schedule_id] = when_ms
        bucket = self._at.get(when_ms)
        if bucket is None:
            self._at[when_ms] = [schedule_id]
            heapq.heappush(self._heap, when_ms)
        else:
            bucket.append(schedule_id)
        self._unscheduled.discard(schedule_id)
        if retry:
            self._retrying.add(schedule_id)
        else:
            self._retrying.discard(schedule_id)
            self._claim_of.pop(schedule_id, None)

    def _take_due(self, now_ms: int) -> list[tuple[str, int | None]]:
        """Schedules to look at now, each with the slot it is expected to fire (None: unknown,
        for a new schedule or a retry)."""
        due: list[tuple[str, int | None]] = [
            (sid, None) for sid in sorted(self._fresh) if sid in self.schedules
        ]
        self._fresh.clear()
        seen = {sid for sid, _ in due}
        heap, nexts, retrying, schedules = self._heap, self._next, self._retrying, self.schedules
        while heap and heap[0] <= now_ms:
            when = heapq.heappop(heap)
            for sid in self._at.pop(when):
                if sid in seen or nexts.get(sid) != when or sid not in schedules:
                    continue  # a stale entry (the schedule was rescheduled or removed)
                seen.add(sid)
                due.append((sid, None if sid in retrying else when))
        return due

    async def tick(self, now: datetime | None = None) -> int:
        """Fire every due slot; returns how many jobs were enqueued (or found already there).

        A failure to reload keeps the schedules already known; a failure of one schedule (a bad
        expression, a failed enqueue) or of one chunk (a Redis error) is logged and does not stop
        the others. A slot whose enqueue failed is not marked fired, so a later tick tries it
        again. When every chunk of the tick failed on Redis, the error is raised.
        """
        now = now or datetime.now(UTC)
        now_ms = _to_ms(now)
        await self._refresh()
        due = self._take_due(now_ms)
        if not due:
            return 0
        self._unscheduled = {sid for sid, _ in due}
        tally = _Tally()
        try:
            await self._fire_due(due, now_ms, tally)
        finally:
            for sid in self._unscheduled:  # an error escaped: look at these again soon
                self._set_next(sid, now_ms + RETRY_MS, retry=True)
            self._unscheduled = set()
        if tally.created or tally.duplicates:
            log.info(
                "schedules_fired",
                count=tally.created,
                duplicates=tally.duplicates,
                slot=_from_ms(tally.newest_ms).isoformat(),
                late_ms=tally.late_ms,
                chunks=tally.chunks,
                left_to_others=tally.left_to_others,
            )
        if tally.errors:
            if len(tally.errors) == tally.chunks:
                raise tally.errors[0]  # Redis is away: run() backs off
            log.warning(
                "schedules_fire_failed",
                chunks=len(tally.errors),
                schedules=tally.failed_schedules,
                error=f"{type(tally.errors[0]).__name__}: {tally.errors[0]}",
            )
        return tally.created + tally.duplicates

    async def _fire_due(
        self, due: list[tuple[str, int | None]], now_ms: int, tally: _Tally
    ) -> None:
        paused: set[tuple[str, str]] | None = None
        groups: dict[int | None, list[CronSchedule]] = {}
        claimed: dict[str, list[CronSchedule]] = {}
        for sid, expected in due:
            schedule = self.schedules[sid]
            if schedule.tenant_id:
                paused = await self.broker.queue.paused() if paused is None else paused
                if (schedule.tenant_id, schedule.plugin_id) in paused:
                    self._skip_paused(schedule, now_ms)
                    continue
            claim = self._claim_of.get(sid)
            if claim is not None:
                claimed.setdefault(claim, []).append(schedule)
            else:
                groups.setdefault(expected, []).append(schedule)
        # (claim key, members, whether it is a re-check of a chunk claimed elsewhere)
        chunks: list[tuple[str | None, list[CronSchedule], bool]] = [
            (claim, members, True) for claim, members in claimed.items()
        ]
        for expected, group in groups.items():
            chunks.extend((key, members, False) for key, members in self._split(expected, group))
        tally.chunks = len(chunks)
        # Different schedulers start at different chunks, so that they meet less often.
        start = zlib.crc32(self.owner.encode()) % len(chunks) if chunks else 0
        chunks = chunks[start:] + chunks[:start]
        limit = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def one(claim: str | None, members: list[CronSchedule], recheck: bool) -> None:
            async with limit:
                try:
                    await self._fire_chunk(claim, members, now_ms, tally, recheck=recheck)
                except RedisError as exc:  # cron:last stays: a later tick tries again
                    tally.errors.append(exc)
                    tally.failed_schedules += len(members)
                    for schedule in members:
                        if schedule.schedule_id in self._unscheduled:
                            self._set_next(schedule.schedule_id, now_ms + RETRY_MS, retry=True)

        results = await asyncio.gather(*(one(*chunk) for chunk in chunks), return_exceptions=True)
        for result in results:  # a bug: raise it once every chunk has finished
            if isinstance(result, BaseException):
                raise result

    def _split(
        self, expected: int | None, members: list[CronSchedule]
    ) -> list[tuple[str | None, list[CronSchedule]]]:
        """Chunks of schedules expected at one slot. Every scheduler derives the same chunks
        from the same schedules (by a hash of the id), so their claims cover the same members.
        Schedules with no expected slot (new ones, retries) are not claimed."""
        size = self.chunk_size
        if expected is None:
            return [(None, members[i : i + size]) for i in range(0, len(members), size)]
        count = 1 << max(0, math.ceil(len(members) / size) - 1).bit_length()
        buckets: list[list[CronSchedule]] = [[] for _ in range(count)]
        for schedule in members:
            buckets[zlib.crc32(schedule.schedule_id.encode()) % count].append(schedule)
        return [
            (f"{self.claim_prefix}:{expected}:{count}:{index}", bucket)
            for index, bucket in enumerate(buckets)
            if bucket
        ]

    def _skip_paused(self, schedule: CronSchedule, now_ms: int) -> None:
        """A paused (tenant, plugin) does not fire; its slots pass (``missed`` applies later)."""
        nxt = next_slot_ms(schedule.cron, schedule.tz, now_ms)
        if self._next.get(schedule.schedule_id) != nxt:
            log.info(
                "schedule_paused",
                schedule_id=schedule.schedule_id,
                tenant_id=schedule.tenant_id,
                plugin_id=schedule.plugin_id,
            )
        self._set_next(schedule.schedule_id, nxt)

    async def _fire_chunk(
        self,
        claim: str | None,
        members: list[CronSchedule],
        now_ms: int,
        tally: _Tally,
        *,
        recheck: bool,
    ) -> None:
        ids = [schedule.schedule_id for schedule in members]
        raw = await self._claim_script(
            keys=[self.last_key, claim or f"{self.claim_prefix}:none"],
            args=[now_ms, self.owner, CLAIM_TTL_MS if claim else 0, "0" if recheck else "1", *ids],
        )
        is_mine = int(raw[0]) == 1
        if not is_mine and len(raw) == 1:  # just claimed by another scheduler: look again later
            assert claim is not None
            for sid in ids:
                self._set_next(sid, now_ms + CLAIM_RECHECK_MS, retry=True)
                self._claim_of[sid] = claim
            tally.left_to_others += len(ids)
            return
        plans: list[_Plan] = []
        for schedule, last in zip(members, raw[1:], strict=True):
            sid = schedule.schedule_id
            try:
                slots, nxt = due_slots_ms(schedule.cron, schedule.tz, int(last), now_ms)
            except Exception as exc:
                self._schedule_failed(schedule, exc, now_ms)
                continue
            if not slots:  # nothing due (another scheduler may have fired it)
                self._set_next(sid, nxt)
            elif not is_mine:  # another scheduler holds the chunk: look again shortly
                assert claim is not None
                self._set_next(sid, now_ms + CLAIM_RECHECK_MS, retry=True)
                self._claim_of[sid] = claim
                tally.left_to_others += 1
            else:
                fire = slots_to_fire_ms(slots, now_ms, schedule.missed)
                plans.append(_Plan(schedule, slots[-1], nxt, fire))
        await self._hold_overlapping(plans, now_ms)
        await self._enqueue(plans, now_ms, tally)
        if claim is None:  # new schedules: build their messages now, not when the slot comes
            await self._prepare(members)

    async def _prepare(self, members: list[CronSchedule]) -> None:
        for schedule in members:
            if schedule.schedule_id not in self._templates:
                try:
                    await self._template(schedule)
                except Exception:  # noqa: S112 - reported when the schedule fires
                    continue

    def _schedule_failed(self, schedule: CronSchedule, exc: Exception, now_ms: int) -> None:
        log.error(
            "schedule_tick_failed",
            schedule_id=schedule.schedule_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        self._set_next(schedule.schedule_id, now_ms + ERROR_RETRY_MS, retry=True)

    async def _hold_overlapping(self, plans: list[_Plan], now_ms: int) -> None:
        """overlap=skip: fire nothing while the previous job is waiting, active or delayed, and
        at most one slot per tick (the next one would overlap the job just fired)."""
        skips = [plan for plan in plans if plan.schedule.overlap == "skip" and plan.fire]
        if not skips:
            return
        redis = self.broker.redis
        previous = await redis.hmget(self.lastjob_key, [p.schedule.schedule_id for p in skips])
        jobs = [_text(job) if job else "" for job in previous]
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                pipe.hget(self.broker.queue.keys.job(job_id or "-"), "state")
            states = await pipe.execute()
        for plan, job_id, state in zip(skips, jobs, states, strict=True):
            sid = plan.schedule.schedule_id
            prefix = f"cron:{sid}:"
            if job_id.startswith(prefix) and job_id[len(prefix) :].isdigit():
                done = int(job_id[len(prefix) :])  # slots up to this one were fired already
                plan.fire = [slot for slot in plan.fire if slot > done]
            busy = job_id and _text(state or b"") in ("waiting", "active", "delayed")
            if plan.fire and (busy or len(plan.fire) > 1):
                log.info("schedule_slot_skipped", schedule_id=sid, reason="overlap")
                plan.held = True
                plan.fire = [] if busy else plan.fire[:1]

    async def _enqueue(self, plans: list[_Plan], now_ms: int, tally: _Tally) -> None:
        """Enqueue the chosen slots in one pipeline, then advance cron:last and cron:lastjob."""
        ready = await self._build_requests(plans, now_ms)
        requests = [request for plan in ready for request in plan.requests]
        replies = await self.broker.queue.enqueue_many(requests) if requests else []
        done_ms = int(time.time() * 1000)
        # (slot to advance cron:last to, slot of the last job fired) -> schedule ids
        records: dict[tuple[int | str, int | str], list[str]] = {}
        outcomes = iter(replies)
        post_send = self._foreign("post_send")
        for plan in ready:
            sid = plan.schedule.schedule_id
            failed = False
            fired: int | str = ""
            for request, (created, _state) in zip(plan.requests, outcomes, strict=False):
                if created == -1:
                    failed = True
                    continue
                fired = int(request.job_id.rsplit(":", 1)[1])
                tally.count(created, fired, done_ms)
                if post_send and created:
                    await self._post_send(post_send, plan.schedule, request)
            if failed:  # not marked fired: a later tick tries these slots again
                log.error(
                    "schedule_fire_failed",
                    schedule_id=sid,
                    error=f"rate limited: tenant {plan.schedule.tenant_id!r} is over its enqueue"
                    f" limit of {self.broker.settings.tenant_enqueue_rate} jobs per second",
                )
            if failed or plan.held:
                self._set_next(sid, now_ms + RETRY_MS, retry=True)
                if fired != "":
                    records.setdefault(("", fired), []).append(sid)
            else:
                records.setdefault((plan.newest_ms, fired), []).append(sid)
        if records:
            args: list[int | str] = []
            for (advance, fired), ids in records.items():
                args.extend((advance, fired, len(ids), *ids))
            await self._advance_script(keys=[self.last_key, self.lastjob_key], args=args)
        for plan in ready:
            if plan.schedule.schedule_id in self._unscheduled:
                self._set_next(plan.schedule.schedule_id, plan.next_ms)

    async def _build_requests(self, plans: list[_Plan], now_ms: int) -> list[_Plan]:
        """Fill each plan's requests; a schedule whose message is refused is logged and retried
        later, without stopping the others. Returns the plans that are ready."""
        ready: list[_Plan] = []
        for plan in plans:
            try:
                template = await self._template(plan.schedule)
                if template.head is not None:
                    plan.requests = [
                        self._spliced(plan.schedule, template, slot) for slot in plan.fire
                    ]
                else:
                    plan.requests = [
                        await self._request(plan.schedule, template, slot) for slot in plan.fire
                    ]
            except Exception as exc:
                log.error(
                    "schedule_fire_failed",
                    schedule_id=plan.schedule.schedule_id,
                    error=repr(exc),
                )
                self._set_next(plan.schedule.schedule_id, now_ms + RETRY_MS, retry=True)
                continue
            ready.append(plan)
        return ready

    async def _template(self, schedule: CronSchedule) -> _Template:
        """The schedule's message as ``AsyncKicker.kiq`` would build it, checked by the
        validation middleware (without the tenant lookup: the load query only returns schedules
        whose tenant has the plugin enabled), serialized by the broker's formatter."""
        template = self._templates.get(schedule.schedule_id)
        if template is not None:
            return template
        labels = {
            **schedule.labels,
            LABEL_DEDUP: CRON_DEDUP_TTL_S,
            LABEL_SCHEDULE: schedule.schedule_id,
        }
        kicker: AsyncKicker[Any, Any] = AsyncKicker(schedule.task_name, self.broker, labels)
        message = kicker.with_task_id(_PLACEHOLDER_ID)._prepare_message(
            *schedule.args, **schedule.kwargs
        )
        for middleware in self.broker.middlewares:
            if isinstance(middleware, ValidationMiddleware):
                message = await ValidationMiddleware(middleware.settings, None).pre_send(message)
        sent = self.broker.formatter.dumps(message)
        quoted = f'"{_PLACEHOLDER_ID}"'.encode()
        head: bytes | None = None
        tail = b""
        if sent.message.count(quoted) == 1 and not self._foreign("pre_send"):
            head, tail = sent.message.split(quoted)
        labels_out = sent.labels
        tenant_id = str(labels_out.get(LABEL_TENANT, ""))
        template = _Template(
            message=message,
            head=head,
            tail=tail,
            priority=label_int(labels_out, LABEL_PRIORITY),
            delay_ms=label_int(labels_out, LABEL_DELAY),
            dedup_ttl_ms=self.broker._dedup_ttl_ms(labels_out.get(LABEL_DEDUP)),
            fields={
                "name": sent.task_name,
                "plugin": str(labels_out.get(LABEL_PLUGIN, "")),
                "job": str(labels_out.get(LABEL_JOB, "")),
                "tenant": tenant_id,
            },
            rate_limit=self.broker.settings.tenant_enqueue_rate if tenant_id else 0,
        )
        self._templates[schedule.schedule_id] = template
        return template

    def _spliced(self, schedule: CronSchedule, template: _Template, slot_ms: int) -> EnqueueRequest:
        """The firing's job: the template's bytes with the job id put in."""
        assert template.head is not None
        job_id = check_job_id(f"cron:{schedule.schedule_id}:{slot_ms}")
        message = b"".join((template.head, b'"', job_id.encode(), b'"', template.tail))
        return self._enqueue_request(template, job_id, message)

    async def _request(
        self, schedule: CronSchedule, template: _Template, slot_ms: int
    ) -> EnqueueRequest:
        """The firing's job (serialized per firing when the template cannot be spliced)."""
        if template.head is not None:
            return self._spliced(schedule, template, slot_ms)
        job_id = check_job_id(f"cron:{schedule.schedule_id}:{slot_ms}")
        sent = await self._dumps(template, job_id)  # another middleware changes messages
        return self._enqueue_request(template, job_id, sent.message)

    @staticmethod
    def _enqueue_request(template: _Template, job_id: str, message: bytes) -> EnqueueRequest:
        return EnqueueRequest(
            job_id,
            message,
            priority=template.priority,
            delay_ms=template.delay_ms,
            dedup_ttl_ms=template.dedup_ttl_ms,
            fields=template.fields,
            rate_limit=template.rate_limit,
        )

    async def _dumps(self, template: _Template, job_id: str) -> BrokerMessage:
        message = template.message.model_copy(update={"task_id": job_id}, deep=True)
        for middleware in self._foreign("pre_send"):
            message = await maybe_awaitable(middleware.pre_send(message))
        return self.broker.formatter.dumps(message)

    def _foreign(self, hook: str) -> list[TaskiqMiddleware]:
        """Middlewares other than the project's that implement ``hook`` (called per firing)."""
        return [
            m
            for m in self.broker.middlewares
            if not isinstance(m, ValidationMiddleware | LifecycleMiddleware)
            and getattr(type(m), hook) is not getattr(TaskiqMiddleware, hook)
        ]

    async def _post_send(
        self, hooks: list[TaskiqMiddleware], schedule: CronSchedule, request: EnqueueRequest
    ) -> None:
        template = self._templates[schedule.schedule_id]
        message = template.message.model_copy(update={"task_id": request.job_id}, deep=True)
        for middleware in hooks:
            await maybe_awaitable(middleware.post_send(message))

    async def _fire(
        self, schedule: CronSchedule, slot: datetime
    ) -> Literal["fired", "skipped", "failed"]:
        """Fire one slot of one schedule now, whatever cron:last says (cron:last is not moved;
        the job id still makes a second firing of the slot a no-op)."""
        slot_ms = _to_ms(slot)
        plan = _Plan(schedule, slot_ms, slot_ms, [slot_ms])
        now_ms = _to_ms(datetime.now(UTC))
        await self._hold_overlapping([plan], now_ms)
        if not plan.fire:
            return "skipped"
        try:
            template = await self._template(schedule)
            request = await self._request(schedule, template, slot_ms)
            [(created, _)] = await self.broker.queue.enqueue_many([request])
        except Exception as exc:
            log.error("schedule_fire_failed", schedule_id=schedule.schedule_id, error=repr(exc))
            return "failed"
        if created == -1:
            log.error(
                "schedule_fire_failed", schedule_id=schedule.schedule_id, error="rate limited"
            )
            return "failed"
        await self.broker.redis.hset(self.lastjob_key, schedule.schedule_id, request.job_id)
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


async def _fingerprint(pool: asyncpg.Pool) -> tuple[Any, ...]:
    """A cheap summary of the enabled schedules (one row; a few ms for 10,000 schedules, a
    fraction of reading them): it changes when a row is added or removed, when its plugin is
    enabled or disabled for the tenant, when ``register_job`` updates it (``updated_at``), and
    when its cron or zone is edited by hand."""
    row = await pool.fetchrow(
        "SELECT count(*), max(s.updated_at), coalesce(sum(hashtext(s.schedule_id || ' ' || s.cron"
        " || ' ' || s.tz)), 0) FROM schedules s JOIN tenant_plugins tp"
        " ON tp.tenant_id = s.tenant_id AND tp.plugin_id = s.plugin_id AND tp.enabled"
    )
    return tuple(row) if row is not None else ()


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
        self._ledger_task: asyncio.Task[None] | None = None
        self._ledger_stop = asyncio.Event()

    async def startup(self) -> None:
        """Start the broker (which loads plugins), then the cron engine."""
        await super().startup()
        await self.engine.jobs.prune_schedules()
        await self.engine.load()
        # What is loaded now lives as long as the process: keep the garbage collector from
        # scanning it again and again (a full collection in a burst of firings costs ~0.1 s).
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self.engine.run(), name="drm-cron")
        self.engine.jobs.start_plugin_sync()  # plugins enabled later register their cron jobs
        broker = self.engine.broker
        main = asyncio.current_task()
        if broker.is_scheduler_process and main is not None:
            # SIGTERM stops like SIGINT: taskiq's scheduler loop is cancelled and shutdown()
            # runs (the ledger writes what is pending and hands over to the workers at once).
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        if broker.settings.ledger_in_scheduler and broker.pool is not None:
            # A dedicated run-ledger writer: while it runs, the workers' writers stand by and
            # their event loops only run jobs (see RunLedger).
            ledger = RunLedger.from_settings(
                broker.queue, broker.pool, broker.settings, dedicated=True
            )
            self._ledger_task = asyncio.create_task(
                ledger.run(self._ledger_stop), name="drm-ledger"
            )
        log.info(
            "scheduler_started",
            schedules=len(self.engine.schedules),
            ledger="in scheduler" if self._ledger_task is not None else "elsewhere",
        )

    async def shutdown(self) -> None:
        """Stop the cron engine and the ledger writer (after it wrote what is pending, for a
        few seconds), then close connections."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.engine.jobs.stop_plugin_sync()
        if self._ledger_task is not None:
            self._ledger_stop.set()
            try:
                await asyncio.wait_for(self._ledger_task, timeout=5)
            except Exception as exc:  # rows stay in Redis for another writer
                log.warning("ledger_not_stopped", error=f"{type(exc).__name__}: {exc}")
        await super().shutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
