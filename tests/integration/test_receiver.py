"""drm-taskiq's receiver: leased jobs handed over without a task, taskiq's limits kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from taskiq import AsyncBroker, BrokerMessage

from drm_taskiq import JobScheduler
from drm_taskiq import receiver as receiver_module
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.receiver import Receiver
from drm_taskiq.redis_queue import QueueKeys
from drm_taskiq.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


class _Runs:
    """A job handler that records the job ids it ran."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def work(self, ctx: Any, job: Any) -> None:
        self.ids.append(job.id)
        await asyncio.sleep(0.01)

    async def setup(self, s: JobScheduler) -> None:
        await s.register_job("testp", "w", self.work)


async def _worker(settings: Settings, runs: _Runs, **overrides: Any) -> DrmBroker:
    broker = DrmBroker(settings.model_copy(update=overrides), own_process=False)
    broker.is_worker_process = True
    await broker.startup()
    await runs.setup(JobScheduler(broker, plugins=[]))
    return broker


async def _enqueue(client: JobScheduler, tenant: str, runs: _Runs, ids: list[str]) -> None:
    """Register ``runs``' job with the client and enqueue one run per id, in order."""
    await runs.setup(client)
    for i, job_id in enumerate(ids):
        await client.add_job("testp", "w", i, {"job_id": job_id}, tenant_id=tenant)


def _count_racing(receiver: Receiver) -> list[int]:
    """Count the calls of taskiq's racing path (its first step, a delivery slot raced against
    the shutdown event) in the one-element list returned."""
    calls = [0]
    original = receiver._acquire_delivery_slot

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await original(*args)

    receiver._acquire_delivery_slot = counted  # type: ignore[method-assign]
    return calls


async def _listen_until_recorded(
    receiver: Receiver, broker: DrmBroker, db: asyncpg.Pool, jobs: int
) -> None:
    """Run the receiver until ``jobs`` jobs are recorded, then stop it and the broker."""
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    try:
        await wait_for(lambda: db.fetchval("SELECT count(*) = $1 FROM jobs", jobs), timeout=30)
    finally:
        finish.set()
        await asyncio.wait_for(listening, timeout=30)
        await broker.shutdown()


async def test_jobs_reach_the_runner_through_one_pump_not_the_racing_path(
    settings: Settings, client: JobScheduler, db: asyncpg.Pool, tenant: str
) -> None:
    """40 jobs taken 20 at a time: all run, taskiq's per-message racing path (two tasks and two
    waits per job) is never taken, and the broker's listener is asked only when its leased
    batch is used up (a take or a wait per batch, not one per job)."""
    runs = _Runs()
    await _enqueue(client, tenant, runs, [f"r{i}" for i in range(40)])
    broker = await _worker(settings, runs, worker_concurrency=20, take_batch=20)
    receiver = Receiver(broker, max_async_tasks=100, run_startup=False)
    assert broker.receiver_kind == "drm"
    racing = _count_racing(receiver)
    listener_steps = 0
    listen = broker.listen

    async def counted_listen() -> AsyncGenerator[Any, None]:
        nonlocal listener_steps
        async for message in listen():
            listener_steps += 1
            yield message

    broker.listen = counted_listen  # type: ignore[method-assign]
    await _listen_until_recorded(receiver, broker, db, 40)
    assert sorted(runs.ids) == sorted(f"r{i}" for i in range(40))
    assert racing == [0]
    assert 1 <= listener_steps <= 10  # the first job of each take; the rest from memory


async def test_max_tasks_per_child_stops_after_that_many_and_returns_the_rest(
    settings: Settings,
    client: JobScheduler,
    db: asyncpg.Pool,
    tenant: str,
    redis_client: aioredis.Redis,
) -> None:
    """``--max-tasks-per-child 3`` with 10 jobs and 4 leased at a time: the receiver runs 3 and
    stops; the jobs it had leased and not run wait again, none is lost."""
    runs = _Runs()
    ids = [f"m{i}" for i in range(10)]
    await _enqueue(client, tenant, runs, ids)
    broker = await _worker(settings, runs, worker_concurrency=4, take_batch=4)
    receiver = Receiver(broker, max_async_tasks=100, max_tasks_to_execute=3, run_startup=False)
    try:
        # no finish event: the receiver stops on its own after 3 jobs
        await asyncio.wait_for(receiver.listen(asyncio.Event()), timeout=30)
    finally:
        await broker.shutdown()
    assert len(runs.ids) == 3
    keys = QueueKeys(settings.key_prefix, settings.queue)
    assert await redis_client.zcard(keys.active) == 0
    waiting = {m.decode() for m in await redis_client.zrange(keys.wait, 0, -1)}
    assert waiting == set(ids) - set(runs.ids)


