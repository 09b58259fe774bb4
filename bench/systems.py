"""The two systems under test, behind one interface: start workers, fill a queue, read its state.

Both are filled with real messages: a template is captured once by enqueueing through the
system's own client (``kiq``), then copied N times by a Lua script (in chunks, so that Redis is
never blocked for long). For drm-taskiq the script writes exactly the job hash and wait-set entry
that ``enqueue.lua`` writes (same fields, same score); for plain taskiq it LPUSHes the message
as ``ListQueueBroker.kick`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import (
    DATABASE_URL,
    REDIS_URL,
    TENANT,
    ProcGroup,
    drm_env,
    plain_env,
    taskiq_worker,
    wait_until,
)

CHUNK = 20_000
PLACEHOLDER_ID = "BENCHJOBID0"
PLACEHOLDER_KEY = "BENCHMARKKEY0"

_DRM_FILL = """
local n = 0
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
local pri = tonumber(ARGV[6])
for i = first, last do
  local id = ARGV[2] .. i
  local seq = redis.call('INCR', KEYS[2]) % 4294967296
  redis.call('HSET', ARGV[1] .. id, 'seq', seq, 'ts', ARGV[5], 'attempts', 0, 'stalled', 0,
    'pri', pri, 'msg', ARGV[7] .. id .. ARGV[8], 'name', ARGV[9], 'plugin', ARGV[10],
    'job', ARGV[11], 'tenant', ARGV[12], 'state', 'waiting')
  redis.call('ZADD', KEYS[1], pri * 4294967296 + seq, id)
  n = n + 1
