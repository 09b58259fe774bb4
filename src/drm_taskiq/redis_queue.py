"""One queue's Redis keys and the atomic Lua operations on them (see docs/broker.md).

Every key of a queue starts with ``{prefix:queue}``: the braces are a Redis Cluster hash tag, so
all of a queue's keys live in one slot and the Lua scripts may touch them together.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Outcome = Literal["completed", "retry", "failed", "requeue", "dead"]

LEDGER_GROUP = "ledger"
# Ledger entries settled per script call (see RedisQueue.settle_ledger): at most ~1 ms of
# Redis's time per call; each call costs the writer a round trip (~2 us a row at batch 500).
SETTLE_PART = 100
_SCRIPTS = (
    "enqueue",
    "enqueue_many",
    "take",
    "finish",
    "extend",
    "stalled",
    "settle",
    "retry",
    "purge_dead",
)


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs every command in Python (~27 us for an enqueue's 20
    arguments; its synchronous client uses hiredis when installed). This one packs with hiredis
    (~3 us), byte for byte the same; arguments hiredis does not take go the usual way."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if not args or not isinstance(args[0], str) or " " in args[0]:
            return super().pack_command(*args)
        if any(isinstance(arg, (bool, bytearray, memoryview)) or arg is None for arg in args):
            return super().pack_command(*args)  # redis-py's own errors and conversions
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def pack_with_hiredis(pool: ConnectionPool) -> None:
    """Let ``pool`` make :class:`HiredisPackingConnection` (plain TCP connections only; TLS and
    Unix-socket pools keep theirs). Call it before the pool's first connection."""
    if pool.connection_class is Connection:
        pool.connection_class = HiredisPackingConnection


def pool_options() -> dict[str, Any]:
    """Connection-pool options for every Redis client drm-taskiq makes.

    redis-py 8 (maintenance notifications ``"auto"``, its default) skips the check a pool runs
    on a connection before handing it out, so a connection the server closed (a restart, an
    idle timeout, CLIENT KILL) failed the next command sent on it: the first calls after a Redis
    restart raised ConnectionError. Those notifications need RESP3 and a Redis Enterprise/Cloud
    server; turned off, a closed connection is found and reconnected before use."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig  # noqa: PLC0415
    except ImportError:  # redis-py before 7: no such notifications, the check always runs
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def now_ms() -> int:
    """Wall-clock time in milliseconds, the unit of every timestamp in Redis."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job leased to this worker by :meth:`RedisQueue.take`."""

    job_id: str
    message: bytes
    attempts_made: int
    stalled: int
    created_ms: int
    token: str


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    """One job to add with :meth:`RedisQueue.enqueue_many`."""

    job_id: str
    message: bytes
    priority: int = 0
    delay_ms: int = 0
    dedup_ttl_ms: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    rate_limit: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of one attempt, for :meth:`RedisQueue.finish_many`."""

    delivery: Delivery
    outcome: Outcome
    value: str = ""
    due_ms: int = 0
    extra: dict[str, Any] | None = None
    started_ms: int | None = None


@dataclass(frozen=True, slots=True)
class StalledJob:
    """A job found with an expired lease: ``requeued`` to waiting, or ``failed`` (too many)."""

    job_id: str
    action: str
    plugin_id: str
    tenant_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The names of one queue's keys."""

    prefix: str
    queue: str

    @property
    def base(self) -> str:
        return f"{{{self.prefix}:{self.queue}}}"

    def job(self, job_id: str) -> str:
        return f"{self.base}:job:{job_id}"

    @property
    def job_prefix(self) -> str:
        return f"{self.base}:job:"

    def dedup(self, job_id: str) -> str:
        return f"{self.base}:dedup:{job_id}"

    @property
    def wait(self) -> str:
        return f"{self.base}:wait"

    @property
    def delayed(self) -> str:
        return f"{self.base}:delayed"

    @property
    def active(self) -> str:
        return f"{self.base}:active"

    @property
    def fair(self) -> str:
        return f"{self.base}:fair"

    @property
    def running(self) -> str:
        return f"{self.base}:running"

    @property
    def limits(self) -> str:
        return f"{self.base}:limits"

    @property
    def marker(self) -> str:
        return f"{self.base}:marker"

    @property
    def ledger(self) -> str:
        return f"{self.base}:ledger"

    @property
    def ledger_writer(self) -> str:
        """Set (with an expiry) by dedicated ledger writers while they run."""
        return f"{self.base}:ledger-writer"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def breaker(self) -> str:
        return f"{self.base}:breaker"

    @property
    def paused(self) -> str:
        return f"{self.base}:paused"

    @property
    def workers(self) -> str:
        """Worker heartbeats: worker id -> JSON (host, pid, started, seen, running, capacity)."""
        return f"{self.base}:workers"

    @property
    def stalled_lock(self) -> str:
        return f"{self.base}:stalled-check"


