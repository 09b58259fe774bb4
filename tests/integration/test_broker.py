"""The broker's guarantees in one process: priorities, leases, stalls, key layout, memory."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.testing import capture_logs

from drm_taskiq import JobScheduler
from drm_taskiq.queue_broker import Batcher, DrmBroker
from drm_taskiq.redis_queue import (
    KEPT_PER_SCRIPT,
    Delivery,
    EnqueueRequest,
    RedisQueue,
    Settlement,
    StalledJob,
    now_ms,
    pool_options,
)
from drm_taskiq.runlog import LedgerEntry, RunLedger, write_entries
from drm_taskiq.settings import load_settings
from tests.conftest import wait_for
from tests.support.ledger import ledger_entry
from tests.support.services import PrivateRedis

pytestmark = pytest.mark.asyncio


async def test_high_priority_overtakes_a_low_backlog(
    client: JobScheduler, start_worker: Any, tenant: str
) -> None:
    """200 low jobs queued, then 20 high ones: all high ones finish before the remaining low."""
    finished: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        await asyncio.sleep(0.001)
        finished.append(job.data)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    for i in range(200):
        await client.add_job("testp", "w", f"low-{i}", {"priority": 10}, tenant_id=tenant)
    for i in range(20):
        await client.add_job("testp", "w", f"high-{i}", {"priority": 1}, tenant_id=tenant)
    await start_worker(setup, worker_concurrency=4)
    await wait_for(lambda: len(finished) == 220, timeout=60)
    last_high = max(i for i, name in enumerate(finished) if name.startswith("high"))
    lows_before = [name for name in finished[:last_high] if name.startswith("low")]
    assert lows_before == [], f"{len(lows_before)} low jobs finished before the last high one"
    lows = [int(name.split("-")[1]) for name in finished if name.startswith("low")]
    assert sorted(lows) == list(range(200))


async def test_status_through_a_stall_and_recovery(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job taken by a worker that dies is active, then waiting (stalled), then completed."""

    async def work(ctx: Any, job: Any) -> int:
        return int(job.attempts_made)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    job_id = await client.add_job("testp", "w", None, tenant_id=tenant)
    queue = client.broker.queue
    [delivery], _ = await queue.take("dead-worker:1", 1, lease_ms=300)
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert (status.state, status.attempts_made) == ("active", 0)
    await asyncio.sleep(0.4)
    recovered = await queue.recover_stalled("checker", max_stalled=1, lock_ms=10)
    assert recovered == [StalledJob(job_id, "requeued", "testp", tenant, 1)]
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert (status.state, status.attempts_made) == ("waiting", 0)
    assert not await queue.finish(delivery, "completed", value="1")
    await start_worker(setup)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert (status.state, status.attempts_made, status.returnvalue) == ("completed", 1, 0)
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 1


async def test_job_stalled_too_often_fails_with_reason(
    client: JobScheduler, db: asyncpg.Pool, tenant: str, start_worker: Any
) -> None:
    """A job stalled more than max_stalled_count times fails and leaves an error row."""

    async def work(ctx: Any, job: Any) -> None:
        return None

    await client.register_job("testp", "w", work)
    job_id = await client.add_job("testp", "w", None, tenant_id=tenant)
    queue = client.broker.queue
    for round_ in range(2):
        await queue.take(f"dead:{round_}", 1, lease_ms=1)
        await asyncio.sleep(0.01)
        await client.broker.redis.delete(queue.keys.stalled_lock)
        result = await queue.recover_stalled("checker", max_stalled=1, lock_ms=10)
        action = "requeued" if round_ == 0 else "failed"
        assert result == [StalledJob(job_id, action, "testp", tenant, 1)]
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert status.state == "failed"
    assert status.failed_reason == "job stalled more than allowable limit"
    await start_worker(None)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM plugin_runs"))
    row = await db.fetchrow("SELECT status, error FROM plugin_runs")
    assert row is not None
    assert (row["status"], row["error"]) == ("error", "job stalled more than allowable limit")


async def test_only_one_stalled_check_at_a_time(client: JobScheduler) -> None:
    """The stalled check is guarded by a lock: a second checker in the interval does nothing."""
    queue = client.broker.queue
    assert await queue.recover_stalled("a", max_stalled=1, lock_ms=5000) == []
    assert await queue.recover_stalled("b", max_stalled=1, lock_ms=5000) is None