end
for m = 1, tonumber(ARGV[13]) do redis.call('LPUSH', KEYS[3], '1') end
redis.call('LTRIM', KEYS[3], 0, 999)
return n
"""

_DRM_UNLINK = """
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = first, last do redis.call('UNLINK', ARGV[1] .. ARGV[2] .. i) end
return 1
"""

_PLAIN_FILL = """
for i = 1, tonumber(ARGV[2]) do redis.call('LPUSH', KEYS[1], ARGV[1]) end
return 1
"""


def _split(message: str, needle: str) -> tuple[str, str]:
    head, found, tail = message.partition(needle)
    if not found or needle in tail:
        raise RuntimeError(f"template does not hold {needle!r} exactly once: {message[:200]}")
    return head, tail


class System:
    """What the benchmarks need from a system under test."""

    name = "?"
    label = "?"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.redis = aioredis.from_url(REDIS_URL)

    # --- to implement
    async def setup(self) -> None: ...
    async def close(self) -> None:
        await self.redis.aclose()

    def start_workers(self, queue: str, workers: int, tag: str) -> ProcGroup:
        raise NotImplementedError

    async def fill(self, queue: str, count: int, *, id_prefix: str, backlog: bool = False) -> None:
        raise NotImplementedError

    async def push_mark(self, queue: str, key: str) -> None:
        raise NotImplementedError

    async def pending(self, queue: str) -> dict[str, int]:
        """How much is left: waiting, active (taken, not settled), ledger (not yet in PG)."""
        raise NotImplementedError

    async def clear(self, queue: str, ranges: dict[str, int] | None = None) -> None:
        raise NotImplementedError

    def client_env(self, queue: str) -> dict[str, str]:
        raise NotImplementedError

    async def rows(self) -> int | None:
        """plugin_runs rows (drm only)."""
        return None

    # --- shared
    def ready_key(self, tag: str) -> str:
        return f"{self.namespace}:ready:{tag}"

    async def wait_ready(self, group: ProcGroup, tag: str, workers: int) -> None:
        key = self.ready_key(tag)

        async def ready() -> bool:
            return int(await self.redis.scard(key)) >= workers

        await wait_until(ready, timeout=90, what=f"{group.name} ready", procs=[group])
        await self.redis.delete(key)

    async def warmup(self, queue: str, group: ProcGroup, count: int = 300) -> None:
        """Run ``count`` jobs and a marker through the started workers, then wait until idle."""
        key = f"{self.namespace}:warm:{queue}"
        await self.fill(queue, count, id_prefix="w")
        await self.push_mark(queue, key)
        await self.wait_mark(key, group, timeout=90)
        await self.wait_idle(queue, group)

    async def wait_mark(self, key: str, group: ProcGroup, timeout: float) -> float:
        """Block until the marker job ran; returns the time it ran (epoch seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.redis.blpop([key], timeout=1)
            if got is not None:
                return float(got[1])
            if not group.alive():
                raise RuntimeError(f"{group.name} exited:\n{group.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"marker {key} not seen within {timeout} s\n{group.tail()}")

    async def wait_idle(self, queue: str, group: ProcGroup, timeout: float = 60) -> None:
        async def idle() -> bool:
            return not any((await self.pending(queue)).values())

        await wait_until(idle, timeout=timeout, interval=0.02, what="queue idle", procs=[group])

    @staticmethod
    def pause(pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

    @staticmethod
    def resume(pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    async def used_memory(self) -> int:
        info = await self.redis.info("memory")
        return int(info["used_memory"])


class DrmSystem(System):
    """drm-taskiq, all guarantees on: ``taskiq worker drm_taskiq.broker:broker``."""

    name = "drm"
    label = "drm-taskiq"

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self._fill = self.redis.register_script(_DRM_FILL)
        self._unlink = self.redis.register_script(_DRM_UNLINK)
        self.templates: dict[str, dict[str, str]] = {}
        self.pool: Any = None

    def settings(self, queue: str) -> Any:
        from drm_taskiq.settings import load_settings  # noqa: PLC0415

        return load_settings(
            redis_url=REDIS_URL,
            database_url=DATABASE_URL,
            db_schema=self.namespace,
            key_prefix=self.namespace,
            queue=queue,
            entry_points=False,
            allow_unsigned_plugins=True,
        )

    def keys(self, queue: str) -> Any:
        from drm_taskiq.redis_queue import QueueKeys  # noqa: PLC0415

        return QueueKeys(self.namespace, queue)

    async def setup(self) -> None:
        """Migrate the bench schema, add the tenant, capture message templates."""
        from drm_taskiq import store  # noqa: PLC0415
        from drm_taskiq.jobs import JobScheduler  # noqa: PLC0415
        from drm_taskiq.queue_broker import DrmBroker  # noqa: PLC0415

        from bench.drm_plugin import plugin  # noqa: PLC0415

        settings = self.settings("tpl")
        await store.migrate(settings)
        self.pool = await store.create_pool(settings, max_size=2)
        await store.ensure_tenant(self.pool, TENANT, plugins={"bench": {}})
        client = JobScheduler(DrmBroker(settings, own_process=False), plugins=[plugin])
        await client.start()
        try:
            await client.load_plugins()
            for job, data in (("noop", None), ("mark", {"k": PLACEHOLDER_KEY})):
                task = client.broker.find_task(f"plugin:bench:{job}")
                assert task is not None
                await task.kicker().with_task_id(PLACEHOLDER_ID).kiq(data, tenant_id=TENANT)
                raw = await self.redis.hgetall(client.broker.queue.keys.job(PLACEHOLDER_ID))
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                self.templates[job] = fields
                await self.clear("tpl")
        finally:
            await client.close()

    def start_workers(self, queue: str, workers: int, tag: str) -> ProcGroup:
        env = drm_env(self.namespace, queue, BENCH_READY_KEY=self.ready_key(tag))
        return taskiq_worker(f"drm-{tag}", "drm_taskiq.broker:broker", workers, env)

    def client_env(self, queue: str) -> dict[str, str]:
        return drm_env(self.namespace, queue)

    async def _fill_range(
        self, queue: str, template: dict[str, str], id_prefix: str, first: int, last: int,
        *, pri: int, msg: str, markers: int,
    ) -> None:
        k = self.keys(queue)
        head, tail = _split(msg, PLACEHOLDER_ID)
        await self._fill(
            keys=[k.wait, k.seq, k.marker],
            args=[
                k.job_prefix, id_prefix, first, last, int(time.time() * 1000), pri, head, tail,
                template["name"], template["plugin"], template["job"], template["tenant"],
                markers,
            ],
        )

    async def fill(self, queue: str, count: int, *, id_prefix: str, backlog: bool = False) -> None:
        template = self.templates["noop"]
        pri = 10 if backlog else 0
        for first in range(1, count + 1, CHUNK):
            last = min(first + CHUNK - 1, count)
            await self._fill_range(
                queue, template, id_prefix, first, last, pri=pri, msg=template["msg"],
                markers=8 if last == count else 0,
            )

    async def push_mark(self, queue: str, key: str) -> None:
        template = self.templates["mark"]
        msg = template["msg"].replace(PLACEHOLDER_KEY, key)
        await self._fill_range(queue, template, f"mark{time.time_ns()}-", 1, 1, pri=0, msg=msg,
                               markers=8)

    async def pending(self, queue: str) -> dict[str, int]:
        k = self.keys(queue)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(k.wait)
            pipe.zcard(k.active)
            pipe.xlen(k.ledger)
            waiting, active, ledger = await pipe.execute()
        return {"waiting": waiting, "active": active, "ledger": ledger}

    async def clear(self, queue: str, ranges: dict[str, int] | None = None) -> None:
        from bench.common import delete_keys  # noqa: PLC0415

        k = self.keys(queue)
        for id_prefix, count in (ranges or {}).items():
            for first in range(1, count + 1, CHUNK):
                await self._unlink(
                    keys=[k.wait],
                    args=[k.job_prefix, id_prefix, first, min(first + CHUNK - 1, count)],
                )
        await delete_keys(self.redis, f"{k.base}:*")

    async def rows(self) -> int | None:
        return int(await self.pool.fetchval("SELECT count(*) FROM plugin_runs"))

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        await super().close()


class PlainSystem(System):
    """Plain taskiq: ``taskiq worker bench.plain_app:broker``, ListQueueBroker, no logging."""

    name = "plain"
    label = "plain taskiq"

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self._fill = self.redis.register_script(_PLAIN_FILL)
        self.templates: dict[str, str] = {}

    def list_name(self, queue: str) -> str:
        return f"{self.namespace}:{queue}"

    async def setup(self) -> None:
        from taskiq.kicker import AsyncKicker  # noqa: PLC0415
        from taskiq_redis import ListQueueBroker  # noqa: PLC0415

        name = self.list_name("tpl")
        broker = ListQueueBroker(url=REDIS_URL, queue_name=name)
        await broker.startup()
        try:
            for task_name, args in (("bench:noop", ()), ("bench:mark", (PLACEHOLDER_KEY,))):
                await AsyncKicker(task_name, broker, {}).kiq(*args)
                raw = await self.redis.rpop(name)
                self.templates[task_name] = raw.decode()
        finally:
            await broker.shutdown()
        await self.redis.delete(name)

    def start_workers(self, queue: str, workers: int, tag: str) -> ProcGroup:
        env = plain_env(self.list_name(queue), BENCH_READY_KEY=self.ready_key(tag))
        return taskiq_worker(
            f"plain-{tag}", "bench.plain_app:broker", workers, env, "--log-level", "WARNING"
        )

    def client_env(self, queue: str) -> dict[str, str]:
        return plain_env(self.list_name(queue))

    async def fill(self, queue: str, count: int, *, id_prefix: str, backlog: bool = False) -> None:
        msg = self.templates["bench:noop"]
        for first in range(0, count, CHUNK):
            await self._fill(
                keys=[self.list_name(queue)], args=[msg, min(CHUNK, count - first)]
            )

    async def push_mark(self, queue: str, key: str) -> None:
        msg = self.templates["bench:mark"].replace(PLACEHOLDER_KEY, key)
        await self.redis.lpush(self.list_name(queue), msg)

    async def pending(self, queue: str) -> dict[str, int]:
        return {"waiting": int(await self.redis.llen(self.list_name(queue)))}

    async def clear(self, queue: str, ranges: dict[str, int] | None = None) -> None:
        await self.redis.unlink(self.list_name(queue))


def message_size(system: System) -> int:
    if isinstance(system, DrmSystem):
        return len(system.templates["noop"]["msg"])
    assert isinstance(system, PlainSystem)
    return len(system.templates["bench:noop"])


def describe_templates(system: System) -> str:
    if isinstance(system, DrmSystem):
        return json.dumps(system.templates["noop"])
    assert isinstance(system, PlainSystem)
    return system.templates["bench:noop"]


async def settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)