class _ListBroker(AsyncBroker):
    """A broker without ``ready_message``: yields the messages it was given, then stops."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []

    async def kick(self, message: BrokerMessage) -> None:
        self.messages.append(message.message)

    async def listen(self) -> AsyncGenerator[bytes, None]:
        while self.messages:
            yield self.messages.pop(0)


async def test_with_another_broker_it_is_taskiqs_receiver() -> None:
    """A broker without ``ready_message``: the receiver runs its jobs like taskiq's own."""
    broker = _ListBroker()
    seen: list[int] = []

    @broker.task
    async def record(n: int) -> None:
        seen.append(n)

    for n in range(5):
        await record.kiq(n)
    receiver = Receiver(broker, max_async_tasks=10, run_startup=False)
    assert not hasattr(broker, "receiver_kind")
    await asyncio.wait_for(receiver.listen(asyncio.Event()), timeout=10)
    assert sorted(seen) == [0, 1, 2, 3, 4]


async def test_a_leased_job_whose_lease_was_taken_over_is_not_started(
    settings: Settings,
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
) -> None:
    """Jobs leased in a batch wait in memory while the one slot is busy. When another worker
    took them over meanwhile (their lease token changed, as after a stall), the next lease
    renewal drops them: this worker never starts them."""
    gate = asyncio.Event()
    ran: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        ran.append(job.id)
        if job.id == "l0":
            await gate.wait()

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    for i in range(4):
        await client.add_job("testp", "w", i, {"job_id": f"l{i}"}, tenant_id=tenant)
    broker = DrmBroker(
        settings.model_copy(
            update={
                "worker_concurrency": 4,
                "take_batch": 4,
                "lease_ms": 1200,  # renewed every 0.4 s
                "stalled_interval_ms": 600_000,  # no stall recovery during the test
            }
        ),
        own_process=False,
    )
    broker.is_worker_process = True
    await broker.startup()
    await setup(JobScheduler(broker, plugins=[]))
    receiver = Receiver(broker, max_async_tasks=1, run_startup=False)
    keys = QueueKeys(settings.key_prefix, settings.queue)
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    try:
        await wait_for(lambda: ran == ["l0"], timeout=10)
        assert await redis_client.zcard(keys.active) == 4  # 1 running, 3 leased in memory
        for job_id in ("l1", "l2", "l3"):
            await redis_client.hset(keys.job(job_id), "token", "another-worker:1")
        await wait_for(lambda: not broker._ready, timeout=10)  # dropped at the next renewal
        gate.set()

        async def l0_acknowledged() -> bool:
            return await redis_client.zscore(keys.active, "l0") is None

        await wait_for(l0_acknowledged, timeout=10)
        await asyncio.sleep(0.5)  # time enough to start a dropped job, were it kept
    finally:
        finish.set()
        await asyncio.wait_for(listening, timeout=30)
        await broker.shutdown()
    assert ran == ["l0"]
    for job_id in ("l1", "l2", "l3"):  # still the other worker's: nothing given back here
        assert await redis_client.hget(keys.job(job_id), "token") == b"another-worker:1"


async def test_an_acknowledgement_does_not_wait_for_jobs_not_started(
    settings: Settings, client: JobScheduler, tenant: str
) -> None:
    """One slot, 8 jobs leased at a time: each acknowledgement goes at once. The batcher waits
    for more only while other started jobs may still settle; leased jobs waiting for the slot
    made every acknowledgement wait its whole linger time (and hold the slot meanwhile)."""
    runs = _Runs()
    ids = [f"a{i}" for i in range(16)]
    await _enqueue(client, tenant, runs, ids)
    broker = await _worker(settings, runs, worker_concurrency=8, take_batch=8)
    waited: list[tuple[int, int]] = []  # (started, leased) whenever a batch would wait
    original = broker._acks._gather

    async def gather() -> None:
        if broker._acks._may_grow():
            waited.append((len(broker._started), len(broker._held)))
        await original()

    broker._acks._gather = gather  # type: ignore[method-assign]
    receiver = Receiver(broker, max_async_tasks=1, run_startup=False)
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    try:
        await wait_for(lambda: len(runs.ids) == 16, timeout=30)

        async def all_acknowledged() -> bool:
            counts = await client.broker.queue.counts()
            return counts["waiting"] + counts["active"] == 0

        await wait_for(all_acknowledged, timeout=30)
    finally:
        finish.set()
        await asyncio.wait_for(listening, timeout=30)
        await broker.shutdown()
    assert sorted(runs.ids) == sorted(ids)
    assert waited == []  # the only started job was the one being acknowledged


async def test_a_taskiq_whose_receiver_changed_gets_taskiqs_own_prefetcher(
    settings: Settings,
    client: JobScheduler,
    db: asyncpg.Pool,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the taskiq internals the pump relies on are missing (a taskiq release that changed
    its receiver), the receiver says so and runs jobs through taskiq's own prefetcher."""
    monkeypatch.setattr(receiver_module, "_INTERNALS", False)
    runs = _Runs()
    await _enqueue(client, tenant, runs, [f"f{i}" for i in range(6)])
    broker = await _worker(settings, runs, worker_concurrency=4, take_batch=4)
    receiver = Receiver(broker, max_async_tasks=10, run_startup=False)
    assert broker.receiver_kind == "taskiq"
    racing = _count_racing(receiver)
    await _listen_until_recorded(receiver, broker, db, 6)
    assert sorted(runs.ids) == sorted(f"f{i}" for i in range(6))
    assert racing[0] >= 6  # a slot per job through taskiq's racing path