TOTAL = 10_000


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _slot(key: bytes) -> int:
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return _crc16(key) % 16384


async def test_all_queue_keys_share_one_cluster_slot(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str, redis_client: Any
) -> None:
    """Every key the queue creates starts with its hash tag, so all map to one cluster slot."""

    async def work(ctx: Any, job: Any) -> None:
        return None

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    await client.add_job("testp", "w", 1, {"delay": 5000}, tenant_id=tenant)
    await client.add_job("testp", "w", 1, {"job_id": "fixed-id"}, tenant_id=tenant)
    await start_worker(setup)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"))
    keys = [key async for key in redis_client.scan_iter(match=f"*{client.settings.key_prefix}*")]
    assert len(keys) >= 5
    prefix = client.broker.queue.keys.base.encode()
    assert all(key.startswith(prefix) for key in keys), keys
    assert len({_slot(key) for key in keys}) == 1
    assert _crc16(b"123456789") == 0x31C3  # the CRC16 variant Redis Cluster uses


async def test_poison_message_goes_to_dead_letter(
    client: JobScheduler, start_worker: Any, redis_client: Any
) -> None:
    """A job whose message does not decode is dead-lettered; the worker keeps running."""
    keys = client.broker.queue.keys
    await redis_client.hset(keys.job("poison"), mapping={"msg": b"\xff\x00garbage", "pri": 0})
    await redis_client.zadd(keys.wait, {"poison": 0})
    worker = await start_worker(None)
    await wait_for(lambda: redis_client.lrange(keys.dead, 0, -1))
    assert await redis_client.lrange(keys.dead, 0, -1) == [b"poison"]
    assert await redis_client.hget(keys.job("poison"), "state") == b"failed"
    assert worker.task is not None
    assert not worker.task.done()


async def test_ten_thousand_jobs_leave_redis_flat(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str, redis_client: Any
) -> None:
    """After 10,000 jobs only the queue's fixed keys remain, holding almost no memory."""

    async def work(ctx: Any, job: Any) -> None:
        return None

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    task = client.broker.find_task("plugin:testp:w")
    assert task is not None
    batch = 500
    for start in range(0, TOTAL, batch):
        await asyncio.gather(*(task.kiq({"n": start + i}, tenant_id=tenant) for i in range(batch)))
    await start_worker(setup, worker_concurrency=50)
    await wait_for(lambda: db.fetchval("SELECT count(*) = $1 FROM jobs", TOTAL), timeout=240)
    try:
        await wait_for(lambda: _job_keys_zero(redis_client, client), timeout=30)
    except AssertionError:
        prefix = client.broker.queue.keys.job_prefix
        left = [key async for key in redis_client.scan_iter(match=f"{prefix}*", count=1000)]
        sample = [await redis_client.hgetall(key) for key in left[:3]]
        raise AssertionError(f"{len(left)} job hashes left, e.g. {sample}") from None
    keys = sorted(
        [
            key.decode()
            async for key in redis_client.scan_iter(match=f"*{client.settings.key_prefix}*")
        ]
    )
    base = client.broker.queue.keys.base
    # (workers: the running worker's heartbeat, one entry per worker)
    names = ("fair", "marker", "ledger", "stalled-check", "workers")
    allowed = {f"{base}:{name}" for name in names}
    assert set(keys) <= allowed, keys
    # The server is shared, so measure this queue's own keys rather than used_memory.
    remaining = sum([await redis_client.memory_usage(key) or 0 for key in keys])
    assert remaining < 256 * 1024, f"the queue's keys still hold {remaining} bytes"
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == TOTAL
    assert now_ms() > 0


async def _job_keys_zero(redis_client: Any, client: JobScheduler) -> bool:
    prefix = client.broker.queue.keys.job_prefix
    return not [key async for key in redis_client.scan_iter(match=f"{prefix}*", count=1000)]


