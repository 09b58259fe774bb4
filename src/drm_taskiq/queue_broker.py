"""The project's taskiq broker: at-least-once, priority-aware, with delays, on Redis.

It is a subclass of taskiq-redis's ListQueueBroker (same URL handling and connection pool), but
messages live in the structures of :mod:`drm_taskiq.redis_queue`: a priority-ordered wait set, a
delayed set and an active set of leases. A message is acknowledged (through taskiq's ack) only
when its outcome, its ledger entry and its result are written in one Lua call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, BrokerMessage
from taskiq_redis import ListQueueBroker

from drm_taskiq import store
from drm_taskiq.errors import RateLimitedError, RedisUnavailableError
from drm_taskiq.logs import configure_logging
from drm_taskiq.middlewares import LifecycleMiddleware, PendingOutcome, ValidationMiddleware
from drm_taskiq.middlewares.validation import TenantGate
from drm_taskiq.options import (
    LABEL_DEDUP,
    LABEL_DELAY,
    LABEL_JOB,
    LABEL_PLUGIN,
    LABEL_PRIORITY,
    LABEL_TENANT,
    JobEvent,
    label_int,
)
from drm_taskiq.process import stop_taskiq_supervisor
from drm_taskiq.redis_queue import (
    HEARTBEAT_S,
    Delivery,
    RedisQueue,
    Settlement,
    now_ms,
    pack_with_hiredis,
    pool_options,
)
from drm_taskiq.results import JobResultBackend
from drm_taskiq.runlog import RunLedger
from drm_taskiq.settings import Settings, mask_url

log = structlog.get_logger()
T = TypeVar("T")
R = TypeVar("R")

ACK_BATCH = 200  # settlements sent in one finish.lua call at most
ACK_LINGER_S = 0.01  # how long a settlement may wait for the rest of its batch
CIRCUIT_OPENED = 2  # finish.lua's answer when a failure paused the tenant's plugin
EVENT_GRACE_S = 5.0  # how long shutdown waits for job event callbacks still running
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class DrmBroker(ListQueueBroker):
    """Leases, acknowledgements, priorities and delays on Redis, run rows in PostgreSQL."""

    def __init__(
        self, settings: Settings, *, validate_tenants: bool = True, own_process: bool = True
    ) -> None:
        super().__init__(
            url=settings.redis_url,
            queue_name=settings.queue,
            max_connection_pool_size=max(50, settings.worker_concurrency + 20),
            timeout=None,
            **pool_options(),
        )
        self.settings = settings
        self.own_process = own_process
        pack_with_hiredis(self.connection_pool)
        self.redis = Redis(connection_pool=self.connection_pool)
        self.queue = RedisQueue(self.redis, settings.key_prefix, settings.queue)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool: asyncpg.Pool | None = None
        self.plugin_pool: asyncpg.Pool | None = None
        self.tenant_secret: bytes | None = None
        self.gate = TenantGate(self._tenant_lookup) if validate_tenants else None
        self.lifecycle = LifecycleMiddleware()
        self.add_middlewares(ValidationMiddleware(settings, self.gate), self.lifecycle)
        self.with_result_backend(JobResultBackend(settings, self.queue))
        self.ledger: RunLedger | None = None
        self._held: dict[str, Delivery] = {}
        # jobs leased by ``listen`` and not yet handed to the receiver
        self._ready: deque[Delivery] = deque()
        # set by drm_taskiq.receiver.Receiver, which takes ready jobs without a round trip
        self.receiver_kind = "taskiq"
        self._started: dict[str, int] = {}
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._outcomes: dict[str, PendingOutcome] = {}
        self._capacity = asyncio.Event()
        self._stop = asyncio.Event()
        self._closing = False
        self._background: list[asyncio.Task[None]] = []
        self._started_up = False
        self._take_counter = 0
        self._acking = 0  # jobs between the start of their acknowledgement and its answer
        self._pruned_at = float("-inf")
        # Set by JobScheduler: given a job's task name this process has not registered, whether
        # it is registered now (after loading plugins a tenant enabled since the start).
        self.task_appeared: Callable[[str], Awaitable[bool]] | None = None
        # Set by JobScheduler: the task names registered with on_completed / on_failed, and
        # what runs their callbacks once an attempt's outcome is recorded (JobEvent).
        self.event_tasks: set[str] = set()
        self.on_job_event: Callable[[JobEvent], Awaitable[None]] | None = None
        self._event_runs: set[asyncio.Task[None]] = set()
        self._acks: Batcher[Settlement, int] = Batcher(
            self._finish_batch,
            max_size=ACK_BATCH,
            linger_s=ACK_LINGER_S,
            pending=self._settling,
        )
        self.duplicates: set[str] = set()  # ids kicked this instant that already existed

    # ----------------------------------------------------------------- life cycle
    async def startup(self) -> None:
        """Connect to PostgreSQL (migrating if configured), start worker loops, run events."""
        if self._started_up:
            return
        if self.is_worker_process and self.own_process:
            configure_logging(self.settings.log_format, self.settings.log_level, cache=True)
        self._stop = asyncio.Event()
        self._capacity = asyncio.Event()
        if self.settings.migrate_on_start:
            await store.migrate(self.settings)
        self.pool = await store.create_pool(self.settings, max_size=10)
        self.tenant_secret = await store.tenant_binding_secret(self.pool)
        self.plugin_pool = await store.create_plugin_pool(self.settings)
        await self.redis.ping()
        self._started_up = True
        if self.is_worker_process:
            self._background = [
                asyncio.create_task(self._renew_leases(), name="drm-renew-leases"),
                asyncio.create_task(self._check_stalled(), name="drm-stalled-check"),
                asyncio.create_task(self._heartbeat(), name="drm-heartbeat"),
            ]
            if self.settings.ledger_in_worker:
                self.ledger = RunLedger.from_settings(
                    self.queue, self.pool, self.settings, consumer=self.worker_id
                )
                self._background.append(
                    asyncio.create_task(self.ledger.run(self._stop), name="drm-ledger")
                )
            if self.own_process:
                self._install_shutdown_signals()
            log.info(
                "worker_started",
                worker_id=self.worker_id,
                redis=mask_url(self.settings.redis_url),
                database=mask_url(self.settings.database_url),
                concurrency=self.settings.worker_concurrency,
                queue=self.settings.queue,
                receiver=self.receiver_kind,
                ledger="in worker unless a dedicated writer runs"
                if self.settings.ledger_in_worker
                else "separate",
            )
        await super().startup()
        if self.is_worker_process and self.own_process:
            # What exists now (modules, plugins, pools) lives as long as the process: keep it
            # out of the collector's full passes, which would otherwise pause running jobs.
            gc.collect()
            gc.freeze()

    async def shutdown(self) -> None:
        """Give back jobs not started, flush the run ledger, close connections."""
        if not self._started_up:
            return
        self._closing = True
        for job_id, delivery in list(self._held.items()):
            if job_id not in self._started:
                await self._give_back(delivery)
        await self._wind_down()
        self._stop.set()
        for task in self._background:
            if task.get_name() == "drm-ledger":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, timeout=4)
            else:
                task.cancel()
        if self._background:
            _, pending = await asyncio.wait(self._background, timeout=5)
            if pending:  # a library swallowed the cancellation: do not hang the shutdown
                log.warning("background_tasks_not_stopped", tasks=[t.get_name() for t in pending])
        self._background = []
        await super().shutdown()
        for pool in (self.pool, self.plugin_pool):
            if pool is not None:
                await pool.close()
        self.pool = self.plugin_pool = None
        await self.redis.aclose()
        self._started_up = False
        self._closing = False

    # ----------------------------------------------------------------- sending
    async def kick(self, message: BrokerMessage) -> None:
        """Add the message as a job (idempotent when the job id already exists)."""
        labels = message.labels
        tenant_id = str(labels.get(LABEL_TENANT, ""))
        created, state = await self.queue.enqueue(
            message.task_id,
            message.message,
            priority=label_int(labels, LABEL_PRIORITY),
            delay_ms=label_int(labels, LABEL_DELAY),
            dedup_ttl_ms=self._dedup_ttl_ms(labels.get(LABEL_DEDUP)),
            fields={
                "name": message.task_name,
                "plugin": str(labels.get(LABEL_PLUGIN, "")),
                "job": str(labels.get(LABEL_JOB, "")),
                "tenant": tenant_id,
            },
            rate_limit=self.settings.tenant_enqueue_rate if tenant_id else 0,
        )
        if created == -1:
            log.warning("job_rate_limited", tenant_id=tenant_id, job_id=message.task_id)
            raise RateLimitedError(
                "tenant_id",
                f"tenant {tenant_id!r} is over its enqueue limit of"
                f" {self.settings.tenant_enqueue_rate} jobs per second; retry later",
            )
        if created == 0:
            self.duplicates.add(message.task_id)
            log.info("job_duplicate_ignored", job_id=message.task_id, state=state)

    def _dedup_ttl_ms(self, label: Any) -> int:
        """The ``dedup`` label: absent = no dedup key; "1"/"true" = the configured window;
        an integer above 1 = that many seconds."""
        if label is None or label == "" or str(label).lower() in ("0", "false"):
            return 0
        if str(label).lower() in ("1", "true"):
            return self.settings.dedup_ttl_s * 1000
        try:
            return max(int(float(str(label))), 1) * 1000
        except ValueError:
            return self.settings.dedup_ttl_s * 1000

    async def _tenant_lookup(self, tenant_id: str, plugin_id: str) -> bool | None:
        if self.pool is None:
            raise RuntimeError("the broker is not started: await broker.startup() first")
        return await store.tenant_plugin_enabled(self.pool, tenant_id, plugin_id)

    # ----------------------------------------------------------------- receiving
    def delivery(self, job_id: str) -> Delivery | None:
        """The lease this worker holds on ``job_id``, if any."""
        return self._held.get(job_id)

    def mark_started(self, job_id: str) -> None:
        """Record that the handler of ``job_id`` started (it will not be given back unstarted)."""
        self._started[job_id] = now_ms()
        task = asyncio.current_task()
        if task is not None:
            self._running[job_id] = task

    def set_outcome(self, job_id: str, outcome: PendingOutcome) -> None:
        """The decision for the current attempt, applied at acknowledgement."""
        self._outcomes[job_id] = outcome

    async def listen(self) -> AsyncGenerator[bytes | AckableMessage, None]:  # type: ignore[override]
        """Lease jobs while this process has capacity; yield them as ackable messages.

        Jobs are leased in batches; those not handed out yet wait in ``_ready``, where
        ``ready_message`` (drm-taskiq's receiver) also takes them from."""
        buffer = self._ready
        outage_since: float | None = None
        failures = 0
        limit = self.settings.worker_concurrency
        # Take in batches of at least half a batch while jobs are running (one take.lua call
        # serves many jobs), but at once when nothing runs.
        refill = max(1, min(self.settings.take_batch, limit) // 2)
        # The last take came back with fewer jobs than asked for: the queue had no more to give
        # (take.lua cleared the wake-up markers), so the next fetch waits for a marker and
        # takes in the same round trip instead of first asking again.
        short = False
        next_due: int | None = None
        try:
            while not self._closing:
                _raise_if_cancelled()
                if not buffer:
                    # Jobs whose handler has finished and whose acknowledgement is being sent no
                    # longer take a slot: the next jobs are leased meanwhile.
                    busy = len(self._held) - self._acking
                    free = limit - busy
                    if free <= 0 or (free < refill and busy > 0):
                        self._capacity.clear()
                        await self._capacity.wait()
                        continue
                    count = min(free, self.settings.take_batch)
                    try:
                        deliveries, next_due = await self._fetch(count, short, next_due)
                        # an empty wait ends the shortcut: the next take runs with a fresh
                        # "now" (delayed jobs that fell due during the wait are promoted)
                        short = 0 < len(deliveries) < count
                    except _TRANSIENT as exc:
                        short = False
                        failures += 1
                        now = time.monotonic()
                        outage_since = outage_since or now
                        if now - outage_since > self.settings.redis_outage_limit_s:
                            log.critical(
                                "redis_unavailable_giving_up",
                                seconds=round(now - outage_since, 1),
                                error=_describe(exc),
                                redis=mask_url(self.settings.redis_url),
                            )
                            stop_taskiq_supervisor()
                            raise RedisUnavailableError(
                                f"Redis unreachable for {now - outage_since:.0f} s"
                            ) from exc
                        if failures == 1 or failures % 10 == 0:
                            log.warning(
                                "redis_unavailable",
                                error=_describe(exc),
                                redis=mask_url(self.settings.redis_url),
                                failures=failures,
                            )
                        await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                        continue
                    if outage_since is not None:
                        log.info(
                            "redis_reconnected", after_s=round(time.monotonic() - outage_since, 1)
                        )
                    outage_since, failures = None, 0
                    buffer.extend(deliveries)
                    continue
                yield self._hand_out(buffer.popleft())
        finally:
            while buffer:
                await asyncio.shield(self._give_back(buffer.popleft()))

    def ready_message(self) -> AckableMessage | None:
        """The next job already leased by ``listen`` and not handed out yet, if any: the
        receiver takes it without waking the listener (no task, no round trip)."""
        if self._closing or not self._ready:
            return None
        return self._hand_out(self._ready.popleft())

    def _hand_out(self, delivery: Delivery) -> AckableMessage:
        return AckableMessage(data=delivery.message, ack=functools.partial(self._ack, delivery))

    async def _fetch(
        self, count: int, short: bool, next_due: int | None
    ) -> tuple[list[Delivery], int | None]:
        """Lease up to ``count`` jobs: after a short take, wait for a marker and take in one
        round trip; otherwise take, and wait only if that found nothing."""
        if short:
            return await self._idle(next_due, count)
        deliveries, next_due = await self._take(count)
        if deliveries:
            return deliveries, next_due
        return await self._idle(next_due, count)

    async def _take(self, count: int, wait_s: float = 0.0) -> tuple[list[Delivery], int | None]:
        """Lease up to ``count`` jobs; with ``wait_s``, first wait that long at most for a job
        to be enqueued (one round trip for both)."""
        self._take_counter += 1
        token = f"{self.worker_id}:{self._take_counter}"
        args = (token, count, self.settings.lease_ms, self.settings.tenant_concurrency)
        call = asyncio.ensure_future(
            self.queue.wait_and_take(wait_s, *args) if wait_s else self.queue.take(*args)
        )
        try:
            # Shielded: once Redis has leased jobs to this worker, they must reach _held (or be
            # given back), even when the listener is cancelled meanwhile.
            deliveries, next_due = await asyncio.shield(call)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                for delivery in (await call)[0]:
                    self._held[delivery.job_id] = delivery
                    await self._give_back(delivery)
            raise
        for delivery in deliveries:
            self._held[delivery.job_id] = delivery
        return deliveries, next_due

    async def _idle(self, next_due: int | None, count: int) -> tuple[list[Delivery], int | None]:
        """Nothing (more) to take: wait for a wake-up marker (at most 1 s, or until the next
        delayed job is due) and take what it announces in the same round trip."""
        timeout = 1.0
        if next_due is not None:
            timeout = min(timeout, max((next_due - now_ms()) / 1000, 0.005))
        if timeout <= 0.01:
            await asyncio.sleep(timeout)
            return [], next_due
        return await self._take(count, wait_s=timeout)

    async def _ack(self, delivery: Delivery) -> None:
        """taskiq's acknowledgement: apply the attempt's outcome atomically in Redis."""
        if delivery.job_id not in self._held:
            return  # given back at shutdown: the job is already waiting again
        self._acking += 1
        self._capacity.set()
        try:
            await self._settle(delivery)
        finally:
            self._acking -= 1
            self._release(delivery.job_id)

    async def _settle(self, delivery: Delivery) -> None:
        pending = self._outcomes.pop(delivery.job_id, None)
        if pending is None and await self._registered_since(delivery):
            # Its plugin was enabled for a tenant after this worker started: the job goes back
            # to waiting (no attempt counted) and runs now that its task is known.
            pending = PendingOutcome("requeue")
            log.info("job_requeued_task_registered", job_id=delivery.job_id)
        if pending is None:
            pending = PendingOutcome(
                "dead", value="message could not be decoded or its task is not registered"
            )
            log.error("job_dead_lettered", job_id=delivery.job_id, reason=pending.value)
        settled = await self._finish_with_retry(delivery, pending)
        if not settled:
            log.warning("job_lease_lost", job_id=delivery.job_id, outcome=pending.outcome)
            return
        if pending.event is not None and self.on_job_event is not None:
            # in a task of its own: the callbacks do not hold up this acknowledgement
            run = asyncio.ensure_future(self.on_job_event(pending.event))
            self._event_runs.add(run)
            run.add_done_callback(self._event_runs.discard)
        if settled == CIRCUIT_OPENED:
            await self._circuit_opened(delivery.job_id)

    async def _registered_since(self, delivery: Delivery) -> bool:
        """Whether the job came without an outcome because its task was not registered here
        and is registered now (``task_appeared``); not for an undecodable message."""
        if self.task_appeared is None:
            return False
        try:
            name = json.loads(delivery.message).get("task_name")
        except (ValueError, AttributeError):
            return False
        if not isinstance(name, str) or self.find_task(name) is not None:
            return False  # registered all along: the outcome is missing for another reason
        try:
            return await self.task_appeared(name)
        except Exception as exc:  # PostgreSQL away: dead-letter as before
            log.warning("task_lookup_failed", job_id=delivery.job_id, error=repr(exc))
            return False

    async def _circuit_opened(self, job_id: str) -> None:
        raw = await self.queue.job(job_id) or {}
        log.error(
            "circuit_opened",
            tenant_id=raw.get("tenant"),
            plugin_id=raw.get("plugin"),
            job_id=job_id,
            consecutive_failures=self.settings.breaker_threshold,
        )

    async def _finish_with_retry(self, delivery: Delivery, pending: PendingOutcome) -> int:
        started = time.monotonic()
        attempt = 0
        settlement = Settlement(
            delivery,
            pending.outcome,
            pending.value,
            pending.due_ms,
            pending.extra,
            self._started.get(delivery.job_id),
        )
        while True:
            try:
                return await self._acks.submit(settlement)
            except _TRANSIENT as exc:
                attempt += 1
                if time.monotonic() - started > self.settings.redis_outage_limit_s:
                    log.error("job_ack_failed", job_id=delivery.job_id, error=repr(exc))
                    return 0
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))

    async def _finish_batch(self, batch: list[Settlement]) -> list[int]:
        return await self.queue.finish_many(
            batch, breaker_threshold=self.settings.breaker_threshold
        )

    def _settling(self) -> int:
        """Jobs whose handler started here and that are not acknowledged yet: the
        acknowledgements that may still join the batch being gathered. Jobs leased but not
        started (waiting for a slot) do not count: a batch waiting for them waited its whole
        linger time, holding the slot of the job it acknowledges (one slot: 10 ms a job)."""
        return len(self._started)

    def _release(self, job_id: str) -> None:
        self._held.pop(job_id, None)
        self._started.pop(job_id, None)
        self._running.pop(job_id, None)
        self._outcomes.pop(job_id, None)
        self._capacity.set()

    async def _give_back(self, delivery: Delivery) -> None:
        """Return a leased job to the waiting list at once (shutdown)."""
        try:
            await self.queue.finish(delivery, "requeue")
            log.info("job_returned_to_queue", job_id=delivery.job_id)
        except RedisError as exc:
            log.warning("job_return_failed", job_id=delivery.job_id, error=repr(exc))
        finally:
            self._release(delivery.job_id)

    # ----------------------------------------------------------------- background loops
    async def _renew_leases(self) -> None:
        interval = self.settings.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            leases = [(job_id, d.token) for job_id, d in list(self._held.items())]
            try:
                lost = await self.queue.extend(leases, self.settings.lease_ms)
            except RedisError as exc:
                log.warning("lease_renewal_failed", error=repr(exc))
                continue
            for job_id in lost:
                if job_id in self._held:
                    self._lease_lost(job_id)

    def _lease_lost(self, job_id: str) -> None:
        """Another worker may run ``job_id`` now (its lease expired and the job was taken
        again). A job still waiting in ``_ready`` is dropped, never started here; a running
        one goes on, but its outcome is not recorded (``finish.lua`` answers "lease lost")."""
        for delivery in self._ready:
            if delivery.job_id == job_id:
                self._ready.remove(delivery)
                self._release(job_id)
                log.warning("job_lease_lost", job_id=job_id, started=False, dropped=True)
                return
        log.warning("job_lease_lost", job_id=job_id, started=job_id in self._started)

    async def _wind_down(self) -> None:
        """Job event callbacks still running get EVENT_GRACE_S (they may use the pools); a
        worker leaves the list of live workers."""
        if self._event_runs:
            _, late = await asyncio.wait(self._event_runs, timeout=EVENT_GRACE_S)
            for run in late:
                run.cancel()
        if self.is_worker_process:
            with contextlib.suppress(RedisError):
                await self.queue.forget_worker(self.worker_id)

    async def _heartbeat(self) -> None:
        """Tell Redis every HEARTBEAT_S that this worker is alive, and what it holds
        (``queue_stats``' ``workers``)."""
        started = now_ms()
        state = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": started,
            "capacity": self.settings.worker_concurrency,
        }
        while True:
            try:
                await self.queue.heartbeat(self.worker_id, {**state, "running": len(self._held)})
            except RedisError as exc:
                log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(HEARTBEAT_S)

    async def _check_stalled(self) -> None:
        interval = self.settings.stalled_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                result = await self.queue.recover_stalled(
                    self.worker_id,
                    self.settings.max_stalled_count,
                    int(self.settings.stalled_interval_ms * 0.9),
                )
            except RedisError as exc:
                log.warning("stalled_check_failed", error=repr(exc))
                continue
            if result is None:
                continue
            for job in result:
                (log.error if job.action == "failed" else log.warning)(
                    "job_stalled",
                    job_id=job.job_id,
                    plugin_id=job.plugin_id,
                    tenant_id=job.tenant_id,
                    attempt=job.attempt,
                    action=job.action,
                )
            await self._prune_finished()

    async def _prune_finished(self) -> None:
        """Drop finished jobs older than the retention from PostgreSQL (at most hourly; run by
        whichever worker holds the stalled check). ``plugin_runs`` is never pruned here."""
        loop = asyncio.get_running_loop()
        if self.pool is None or loop.time() - self._pruned_at < 3600:
            return
        self._pruned_at = loop.time()
        try:
            status = await self.pool.execute(
                "DELETE FROM jobs WHERE finished_at < NOW() - make_interval(days => $1)",
                self.settings.job_retention_days,
            )
            pruned = int(str(status).split()[-1])
            if pruned:
                log.info("jobs_pruned", count=pruned, days=self.settings.job_retention_days)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("jobs_prune_failed", error=f"{type(exc).__name__}: {exc}")

    # ----------------------------------------------------------------- shutdown grace
    def _install_shutdown_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self._begin_shutdown)
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, handler)

    def _begin_shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._capacity.set()
        log.info(
            "worker_stopping",
            running=len(self._started),
            grace_s=self.settings.shutdown_grace_s,
        )
        asyncio.get_running_loop().call_later(
            self.settings.shutdown_grace_s,
            lambda: asyncio.ensure_future(self._grace_expired()),
        )

    async def _grace_expired(self) -> None:
        """Jobs still running after the grace period go back to the queue and are cancelled."""
        for job_id, delivery in list(self._held.items()):
            task = self._running.get(job_id)
            await self._give_back(delivery)
            if task is not None and not task.done():
                log.warning("job_interrupted", job_id=job_id)
                task.cancel()