# use fair.lua's vtime() (add_job.lua does)
_WITH_FAIR = frozenset({"take", "retry", "enqueue", "enqueue_many"})
_WITH_ADD_JOB = frozenset({"enqueue", "enqueue_many"})  # use add_job.lua


def _load_scripts(redis: Redis) -> dict[str, AsyncScript]:
    folder = resources.files("drm_taskiq") / "lua"
    fair = (folder / "fair.lua").read_text(encoding="utf-8")
    add_job = (folder / "add_job.lua").read_text(encoding="utf-8")
    scripts = {}
    for name in _SCRIPTS:
        body = (folder / f"{name}.lua").read_text(encoding="utf-8")
        if name in _WITH_ADD_JOB:
            body = add_job + body
        if name in _WITH_FAIR:
            body = fair + body
        scripts[name] = redis.register_script(body)
    return scripts


# Workers record that they are alive this often; one not seen for WORKER_GONE_MS is gone (its
# entry is dropped by the next heartbeat of another worker).
HEARTBEAT_S = 5.0
WORKER_GONE_MS = 15_000


# Connections a queue keeps per script (``_run_kept``): concurrent producers in one process
# each get one, up to this many; the broker's pool has at least 50.
KEPT_PER_SCRIPT = 8


class RedisQueue:
    """The job operations of one queue; each is one round trip to Redis."""

    def __init__(self, redis: Redis, prefix: str, queue: str) -> None:
        self.redis = redis
        self.keys = QueueKeys(prefix, queue)
        self._scripts = _load_scripts(redis)
        # script name -> the connections kept for its calls that are idle now, and how many
        # it keeps in all (see _run_kept)
        self._kept: dict[str, list[_KeptConnection]] = {}
        self._kept_count: dict[str, int] = {}

    def _enqueue_call(self, request: EnqueueRequest, now: int) -> tuple[list[str], list[Any]]:
        return self._enqueue_args(
            request.job_id,
            request.message,
            now,
            delay_ms=request.delay_ms,
            priority=request.priority,
            dedup_ttl_ms=request.dedup_ttl_ms,
            rate_limit=request.rate_limit,
            fields=request.fields,
        )

    def _enqueue_args(
        self,
        job_id: str,
        message: bytes,
        now: int,
        *,
        delay_ms: int,
        priority: int,
        dedup_ttl_ms: int,
        rate_limit: int,
        fields: dict[str, str],
    ) -> tuple[list[str], list[Any]]:
        """enqueue.lua's keys and arguments."""
        args: list[Any] = [
            self.keys.base,
            job_id,
            now,
            delay_ms,
            priority,
            dedup_ttl_ms,
            rate_limit,
            "msg",
            message,
            *_flatten(fields),
        ]
        return [self.keys.job(job_id)], args

    async def enqueue(
        self,
        job_id: str,
        message: bytes,
        *,
        priority: int,
        delay_ms: int,
        dedup_ttl_ms: int,
        fields: dict[str, str],
        rate_limit: int = 0,
    ) -> tuple[int, str]:
        """Add a job: ``(1, state)`` when added, ``(0, state)`` when a job with this id exists
        (nothing is changed), ``(-1, count)`` when the tenant is over ``rate_limit`` per second."""
        keys, args = self._enqueue_args(
            job_id,
            message,
            now_ms(),
            delay_ms=delay_ms,
            priority=priority,
            dedup_ttl_ms=dedup_ttl_ms,
            rate_limit=rate_limit,
            fields=fields,
        )
        created, state = await self._run_kept("enqueue", keys, args)
        return int(created), _text(state)

    async def _run_kept(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Script ``name`` on a connection this queue keeps for it (:meth:`_on_kept`)."""
        script = self._scripts[name]
        return await self._on_kept(
            name,
            # AsyncScript takes any client with evalsha and script_load (it is given pipelines)
            lambda kept: script(keys=keys, args=args, client=kept),  # type: ignore[arg-type]
            lambda: script(keys=keys, args=args),
        )

    async def _on_kept(
        self,
        name: str,
        call: Callable[[_KeptConnection], Awaitable[Any]],
        fallback: Callable[[], Awaitable[Any]],
    ) -> Any:
        """``call`` on a connection this queue keeps for calls named ``name``: ``enqueue.lua``
        for :meth:`enqueue`, ``finish.lua`` for :meth:`finish_many`, the listener's wait and
        take for :meth:`wait_and_take`; ``fallback`` (through the pool) when all are busy.

        Taking a connection from the broker's BlockingConnectionPool and giving it back for each
        call (a condition, a timeout scope, events) cost a producer about 15% of its CPU per
        job. A queue keeps up to ``KEPT_PER_SCRIPT`` connections per script: a call takes an
        idle one, or (while fewer are kept) a new one from the pool that it keeps afterwards, so
        concurrent producers get the cheap path too; beyond that, calls take pool connections
        as before. Kept connections stay counted as in use by the pool, whose ``disconnect()``
        closes them, and each is checked before a call as the pool checks the connections it
        hands out. After an error a connection goes back to the pool."""
        idle = self._kept.setdefault(name, [])
        kept = idle.pop() if idle else None
        if kept is None and self._kept_count.get(name, 0) >= KEPT_PER_SCRIPT:
            return await fallback()
        pool = self.redis.connection_pool
        if kept is None:
            self._kept_count[name] = self._kept_count.get(name, 0) + 1
        try:
            if kept is None:
                connection = await pool.get_connection(*_GET_CONNECTION_ARGS)  # type: ignore[no-untyped-call]
                kept = _KeptConnection(self.redis, connection)
            await pool.ensure_connection(kept.connection)
            reply = await call(kept)
        except BaseException:
            self._kept_count[name] -= 1
            if kept is not None:
                await pool.release(kept.connection)
            raise
        idle.append(kept)
        return reply

    async def enqueue_many(self, requests: Sequence[EnqueueRequest]) -> list[tuple[int, str]]:
        """Add many jobs in one script call (each one on its own, as :meth:`enqueue` would);
        returns one ``(created, state)`` per request, in order."""
        if not requests:
            return []
        try:
            jobs = [
                [
                    r.job_id,
                    r.delay_ms,
                    r.priority,
                    r.dedup_ttl_ms,
                    r.rate_limit,
                    ["msg", r.message.decode("utf-8"), *_flatten(r.fields)],
                ]
                for r in requests
            ]
        except UnicodeDecodeError:  # a binary message (another serializer): one call per job
            return await self._enqueue_pipelined(requests)
        raw = await self._scripts["enqueue_many"](
            keys=[self.keys.job(r.job_id) for r in requests],
            args=[self.keys.base, now_ms(), json.dumps(jobs)],
        )
        return [(int(raw[i]), _text(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def _enqueue_pipelined(self, requests: Sequence[EnqueueRequest]) -> list[tuple[int, str]]:
        now = now_ms()
        script = self._scripts["enqueue"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for request in requests:
                keys, args = self._enqueue_call(request, now)
                await script(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return [(int(created), _text(state)) for created, state in replies]

    async def take(
        self, token: str, count: int, lease_ms: int, tenant_limit: int = 0
    ) -> tuple[list[Delivery], int | None]:
        """Lease up to ``count`` jobs, at most ``tenant_limit`` running per tenant (0 = no
        limit; per-tenant overrides in the limits hash); also returns when the next delayed
        job is due (ms)."""
        raw, next_due = await self._scripts["take"](
            keys=self._take_keys, args=self._take_args(token, count, lease_ms, tenant_limit)
        )
        return self._deliveries(raw, next_due, token)

    async def wait_and_take(
        self, timeout_s: float, token: str, count: int, lease_ms: int, tenant_limit: int = 0
    ) -> tuple[list[Delivery], int | None]:
        """Wait for a wake-up marker (BLPOP), then :meth:`take`, in one round trip.

        Redis runs the take as soon as the wait ends (a marker arrived, or the timeout passed),
        so an idle worker starts a new job one round trip sooner than with two calls. The
        take's "now" is the time the call was sent: a delayed job that fell due during the wait
        is promoted by the next take, and the lease is at most ``timeout_s`` shorter."""
        keys = self._take_keys
        commands: list[tuple[Any, ...]] = [
            ("BLPOP", self.keys.marker, max(timeout_s, 0.01)),
            (
                "EVALSHA",
                self._scripts["take"].sha,
                len(keys),
                *keys,
                *self._take_args(token, count, lease_ms, tenant_limit),
            ),
        ]

        async def through_pool() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute(raise_on_error=False)

        # a kept connection: no pipeline object and no pool round per wait (an idle worker
        # waits once per job)
        _, answer = await self._on_kept("wait", lambda kept: kept.pipeline(commands), through_pool)
        if isinstance(answer, NoScriptError):  # the script cache was flushed (server restart)
            return await self.take(token, count, lease_ms, tenant_limit)
        if isinstance(answer, Exception):
            raise answer
        raw, next_due = answer
        return self._deliveries(raw, next_due, token)

    @property
    def _take_keys(self) -> list[str]:
        k = self.keys
        return [k.wait, k.delayed, k.active, k.fair, k.marker, k.running, k.limits]

    def _take_args(
        self, token: str, count: int, lease_ms: int, tenant_limit: int
    ) -> list[str | int]:
        return [now_ms(), lease_ms, token, count, self.keys.job_prefix, tenant_limit]

    @staticmethod
    def _deliveries(raw: Any, next_due: Any, token: str) -> tuple[list[Delivery], int | None]:
        deliveries = [
            Delivery(
                job_id=_text(raw[i]),
                message=raw[i + 1],
                attempts_made=_int(raw[i + 2]),
                stalled=_int(raw[i + 3]),
                created_ms=_int(raw[i + 4]),
                token=token,
            )
            for i in range(0, len(raw), 5)
        ]
        return deliveries, (int(float(next_due)) if next_due else None)

    async def finish(
        self,
        delivery: Delivery,
        outcome: Outcome,
        *,
        value: str = "",
        due_ms: int = 0,
        extra: dict[str, Any] | None = None,
        started_ms: int | None = None,
        breaker_threshold: int = 0,
    ) -> int:
        """Settle one attempt atomically (state, ledger entry, ack): 1 when settled, 2 when this
        failure also paused the tenant's plugin (circuit breaker), 0 if the lease was lost."""
        request = Settlement(delivery, outcome, value, due_ms, extra, started_ms)
        (answer,) = await self.finish_many([request], breaker_threshold=breaker_threshold)
        return answer

    async def finish_many(
        self, settlements: Sequence[Settlement], *, breaker_threshold: int = 0
    ) -> list[int]:
        """Settle many attempts in one script call, each as :meth:`finish` would; returns one
        answer per settlement, in order."""
        if not settlements:
            return []
        k = self.keys
        keys = [
            k.active,
            k.wait,
            k.delayed,
            k.ledger,
            k.marker,
            k.dead,
            k.breaker,
            k.paused,
            k.running,
        ]
        jobs = [
            [
                s.delivery.job_id,
                s.delivery.token,
                s.outcome,
                s.value,
                str(s.due_ms),
                json.dumps(s.extra) if s.extra else "{}",
                "" if s.started_ms is None else str(s.started_ms),
            ]
            for s in settlements
        ]
        args: list[str | int] = [now_ms(), breaker_threshold, k.job_prefix, json.dumps(jobs)]
        answers = await self._run_kept("finish", keys, args)
        return [int(answer) for answer in answers]

    async def extend(self, leases: list[tuple[str, str]], lease_ms: int) -> list[str]:
        """Renew leases given as (job id, token); returns the ids whose lease was lost."""
        if not leases:
            return []
        flat = [item for pair in leases for item in pair]
        lost = await self._scripts["extend"](
            keys=[self.keys.active],
            args=[now_ms() + lease_ms, self.keys.job_prefix, *flat],
        )
        return [_text(item) for item in lost]

    async def recover_stalled(
        self, token: str, max_stalled: int, lock_ms: int
    ) -> list[StalledJob] | None:
        """Requeue or fail jobs whose lease expired; None when another worker holds the check."""
        k = self.keys
        raw = await self._scripts["stalled"](
            keys=[k.active, k.wait, k.stalled_lock, k.ledger, k.marker, k.running],
            args=[now_ms(), max_stalled, token, lock_ms, k.job_prefix],
        )
        if raw and raw[0] == -1:
            return None
        return [
            StalledJob(
                job_id=_text(raw[i]),
                action=_text(raw[i + 1]),
                plugin_id=_text(raw[i + 2]),
                tenant_id=_text(raw[i + 3]),
                attempt=_int(raw[i + 4]),
            )
            for i in range(0, len(raw), 5)
        ]

    async def settle_ledger(self, entries: list[tuple[str, str, str]], retention_ms: int) -> None:
        """Acknowledge stored ledger entries: (entry id, job id, finished ms or '').

        In parts of at most :data:`SETTLE_PART` entries, one script call each: Redis serves no
        other client while a script runs, and sends the replies it owes (a worker's take, a
        producer's enqueue) only after it. A large batch in one call held every worker and
        producer back for as long (7-15 us an entry: 2,000 entries, 15-30 ms). An entry
        acknowledged twice (the writer died between two parts and another took the rest over)
        changes nothing."""
        for start in range(0, len(entries), SETTLE_PART):
            part = entries[start : start + SETTLE_PART]
            # one argument per part: packing three per entry cost the writer ~5 us a row
            flat = json.dumps([item for triple in part for item in triple])
            await self._scripts["settle"](
                keys=[self.keys.ledger],
                args=[LEDGER_GROUP, self.keys.job_prefix, retention_ms, flat],
            )

    async def retry_failed(self, job_id: str, message: str, fields: dict[str, str]) -> bool:
        """Put a failed job back in waiting as a new generation; False if it is not failed."""
        k = self.keys
        done = await self._scripts["retry"](
            keys=[k.job(job_id), k.wait, k.fair, k.marker],
            args=[job_id, message, now_ms(), *_flatten(fields)],
        )
        return bool(done)

    async def dead_jobs(self, limit: int) -> list[dict[str, str]]:
        """The first ``limit`` dead-lettered jobs, oldest first: ``id`` and the job's hash
        (without the message); ``state`` is ``"gone"`` when the hash is no longer in Redis."""
        ids = [_text(i) for i in await self.redis.lrange(self.keys.dead, 0, limit - 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            hashes = await pipe.execute()
        return [
            {"id": job_id, "state": "gone", **_without_message(raw)}
            for job_id, raw in zip(ids, hashes, strict=True)
        ]

    async def purge_dead(self, per_call: int = 1000) -> tuple[int, int]:
        """Empty the dead-letter list, deleting the jobs that are still failed (not those
        retried since); returns (entries removed, jobs deleted). ``per_call`` entries per
        script call."""
        entries = deleted = 0
        while True:
            taken, gone, left = await self._scripts["purge_dead"](
                keys=[self.keys.dead], args=[self.keys.job_prefix, per_call]
            )
            entries += int(taken)
            deleted += int(gone)
            if not int(left) or not int(taken):
                return entries, deleted

    async def job(self, job_id: str) -> dict[str, str] | None:
        """The job's hash, or None when the job is not (or no longer) in Redis."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return _without_message(raw)

    async def set_progress(self, job_id: str, progress: Any) -> None:
        """Record a running job's progress (JSON)."""
        await self.redis.hset(self.keys.job(job_id), "progress", json.dumps(progress))

    async def set_tenant_limit(self, tenant_id: str, limit: int | None) -> None:
        """Jobs of ``tenant_id`` allowed to run at once across all workers (None: the default)."""
        if limit is None:
            await self.redis.hdel(self.keys.limits, tenant_id)
        else:
            await self.redis.hset(self.keys.limits, tenant_id, limit)

    async def running_per_tenant(self) -> dict[str, int]:
        """How many jobs each tenant has running (leased) right now."""
        raw = await self.redis.hgetall(self.keys.running)
        return {_text(key): int(value) for key, value in raw.items() if int(value) > 0}

    async def paused(self) -> set[tuple[str, str]]:
        """(tenant, plugin) pairs paused by the circuit breaker."""
        members = await self.redis.smembers(self.keys.paused)
        return {tuple(_text(m).split(":", 1)) for m in members}  # type: ignore[misc]

    async def resume(self, tenant_id: str, plugin_id: str) -> bool:
        """Close the circuit of (tenant, plugin); True when it was open."""
        who = f"{tenant_id}:{plugin_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(self.keys.paused, who)
            pipe.hdel(self.keys.breaker, who)
            removed, _ = await pipe.execute()
        return bool(removed)

    async def stats(self) -> dict[str, Any]:
        """The queue at a glance, for operators and health checks (one round trip, plus one
        for the age of the job first in line): jobs waiting, delayed and leased; how long the
        job first in line (the next one a worker takes) has been ready to run; when the next
        delayed job is due; jobs running per tenant; the run ledger's entries not yet written
        to PostgreSQL and how many of them a writer has read; whether a dedicated ledger writer
        runs; dead letters; (tenant, plugin) pairs paused by the circuit breaker; the live
        workers (:meth:`workers`)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(k.wait)
            pipe.zcard(k.delayed)
            pipe.zcard(k.active)
            pipe.zrange(k.wait, 0, 0)
            pipe.zrange(k.delayed, 0, 0, withscores=True)
            pipe.hgetall(k.running)
            pipe.xlen(k.ledger)
            pipe.xpending(k.ledger, LEDGER_GROUP)
            pipe.exists(k.ledger_writer)
            pipe.llen(k.dead)
            pipe.scard(k.paused)
            pipe.hgetall(k.workers)
            replies = await pipe.execute(raise_on_error=False)
        (waiting, delayed, active, head, due, running, entries, pending, writer, dead, paused,
         workers) = replies  # fmt: skip
        for reply in replies:
            if isinstance(reply, Exception) and reply is not pending:
                raise reply
        now = now_ms()
        # since when the job first in line waits: its creation, or its latest return to the
        # waiting set (a delay or retry backoff over, a stall, a manual retry, a give-back)
        since: Any = None
        if head:
            ts, ready = await self.redis.hmget(k.job(_text(head[0])), "ts", "ready")
            since = ready or ts
        return {
            "queue": self.keys.queue,
            "waiting": waiting,
            "delayed": delayed,
            "active": active,
            "next_waiting_age_ms": max(now - _int(since), 0) if since else None,
            "next_delayed_due_in_ms": int(due[0][1]) - now if due else None,
            "running_per_tenant": {
                _text(tenant): int(n) for tenant, n in running.items() if int(n) > 0
            },
            "ledger": {
                "unwritten": entries,
                # no consumer group yet (no writer ever ran): an error reply, nothing read
                "being_written": 0 if isinstance(pending, Exception) else pending["pending"],
                "dedicated_writer": bool(writer),
            },
            "dead": dead,
            "paused": paused,
            "workers": _live_workers(workers, now),
        }

    async def heartbeat(self, worker_id: str, state: dict[str, Any]) -> None:
        """Record that ``worker_id`` is alive (``state``: what :meth:`workers` lists, ``seen``
        set here) and forget the workers not seen for :data:`WORKER_GONE_MS`."""
        now = now_ms()
        raw = await self.redis.hgetall(self.keys.workers)
        gone = [
            key
            for key, value in raw.items()
            if _text(key) != worker_id and _seen(value) < now - WORKER_GONE_MS
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.workers, worker_id, json.dumps({**state, "seen": now}))
            if gone:
                pipe.hdel(self.keys.workers, *gone)
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        """A worker stopping cleanly leaves the list at once."""
        await self.redis.hdel(self.keys.workers, worker_id)

    async def workers(self) -> list[dict[str, Any]]:
        """The workers seen within :data:`WORKER_GONE_MS`, by id: ``id``, ``host``, ``pid``,
        ``started`` and ``seen`` (ms), ``running`` (jobs it holds), ``capacity``
        (``WORKER_CONCURRENCY``)."""
        return _live_workers(await self.redis.hgetall(self.keys.workers), now_ms())

    async def counts(self) -> dict[str, int]:
        """How many jobs are waiting, delayed and active."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.wait)
            pipe.zcard(self.keys.delayed)
            pipe.zcard(self.keys.active)
            waiting, delayed, active = await pipe.execute()
        return {"waiting": waiting, "delayed": delayed, "active": active}


class _KeptConnection:
    """A client for :class:`AsyncScript` (``evalsha``, ``script_load``) on one connection:
    ``Redis.execute_command`` (send, parse, the connection's retry policy) without the pool."""

    __slots__ = ("connection", "redis")

    def __init__(self, redis: Redis, connection: Connection) -> None:
        self.redis = redis
        self.connection = connection

    async def evalsha(self, *args: Any) -> Any:
        connection = self.connection

        async def call() -> Any:
            await _send(connection, connection.pack_command("EVALSHA", *args))
            return await self.redis.parse_response(connection, "EVALSHA")

        async def failed(_: BaseException) -> None:
            await connection.disconnect()

        return await connection.retry.call_with_retry(call, failed)

    async def script_load(self, script: Any) -> Any:
        return await self.redis.script_load(script)

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands sent at once, their replies read in order: what a non-transactional
        pipeline's ``execute(raise_on_error=False)`` returns (an error reply is returned, not
        raised), and its retry policy."""
        connection = self.connection

        async def call() -> list[Any]:
            await _send(connection, connection.pack_commands(commands))
            replies: list[Any] = []
            for command in commands:
                try:
                    replies.append(await self.redis.parse_response(connection, command[0]))
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        async def failed(_: BaseException) -> None:
            await connection.disconnect()

        return await connection.retry.call_with_retry(call, failed)


async def _send(connection: Connection, command: list[bytes]) -> None:
    """``connection.send_packed_command(command)`` without ``asyncio.wait_for``, which runs the
    write in a task of its own (one more turn of the event loop: about 14 us of CPU per job).
    A command the socket took whole (the usual case) is sent; otherwise the wait for the rest is
    bounded by the socket timeout (``asyncio.timeout``), as redis-py's. The same errors, and
    the same disconnect after one, as redis-py's."""
    # redis-py's private stream writer (5.x-8.x); anything else falls back to its own send
    writer = getattr(connection, "_writer", None)
    if writer is None or not connection.is_connected or connection.health_check_interval:
        await connection.send_packed_command(command)  # connects first, or checks health
        return
    try:
        writer.writelines(command)
        transport = writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return  # nothing left to wait for: no timer (a timeout scope costs a few us a call)
        async with asyncio.timeout(connection.socket_timeout):
            await writer.drain()
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        number, text = exc.args if len(exc.args) == 2 else ("UNKNOWN", exc)
        raise RedisConnectionError(f"Error {number} while writing to socket. {text}.") from exc
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


# redis-py before 5.3 wants a command name in ConnectionPool.get_connection (later: deprecated)
_NAME = inspect.signature(ConnectionPool.get_connection).parameters.get("command_name")
_GET_CONNECTION_ARGS = ("EVALSHA",) if _NAME is not None and _NAME.default is _NAME.empty else ()


def _seen(value: Any) -> int:
    """A heartbeat's ``seen`` time (0 when it cannot be read)."""
    try:
        return int(json.loads(value)["seen"])
    except (ValueError, KeyError, TypeError):
        return 0


def _live_workers(raw: dict[Any, Any], now: int) -> list[dict[str, Any]]:
    """The heartbeats of ``raw`` (the workers hash) seen within WORKER_GONE_MS, by id."""
    return [
        {"id": _text(key), **json.loads(value)}
        for key, value in sorted(raw.items())
        if _seen(value) >= now - WORKER_GONE_MS
    ]


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _without_message(raw: dict[Any, Any]) -> dict[str, str]:
    """A job hash as text, without its message."""
    return {_text(key): _text(value) for key, value in raw.items() if _text(key) != "msg"}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int:
    """A Redis field as an int; a missing or malformed field (a hand-made job) counts as 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