async def test_stalled_event_names_the_job(
    client: JobScheduler, start_worker: Any, tenant: str
) -> None:
    """The worker's stalled check logs job_stalled with plugin, tenant, job id and attempt."""
    from structlog.testing import capture_logs

    async def work(ctx: Any, job: Any) -> None:
        return None

    await client.register_job("testp", "w", work)
    job_id = await client.add_job("testp", "w", None, tenant_id=tenant)
    await client.broker.queue.take("dead:1", 1, lease_ms=1)
    with capture_logs() as logs:
        await start_worker(lambda s: s.register_job("testp", "w", work))
        await wait_for(lambda: [e for e in logs if e["event"] == "job_stalled"], timeout=10)
    [event] = [e for e in logs if e["event"] == "job_stalled"]
    assert event["job_id"] == job_id
    assert (event["plugin_id"], event["tenant_id"], event["attempt"]) == ("testp", tenant, 1)
    assert event["action"] == "requeued"


async def test_delayed_job_waits_in_redis_with_no_worker(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A delayed job whose time comes while no worker runs is kept and runs later."""

    async def work(ctx: Any, job: Any) -> str:
        return "late"

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    job_id = await client.add_job("testp", "w", None, {"delay": 200}, tenant_id=tenant)
    await asyncio.sleep(0.8)
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert status.state == "delayed"
    await start_worker(setup)
    await wait_for(lambda: db.fetchval("SELECT count(*) FROM jobs"), timeout=10)
    status = await client.get_job_status("testp", "w", job_id)
    assert status is not None
    assert (status.state, status.returnvalue) == ("completed", "late")


async def test_progress_visible_while_running(
    client: JobScheduler, start_worker: Any, tenant: str
) -> None:
    """job.update_progress is visible through get_job_status while the job is active."""
    release = asyncio.Event()

    async def slow(ctx: Any, job: Any) -> None:
        await job.update_progress({"done": 3, "of": 10})
        await release.wait()

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "slow", slow)

    await setup(client)
    await start_worker(setup)
    job_id = await client.add_job("testp", "slow", None, tenant_id=tenant)

    async def progressed() -> Any:
        status = await client.get_job_status("testp", "slow", job_id)
        return status if status is not None and status.progress else None

    status = await wait_for(progressed, timeout=10)
    assert (status.state, status.progress) == ("active", {"done": 3, "of": 10})
    release.set()


class _Concurrency:
    """A job handler that records when each run starts and how many run at once at most."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = self.peak = 0
        self.starts: list[float] = []

    async def work(self, ctx: Any, job: Any) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.seconds)
        self.running -= 1

    async def setup(self, s: JobScheduler) -> None:
        await s.register_job("testp", "w", self.work)


async def test_worker_concurrency_bounds_running_jobs(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """WORKER_CONCURRENCY=3: one worker process never runs more than 3 jobs at once."""
    jobs = _Concurrency(0.05)
    await jobs.setup(client)
    for i in range(12):
        await client.add_job("testp", "w", i, tenant_id=tenant)
    await start_worker(jobs.setup, worker_concurrency=3)
    await wait_for(lambda: db.fetchval("SELECT count(*) = 12 FROM jobs"), timeout=30)
    assert jobs.peak == 3


async def test_many_attempts_settle_in_one_call_each_on_its_own(
    client: JobScheduler, tenant: str
) -> None:
    """finish_many settles a mix of outcomes in one script call; a job whose lease was lost
    in the same call is refused alone, and each settled attempt gets one ledger entry."""

    async def work(ctx: Any, job: Any) -> None:
        return None

    await client.register_job("testp", "w", work)
    ids = [await client.add_job("testp", "w", i, tenant_id=tenant) for i in range(4)]
    queue = client.broker.queue
    deliveries, _ = await queue.take("w:1", 4, lease_ms=30_000)
    assert sorted(d.job_id for d in deliveries) == sorted(ids)
    by_id = {d.job_id: d for d in deliveries}
    lost = Delivery(**{**_fields(by_id[ids[3]]), "token": "someone-else"})
    entries_before = await client.broker.redis.xlen(queue.keys.ledger)
    answers = await queue.finish_many(
        [
            Settlement(by_id[ids[0]], "completed", value="7"),
            Settlement(by_id[ids[1]], "retry", value="boom", due_ms=now_ms() + 60_000),
            Settlement(by_id[ids[2]], "failed", value="bad"),
            Settlement(lost, "completed", value="1"),
        ]
    )
    assert answers == [1, 1, 1, 0]
    states = [(await queue.job(job_id) or {}).get("state") for job_id in ids]
    assert states == ["completed", "delayed", "failed", "active"]
    assert await client.broker.redis.xlen(queue.keys.ledger) - entries_before == 3
    assert await queue.counts() == {"waiting": 0, "delayed": 1, "active": 1}


async def test_batcher_coalesces_concurrent_calls_and_spreads_errors() -> None:
    """Calls made together share one send; a failed send fails exactly its own callers."""
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        sent.append(items)
        await asyncio.sleep(0.01)
        if 13 in items:
            raise ConnectionError("down")
        return [item * 2 for item in items]

    batcher: Batcher[int, int] = Batcher(send, max_size=3)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
    assert answers == [i * 2 for i in range(7)]
    assert sent == [[0, 1, 2], [3, 4, 5], [6]]
    results = await asyncio.gather(batcher.submit(13), batcher.submit(1), return_exceptions=True)
    assert isinstance(results[0], ConnectionError)
    assert isinstance(results[1], ConnectionError)
    assert await batcher.submit(5) == 10


def _fields(delivery: Delivery) -> dict[str, Any]:
    return {name: getattr(delivery, name) for name in Delivery.__slots__}


async def test_batcher_waits_for_the_calls_still_expected_and_no_longer() -> None:
    """With ``pending``, a batch waits for the calls still expected (not for the linger time),
    and a lone call is sent at once."""
    sent: list[list[str]] = []
    expected = 3

    async def send(items: list[str]) -> list[str]:
        sent.append(items)
        return items

    batcher: Batcher[str, str] = Batcher(send, linger_s=30.0, pending=lambda: expected)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.05)
    assert not first.done()
    assert await asyncio.gather(first, batcher.submit("b"), batcher.submit("c")) == ["a", "b", "c"]
    assert sent == [["a", "b", "c"]]
    expected = 1
    assert await batcher.submit("d") == "d"
    assert sent[-1] == ["d"]
    assert loop.time() - started < 10, "a complete batch must not wait for the linger time"


