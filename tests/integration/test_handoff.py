"""Direct hand-off: an idle worker registers, and ``enqueue.lua`` leases a new job to it.

The queue-level calls against the shared Redis (the test's own key prefix): what a hand-off
writes, when it must not happen (a job ahead, running limits, a lapsed registration), a
delivery that arrives after the wait ended, and a worker that never takes its delivery.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drm_taskiq.jobs import JobScheduler
from drm_taskiq.redis_queue import RedisQueue, Settlement, now_ms

pytestmark = pytest.mark.asyncio

LEASE_MS = 30_000


async def _enqueue(queue: RedisQueue, job_id: str, **kwargs: Any) -> tuple[int, str]:
    return await queue.enqueue(
        job_id,
        kwargs.pop("message", b'{"m": 1}'),
        priority=kwargs.pop("priority", 0),
        delay_ms=0,
        dedup_ttl_ms=0,
        fields={"tenant": "acme", **kwargs.pop("fields", {})},
    )


async def _registered(redis_client: Any, queue: RedisQueue) -> list[str]:
    return [m.decode() for m in await redis_client.zrange(queue.keys.idle, 0, -1)]


async def _wait_registered(redis_client: Any, queue: RedisQueue) -> None:
    for _ in range(200):
        if await _registered(redis_client, queue):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the waiting take did not register")


async def test_an_idle_worker_gets_a_new_job_from_the_enqueue_itself(
    client: JobScheduler, redis_client: Any
) -> None:
    """The waiting take registers the worker; the enqueue leases the job to it (state, token,
    lease, running count, fair-queuing floor) and pushes the delivery onto the worker's list,
    where its BLPOP returns it: no wake-up marker, nothing waiting, the registration used."""
    queue = client.broker.queue
    waiting = asyncio.ensure_future(queue.wait_and_take(5, "w1:7", 5, LEASE_MS))
    await _wait_registered(redis_client, queue)
    assert await _registered(redis_client, queue) == [f"{LEASE_MS} w1:7"]
    before = now_ms()
    assert await _enqueue(queue, "h1", message=b'{"a":\n"b"}') == (1, "active")
    deliveries, _ = await asyncio.wait_for(waiting, timeout=2)
    [delivery] = deliveries
    assert (delivery.job_id, delivery.message, delivery.token) == ("h1", b'{"a":\n"b"}', "w1:7")
    assert (delivery.attempts_made, delivery.stalled) == (0, 0)
    assert before <= delivery.created_ms <= now_ms()

    job = await redis_client.hgetall(queue.keys.job("h1"))
    assert job[b"state"] == b"active" and job[b"token"] == b"w1:7"
    assert job[b"processed"] == job[b"ts"]
    deadline = await redis_client.zscore(queue.keys.active, "h1")
    assert before + LEASE_MS <= deadline <= now_ms() + LEASE_MS
    assert await redis_client.hget(queue.keys.running, "acme") == b"1"
    assert await redis_client.hget(queue.keys.fair, "~floor") == job[b"seq"]
    assert await queue.counts() == {"waiting": 0, "delayed": 0, "active": 1}
    assert await redis_client.llen(queue.keys.marker) == 0
    assert await _registered(redis_client, queue) == []
    assert await redis_client.exists(queue.keys.handoff("w1")) == 0

    # the leased job settles as one taken by take.lua does
    await queue.finish_many([Settlement(delivery, "completed", "null", 0, None, now_ms())])
    assert await redis_client.hget(queue.keys.job("h1"), "state") == b"completed"
    assert await queue.running_per_tenant() == {}

    # the next job, with the registration used up, waits and wakes through the marker
    assert await _enqueue(queue, "h2") == (1, "waiting")
    assert await redis_client.llen(queue.keys.marker) == 1


async def test_no_hand_off_past_a_job_that_waits_ahead(
    client: JobScheduler, redis_client: Any
) -> None:
    """A job already waiting (say, a retry put back while the worker was registered) goes
    first: a new job of a lower or the same priority waits behind it and the marker wakes the
    worker, whose next take leases the older one first. A job of a higher priority is handed
    off past it."""
    queue = client.broker.queue
    # a job waiting with the registration in place, as a retry would leave it
    await _enqueue(queue, "ahead", priority=5)
    await redis_client.delete(queue.keys.marker)
    await redis_client.zadd(queue.keys.idle, {f"{LEASE_MS} w2:1": now_ms() + 60_000})
    assert await _enqueue(queue, "same", priority=5) == (1, "waiting")
    assert await _enqueue(queue, "lower", priority=9) == (1, "waiting")
    assert await redis_client.llen(queue.keys.marker) == 2
    assert await _registered(redis_client, queue) == [f"{LEASE_MS} w2:1"]
    assert await _enqueue(queue, "urgent", priority=1) == (1, "active")
    assert await redis_client.lrange(queue.keys.handoff("w2"), 0, -1) == [
        b"urgent\n0\n0\n" + (await redis_client.hget(queue.keys.job("urgent"), "ts")) + b"\nw2:1\n"
        b'{"m": 1}'
    ]
    taken, _ = await queue.take("w3:1", 5, LEASE_MS)
    assert [d.job_id for d in taken] == ["ahead", "same", "lower"]


async def test_no_hand_off_when_running_limits_apply(
    client: JobScheduler, redis_client: Any
) -> None:
    """A hand-off does not count running jobs per tenant: with a limit configured, the job
    waits, and a worker taking under a default limit does not register at all."""
    queue = client.broker.queue
    await redis_client.zadd(queue.keys.idle, {f"{LEASE_MS} w4:1": now_ms() + 60_000})
    await queue.set_tenant_limit("acme", 1)
    assert await _enqueue(queue, "limited") == (1, "waiting")
    await queue.set_tenant_limit("acme", None)
    await redis_client.delete(queue.keys.idle)

    taken, _ = await queue.wait_and_take(0.05, "w5:1", 5, LEASE_MS, tenant_limit=2)
    assert [d.job_id for d in taken] == ["limited"]
    assert await queue.wait_and_take(0.05, "w5:2", 5, LEASE_MS, tenant_limit=2) == ([], None)
    assert await _registered(redis_client, queue) == []


async def test_a_lapsed_registration_gets_nothing(client: JobScheduler, redis_client: Any) -> None:
    """A registration past its time (a worker gone while it waited) is skipped: the job waits
    for the marker; the next registration clears lapsed ones."""
    queue = client.broker.queue
    await redis_client.zadd(queue.keys.idle, {f"{LEASE_MS} gone:1": now_ms() - 1})
    assert await _enqueue(queue, "j") == (1, "waiting")
    assert await redis_client.exists(queue.keys.handoff("gone")) == 0
    taken, _ = await queue.take("w6:1", 5, LEASE_MS)
    assert [d.job_id for d in taken] == ["j"]
    assert await queue.wait_and_take(0.05, "w6:2", 5, LEASE_MS) == ([], None)
    assert await _registered(redis_client, queue) == [f"{LEASE_MS} w6:2"]


async def test_a_job_handed_off_after_the_wait_ended_comes_with_the_next_take(
    client: JobScheduler, redis_client: Any
) -> None:
    """The registration outlives the wait (by a margin): a job handed off between the end of
    the wait and the worker's next call is returned by that call, under the registration's
    token, and the registration is withdrawn; :meth:`withdraw` does the same at shutdown."""
    queue = client.broker.queue
    assert await queue.wait_and_take(0.05, "w7:1", 5, LEASE_MS) == ([], None)
    assert await _enqueue(queue, "late") == (1, "active")
    await _enqueue(queue, "next")
    taken, _ = await queue.take("w7:2", 5, LEASE_MS)
    assert [(d.job_id, d.token) for d in taken] == [("next", "w7:2"), ("late", "w7:1")]
    assert await _registered(redis_client, queue) == []
    assert await redis_client.exists(queue.keys.handoff("w7")) == 0

    assert await queue.wait_and_take(0.05, "w7:3", 5, LEASE_MS) == ([], None)
    assert await _enqueue(queue, "at-shutdown") == (1, "active")
    [handed] = await queue.withdraw("w7")
    assert (handed.job_id, handed.token) == ("at-shutdown", "w7:3")
    assert await _registered(redis_client, queue) == []
    assert await _enqueue(queue, "after") == (1, "waiting")
    assert await queue.withdraw("w7") == []


async def test_a_worker_shutting_down_gives_back_what_was_handed_to_it(
    client: JobScheduler, redis_client: Any
) -> None:
    """The broker's withdrawal (end of its listener, or shutdown) puts a job handed off after
    its last wait back to waiting at once."""
    broker = client.broker
    queue = broker.queue
    token = f"{broker.worker_id}:1"
    assert await queue.wait_and_take(0.05, token, 5, LEASE_MS) == ([], None)
    assert await _enqueue(queue, "returned") == (1, "active")
    await broker._withdraw()
    job = await redis_client.hgetall(queue.keys.job("returned"))
    assert job[b"state"] == b"waiting"
    assert await queue.counts() == {"waiting": 1, "delayed": 0, "active": 0}
    assert await queue.running_per_tenant() == {}


async def test_a_delivery_never_taken_comes_back_when_its_lease_runs_out(
    client: JobScheduler, redis_client: Any
) -> None:
    """A job handed to a worker that died while registered stays leased to it until the lease
    runs out; then the stalled check puts it back and another worker takes it. The dead
    worker's list expires with the lease."""
    queue = client.broker.queue
    await redis_client.zadd(queue.keys.idle, {"1000 dead:1": now_ms() + 60_000})
    assert await _enqueue(queue, "orphan") == (1, "active")
    assert 0 < await redis_client.pttl(queue.keys.handoff("dead")) <= 1000
    assert await queue.recover_stalled("checker", 3, 100) == []  # the lease holds
    await asyncio.sleep(1.1)  # (and the check's lock is free again)
    [stalled] = await queue.recover_stalled("checker", 3, 100) or []
    assert (stalled.job_id, stalled.action) == ("orphan", "requeued")
    assert await redis_client.exists(queue.keys.handoff("dead")) == 0
    taken, _ = await queue.take("alive:1", 5, LEASE_MS)
    assert [(d.job_id, d.stalled) for d in taken] == [("orphan", 1)]


async def test_a_withdrawal_during_the_wait_ends_the_registration(
    client: JobScheduler, redis_client: Any
) -> None:
    """A worker that stops while its wait is under way (the answer not back yet) withdraws the
    registration its take just made: the next job is not handed to it, and the wait ends
    with the marker that job pushes."""
    queue = client.broker.queue
    waiting = asyncio.ensure_future(queue.wait_and_take(5, "w8:1", 5, LEASE_MS))
    await _wait_registered(redis_client, queue)
    assert await queue.withdraw("w8") == []
    assert await _registered(redis_client, queue) == []
    assert await _enqueue(queue, "after-stop") == (1, "waiting")
    assert await asyncio.wait_for(waiting, timeout=2) == ([], None)
    assert await queue.counts() == {"waiting": 1, "delayed": 0, "active": 0}