class Batcher(Generic[T, R]):
    """Coalesces concurrent calls into batches, so that one round trip serves many callers.

    The first call of a batch starts a flush; the flush waits, at most ``linger_s``, while
    ``pending()`` says more calls may still join (for acknowledgements: jobs leased by this
    worker whose handlers are still running), then sends up to ``max_size`` items at once.
    Calls made while a batch is in flight join the next one. A lone call is sent at once.
    """

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_size: int = 200,
        linger_s: float = 0.0,
        pending: Callable[[], int] | None = None,
    ) -> None:
        self._send = send
        self._max = max_size
        self._linger = linger_s
        self._pending = pending
        self._items: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None

    async def submit(self, item: T) -> R:
        """Send ``item`` with the next batch; returns its answer, or raises the batch's error."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return await future

    def _may_grow(self) -> bool:
        return (
            self._pending is not None
            and len(self._items) < self._max
            and self._pending() > len(self._items)
        )

    async def _gather(self) -> None:
        """Wait until the batch is complete (see the class), or the linger time is over."""
        if self._linger <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while self._may_grow() and loop.time() < deadline:
            self._wake = loop.create_future()
            timer = loop.call_later(deadline - loop.time(), _resolve, self._wake)
            try:
                await self._wake
            finally:
                timer.cancel()
                self._wake = None

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._items:
                await self._gather()
                batch, self._items = self._items[: self._max], self._items[self._max :]
                try:
                    answers = await self._send([item for item, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"{len(answers)} answers for {len(batch)} items")
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
                batch = []
        except BaseException:
            # Cancelled (the loop is closing) or a bug: no caller may wait forever.
            for _, future in batch + self._items:
                future.cancel()
            self._items = []
            raise
        finally:
            self._flusher = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed (redis-py can turn a cancellation that
    races its own read timeout into a retried timeout on Python 3.11), so shutdown never hangs."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None else text