async def test_enqueue_many_answers_each_job_as_enqueue_would(
    client: JobScheduler, redis_client: Any
) -> None:
    """One call adds many jobs: new ones wait or are delayed, an existing id is left alone, a
    dedup key refuses a finished id, the rate limit refuses the jobs above it; messages are
    stored byte for byte (non-ASCII text, and a binary message through the per-job path)."""
    queue = client.broker.queue
    await queue.enqueue("old", b"old", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
    await redis_client.set(queue.keys.dedup("gone"), "1")
    text = '{"data": "caf\\u00e9 \\u2603 \\ud83d\\ude00", "raw": "ü"}'.encode()
    limited = {"tenant": "t1"}
    answers = await queue.enqueue_many(
        [
            EnqueueRequest("a", text, priority=3, fields={"tenant": "t0"}),
            EnqueueRequest("b", b"{}", delay_ms=60_000),
            EnqueueRequest("old", b"new"),
            EnqueueRequest("gone", b"{}", dedup_ttl_ms=60_000),
            EnqueueRequest("r1", b"{}", fields=limited, rate_limit=2),
            EnqueueRequest("r2", b"{}", fields=limited, rate_limit=2),
            EnqueueRequest("r3", b"{}", fields=limited, rate_limit=2),
        ]
    )
    assert answers == [
        (1, "waiting"),
        (1, "delayed"),
        (0, "waiting"),
        (0, "finished"),
        (1, "waiting"),
        (1, "waiting"),
        (-1, "3"),
    ]
    assert await redis_client.hget(queue.keys.job("a"), "msg") == text
    assert await redis_client.hget(queue.keys.job("old"), "msg") == b"old"
    assert await queue.counts() == {"waiting": 4, "delayed": 1, "active": 0}
    # one wake-up per kind for the whole call ("0": delayed, "1": waiting), after "old"'s own
    assert await redis_client.lrange(queue.keys.marker, 0, -1) == [b"0", b"1", b"1"]
    binary = bytes(range(256))
    assert await queue.enqueue_many([EnqueueRequest("bin", binary)]) == [(1, "waiting")]
    assert await redis_client.hget(queue.keys.job("bin"), "msg") == binary


async def test_concurrent_producers_reuse_kept_connections_and_survive_their_loss() -> None:
    """40 concurrent enqueues: each succeeds, up to KEPT_PER_SCRIPT connections are kept for
    the enqueue script and the others go back to the pool; later calls, one at a time or
    concurrent, open no new connections; after the server closed every connection, the next
    calls reconnect and succeed (on a Redis of the test's own: its clients are killed)."""
    server = PrivateRedis()
    server.start()
    pool = aioredis.BlockingConnectionPool.from_url(
        server.url, max_connections=50, **pool_options()
    )
    redis = aioredis.Redis(connection_pool=pool)
    admin = aioredis.Redis.from_url(server.url)

    async def enqueue(job_id: str) -> tuple[int, str]:
        return await queue.enqueue(job_id, b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})

    async def connections() -> int:
        return len(await admin.client_list()) - 1  # the admin connection itself

    try:
        queue = RedisQueue(redis, "drm-test", "q")
        answers = await asyncio.gather(*(enqueue(f"a{i}") for i in range(40)))
        assert answers == [(1, "waiting")] * 40
        assert len(queue._kept["enqueue"]) == KEPT_PER_SCRIPT  # idle again, kept
        opened = await connections()
        for i in range(10):
            assert await enqueue(f"b{i}") == (1, "waiting")
        await asyncio.gather(*(enqueue(f"c{i}") for i in range(40)))
        assert await connections() == opened
        assert len(queue._kept["enqueue"]) == KEPT_PER_SCRIPT

        await admin.client_kill_filter(_type="normal", skipme=True)

        async def all_closed() -> bool:
            return await connections() == 0

        await wait_for(all_closed, timeout=10)
        answers = await asyncio.gather(*(enqueue(f"d{i}") for i in range(40)))
        assert answers == [(1, "waiting")] * 40
        assert await queue.counts() == {"waiting": 130, "delayed": 0, "active": 0}
        assert len(queue._kept["enqueue"]) == KEPT_PER_SCRIPT
    finally:
        await pool.disconnect()  # kept connections too: the pool counts them as in use
        await admin.aclose()
        server.cleanup()


async def test_a_producer_enqueues_without_an_error_after_a_redis_restart() -> None:
    """A producer whose connections the server closed (a restart) reconnects before using
    them: no enqueue after the restart fails (redis-py 8, by default, sent the next command on
    each closed connection and raised ConnectionError)."""
    server = PrivateRedis()
    server.start()
    broker = DrmBroker(
        load_settings(redis_url=server.url, entry_points=False, key_prefix="drm-test"),
        own_process=False,
    )

    async def enqueue(job_id: str) -> tuple[int, str]:
        return await broker.queue.enqueue(
            job_id, b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={}
        )

    try:
        await asyncio.gather(*(enqueue(f"a{i}") for i in range(20)))
        server.stop()
        server.start()
        await asyncio.sleep(0.2)  # the event loop sees the closed sockets (as while a restart runs)
        for i in range(20):  # one at a time: each kept connection is met in turn
            assert await enqueue(f"b{i}") == (1, "waiting")
        answers = await asyncio.gather(*(enqueue(f"c{i}") for i in range(20)))
        assert answers == [(1, "waiting")] * 20
        assert await broker.queue.counts() == {"waiting": 60, "delayed": 0, "active": 0}
    finally:
        await broker.connection_pool.disconnect()
        server.cleanup()


def _socket_buffers_max() -> int:
    """The most a TCP connection's receive and send buffers may grow to here (bytes)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 32 * 1024 * 1024
    return total


async def test_a_kept_connection_waits_for_a_large_write_within_the_socket_timeout() -> None:
    """A command the socket does not take whole is waited for, at most the socket timeout: to a
    server that stops reading, the enqueue fails with TimeoutError and the connection is
    dropped; once the server reads again the next enqueue goes through on a new connection."""
    server = PrivateRedis()
    server.start()
    broker = DrmBroker(
        load_settings(
            redis_url=f"{server.url}?socket_timeout=3", entry_points=False, key_prefix="drm-test"
        ),
        own_process=False,
    )
    queue = broker.queue
    large = b"x" * (2 * _socket_buffers_max() + 8 * 1024 * 1024)  # more than they can hold

    async def enqueue(job_id: str, message: bytes) -> tuple[int, str]:
        return await queue.enqueue(
            job_id, message, priority=0, delay_ms=0, dedup_ttl_ms=0, fields={}
        )

    try:
        assert await enqueue("small", b"{}") == (1, "waiting")  # a kept connection now
        assert await enqueue("large", large) == (1, "waiting")  # written whole, with a wait
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{server.proc.pid}/stat")
        await wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T")  # stopped
        try:
            with pytest.raises(RedisTimeoutError, match="writing"):  # not sent whole
                await asyncio.wait_for(enqueue("stuck", large), timeout=30)
            assert not queue._kept["enqueue"]  # the connection went back to the pool
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert await enqueue("after", b"{}") == (1, "waiting")
        # read back without the socket timeout: 72 MB can take longer on a slow machine
        reader = aioredis.Redis.from_url(server.url)
        try:
            assert await reader.hget(queue.keys.job("large"), "msg") == large
        finally:
            await reader.aclose()
    finally:
        await broker.connection_pool.disconnect()
        server.cleanup()


async def test_batcher_never_leaves_a_caller_waiting() -> None:
    """A send that answers the wrong number of items fails its callers; a send that is
    cancelled cancels them: no caller waits forever."""

    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results

    gate = asyncio.Event()

    async def stuck(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    stuck_batcher: Batcher[int, int] = Batcher(stuck)
    call = asyncio.ensure_future(stuck_batcher.submit(1))
    await asyncio.sleep(0.01)
    flusher = stuck_batcher._flusher
    assert flusher is not None
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, timeout=5)


async def test_an_idle_worker_takes_a_new_job_in_the_call_that_waits_for_it(
    client: JobScheduler, redis_client: Any
) -> None:
    """wait_and_take returns a job enqueued while it waits, leased, in the same call; without
    a job it returns nothing after its timeout."""
    queue = client.broker.queue
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await queue.wait_and_take(0.2, "w:1", 5, 30_000) == ([], None)
    assert loop.time() - started >= 0.15  # it did wait
    await redis_client.delete(queue.keys.marker)

    waiting = asyncio.ensure_future(queue.wait_and_take(5, "w:2", 5, 30_000))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await queue.enqueue("j1", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
    deliveries, _ = await asyncio.wait_for(waiting, timeout=2)
    assert [(d.job_id, d.message, d.token) for d in deliveries] == [("j1", b"{}", "w:2")]
    assert await queue.counts() == {"waiting": 0, "delayed": 0, "active": 1}
    assert await redis_client.hget(queue.keys.job("j1"), "token") == b"w:2"


async def test_waiting_take_survives_a_redis_that_forgot_its_scripts() -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the waiting take loads its script again
    (on a Redis of the test's own: the shared server's script cache is left alone)."""
    server = PrivateRedis()
    server.start()
    redis = aioredis.Redis.from_url(server.url)
    try:
        queue = RedisQueue(redis, "drm-test", "q")
        await queue.enqueue("j2", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
        await redis.script_flush()
        deliveries, _ = await queue.wait_and_take(1, "w:3", 5, 30_000)
        assert [d.job_id for d in deliveries] == ["j2"]
    finally:
        await redis.aclose()
        server.cleanup()


async def test_jobs_are_leased_while_acknowledgements_are_in_flight(
    client: JobScheduler, start_worker: Any, db: asyncpg.Pool, tenant: str
) -> None:
    """A job whose handler has finished no longer takes a slot while its acknowledgement is on
    its way: with WORKER_CONCURRENCY=2 and acknowledgements held up for 0.5 s, the next jobs
    start meanwhile; at most 2 handlers still run at once."""
    jobs = _Concurrency(0.01)
    await jobs.setup(client)
    for i in range(6):
        await client.add_job("testp", "w", i, tenant_id=tenant)
    handle = await start_worker(jobs.setup, worker_concurrency=2, take_batch=2)
    broker = handle.broker
    send = broker._finish_batch
    acked: list[float] = []

    async def slow_finish(batch: list[Settlement]) -> list[int]:
        await asyncio.sleep(0.5)
        acked.append(asyncio.get_running_loop().time())
        return await send(batch)

    broker._acks._send = slow_finish  # type: ignore[method-assign]
    await wait_for(lambda: db.fetchval("SELECT count(*) = 6 FROM jobs"), timeout=30)
    assert len(jobs.starts) == 6
    assert jobs.peak <= 2
    # jobs 3-6 started before the first acknowledgement came back
    assert sorted(jobs.starts)[5] < min(acked)


async def test_a_take_that_comes_back_short_clears_the_wake_up_markers(
    client: JobScheduler, redis_client: Any
) -> None:
    """A take that leased every job it could (fewer than asked for) deletes the markers, so the
    worker's next wait blocks until something new happens; a take that filled its batch, and
    one limited by tenant windows it did not see to the end, keep them."""
    queue = client.broker.queue
    for i in range(3):
        await queue.enqueue(f"s{i}", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
    assert await redis_client.llen(queue.keys.marker) == 3
    full, _ = await queue.take("w:f", 2, 30_000)
    assert len(full) == 2
    assert await redis_client.llen(queue.keys.marker) == 3  # more may be waiting
    short, _ = await queue.take("w:s", 5, 30_000)
    assert [d.job_id for d in short] == ["s2"]
    assert await redis_client.llen(queue.keys.marker) == 0
    # the next enqueue wakes a waiting worker again
    await queue.enqueue("s3", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
    deliveries, _ = await queue.wait_and_take(2, "w:n", 5, 30_000)
    assert [d.job_id for d in deliveries] == ["s3"]

    # with a running limit per tenant: a short take that saw every waiting job clears them
    for i in range(3):
        await queue.enqueue(
            f"t{i}", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={"tenant": "lim"}
        )
    limited, _ = await queue.take("w:l", 5, 30_000, tenant_limit=1)
    assert [d.job_id for d in limited] == ["t0"]
    assert await redis_client.llen(queue.keys.marker) == 0
    # the tenant's settled job pushes a marker: the next waiting job is not forgotten
    await queue.finish_many([Settlement(limited[0], "completed", "null", 0, None, now_ms())])
    deliveries, _ = await queue.wait_and_take(2, "w:m", 5, 30_000, tenant_limit=1)
    assert [d.job_id for d in deliveries] == ["t1"]


async def test_a_take_promotes_due_delayed_jobs_and_names_the_next_due_time(
    client: JobScheduler, redis_client: Any
) -> None:
    """take.lua reads the first delayed job: none due, nothing is promoted and its due time is
    the answer; due ones are promoted (and leased in the same call) and the answer is the next
    one's. A settle that wakes a worker keeps the marker list at its newest 1,000 entries."""
    queue = client.broker.queue
    await queue.enqueue("later", b"{}", priority=0, delay_ms=60_000, dedup_ttl_ms=0, fields={})
    due_at = int(await redis_client.zscore(queue.keys.delayed, "later"))
    deliveries, next_due = await queue.take("w:a", 5, 30_000)
    assert (deliveries, next_due) == ([], due_at)
    await queue.enqueue("soon", b"{}", priority=0, delay_ms=1, dedup_ttl_ms=0, fields={})
    await asyncio.sleep(0.01)
    deliveries, next_due = await queue.take("w:b", 5, 30_000)
    assert ([d.job_id for d in deliveries], next_due) == (["soon"], due_at)

    await queue.enqueue("next", b"{}", priority=0, delay_ms=0, dedup_ttl_ms=0, fields={})
    await redis_client.delete(queue.keys.marker)
    await redis_client.lpush(queue.keys.marker, *["0"] * 1000)
    await queue.finish_many([Settlement(deliveries[0], "completed", "null", 0, None, now_ms())])
    assert await redis_client.llen(queue.keys.marker) == 1000
    assert await redis_client.lindex(queue.keys.marker, 0) == b"1"  # "next" is waiting


async def test_a_worker_at_a_low_rate_asks_redis_once_per_job(
    client: JobScheduler, start_worker: Any, tenant: str
) -> None:
    """Jobs arriving one at a time: after a take that came back short the worker waits and
    takes in one call, instead of asking again first (one round trip per job, not two)."""
    done: list[str] = []

    async def work(ctx: Any, job: Any) -> None:
        done.append(job.data)

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "w", work)

    await setup(client)
    handle = await start_worker(setup, worker_concurrency=4)
    queue = handle.broker.queue
    calls = {"take": 0, "wait_and_take": 0}
    take, wait_and_take = queue.take, queue.wait_and_take

    async def counted_take(*args: Any, **kwargs: Any) -> Any:
        calls["take"] += 1
        return await take(*args, **kwargs)

    async def counted_wait(*args: Any, **kwargs: Any) -> Any:
        calls["wait_and_take"] += 1
        return await wait_and_take(*args, **kwargs)

    queue.take = counted_take  # type: ignore[method-assign]
    queue.wait_and_take = counted_wait  # type: ignore[method-assign]
    await asyncio.sleep(1.2)  # the worker is in its idle wait (renewed at least once)
    calls.update(take=0, wait_and_take=0)
    for i in range(10):
        await client.add_job("testp", "w", f"j{i}", tenant_id=tenant)
        await wait_for(lambda i=i: len(done) == i + 1, timeout=10, interval=0.005)
    # The listener starts its next wait right after handing out a job, usually before the
    # handler has run; on a loaded machine the last one may start just after: wait for it.
    await wait_for(lambda: calls["wait_and_take"] >= 10, timeout=10, interval=0.005)
    # one waiting take per job (plus at most one renewal of the 1 s wait); no extra takes
    assert calls["take"] == 0, calls
    assert calls["wait_and_take"] <= 12, calls


async def test_a_standby_writer_takes_over_a_gone_writers_entries_at_once(
    client: JobScheduler,
    db: asyncpg.Pool,
    redis_client: Any,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dedicated writer that read entries and died (its announcement expired) leaves them
    pending: the worker's writer that takes over claims them at once and writes them (not after
    claim_idle_ms); the same entries written again by a writer that was only slow change
    nothing."""
    monkeypatch.setattr(RunLedger, "CHECK_EVERY_S", 0.0)
    queue = client.broker.queue
    dedicated = RunLedger(queue, db, consumer="sched-1", dedicated=True)
    worker = RunLedger(queue, db, consumer="worker-1", claim_idle_ms=600_000)
    await dedicated.ensure_group()
    await dedicated.standing_by()  # announced
    assert await worker.standing_by()
    now = now_ms()
    entries = [ledger_entry(f"gone-{i}", tenant=tenant, at_ms=now) for i in range(3)]
    for entry in entries:
        await redis_client.xadd(queue.keys.ledger, {"e": entry})
    assert len(await dedicated._read(">", None)) == 3  # read, then the writer is SIGKILLed
    await redis_client.pexpire(queue.keys.ledger_writer, 1)
    await asyncio.sleep(0.05)

    with capture_logs() as logs:
        assert not await worker.standing_by()  # takes over
        assert await worker.flush_once() == 3
    claimed = [e for e in logs if e["event"] == "ledger_entries_claimed"]
    assert [(e["count"], e["from_consumer"]) for e in claimed] == [(3, "sched-1")]
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 3
    assert await redis_client.xlen(queue.keys.ledger) == 0

    # the same attempts written again (a writer that was only slow) add no row
    async with db.acquire() as conn:
        await write_entries(
            conn,
            queue.keys.queue,
            [LedgerEntry.parse("1-1", entry) for entry in entries],
        )
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 3


async def test_a_workers_ledger_stands_by_while_a_dedicated_writer_is_announced(
    client: JobScheduler, db: asyncpg.Pool, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standby decision: a dedicated writer announces itself (with an expiry) when it looks;
    a worker's writer stands by while the announcement exists, writes again once it is retired
    or expired, and never reads the stream meanwhile."""
    monkeypatch.setattr(RunLedger, "CHECK_EVERY_S", 0.0)
    queue = client.broker.queue
    dedicated = RunLedger(queue, db, consumer="sched-1", dedicated=True)
    worker = RunLedger(queue, db, consumer="worker-1")
    assert not await worker.standing_by()
    assert not await dedicated.standing_by()
    assert await redis_client.get(queue.keys.ledger_writer) == b"sched-1"
    ttl = await redis_client.pttl(queue.keys.ledger_writer)
    assert 0 < ttl <= RunLedger.WRITER_TTL_MS
    assert await worker.standing_by()

    await dedicated.ensure_group()
    stop = asyncio.Event()
    running = asyncio.ensure_future(worker.run(stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(running, timeout=10)
    consumers = await redis_client.xinfo_consumers(queue.keys.ledger, "ledger")
    assert [c["name"] for c in consumers if c["name"] in ("worker-1", b"worker-1")] == []

    await dedicated._retire()
    assert await redis_client.get(queue.keys.ledger_writer) is None
    assert not await worker.standing_by()
    await dedicated.standing_by()
    await redis_client.pexpire(queue.keys.ledger_writer, 1)  # a killed writer's announcement
    await asyncio.sleep(0.05)
    assert not await worker.standing_by()
