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
    BIN_DIR,
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

# The fill script runs the project's own enqueue.lua (its source, wrapped as a function) once per
# job, with the keys and arguments that a real ``kiq`` produced for a template job (captured
# once), the template's job id replaced by each new id. So the fill follows the real layout.
_DRM_FILL_LOOP = """
local prefix, first, last = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local nk, na = tonumber(ARGV[4]), tonumber(ARGV[5])
local created = 0
for i = first, last do
  local id = prefix .. i
  local keys, args = {}, {}
  local p = 6
  for j = 1, nk + na do
    local v = ARGV[p + 1]
    if ARGV[p] == '1' then v = ARGV[p + 1] .. id .. ARGV[p + 2] end
    if j <= nk then keys[j] = v else args[j - nk] = v end
    p = p + 3
  end
  local r = __enqueue(keys, args)
  if tonumber(r[1]) == 1 then created = created + 1 end
end
return created
"""


def _fill_script(source: str | bytes) -> str:
    """``source``: the enqueue script exactly as ``RedisQueue`` registers it."""
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    return f"local function __enqueue(KEYS, ARGV)\n{source}\nend\n{_DRM_FILL_LOOP}"


_DRM_UNLINK = """
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = first, last do redis.call('UNLINK', ARGV[1] .. ARGV[2] .. i) end
return 1
"""

_PLAIN_FILL = """
for i = 1, tonumber(ARGV[2]) do redis.call('LPUSH', KEYS[1], ARGV[1]) end
return 1
"""


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

    def start_workers(
        self, queue: str, workers: int, tag: str, *, extra: dict[str, str] | None = None
    ) -> ProcGroup:
        """``workers`` worker processes on ``queue``; ``extra``: more environment for them."""
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

        await wait_until(ready, within=90, what=f"{group.name} ready", procs=[group])
        await self.redis.delete(key)

    async def warmup(
        self, queue: str, group: ProcGroup, count: int = 300, id_prefix: str = "w"
    ) -> None:
        """Run ``count`` jobs and a marker through the started workers, then wait until idle."""
        key = f"{self.namespace}:warm:{queue}"
        await self.fill(queue, count, id_prefix=id_prefix)
        await self.push_mark(queue, key)
        await self.wait_mark(key, group, within=90)
        await self.wait_idle(queue, group)

    async def wait_mark(self, key: str, group: ProcGroup, within: float) -> float:
        """Block until the marker job ran; returns the time it ran (epoch seconds)."""
        deadline = time.monotonic() + within
        while True:
            got = await self.redis.blpop([key], timeout=1)
            if got is not None:
                return float(got[1])
            if not group.alive():
                raise RuntimeError(f"{group.name} exited:\n{group.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"marker {key} not seen within {within} s\n{group.tail()}")

    async def wait_idle(self, queue: str, group: ProcGroup, within: float = 60) -> None:
        async def idle() -> bool:
            return not any((await self.pending(queue)).values())

        await wait_until(idle, within=within, interval=0.02, what="queue idle", procs=[group])

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


# drm-taskiq's receiver, as the docs recommend (README, docs/operations.md)
RECEIVER = ("--receiver", "drm_taskiq.receiver:Receiver")


class DrmSystem(System):
    """drm-taskiq, all guarantees on, deployed as documented: ``taskiq worker
    drm_taskiq.broker:broker --receiver drm_taskiq.receiver:Receiver`` and ``taskiq scheduler
    drm_taskiq.scheduler:sched``."""

    name = "drm"
    label = "drm-taskiq"

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self._fill: Any = None  # registered in setup(), from the project's enqueue script
        self._unlink = self.redis.register_script(_DRM_UNLINK)
        # template name -> (keys, args) of enqueue.lua for job id PLACEHOLDER_ID, queue "tpl"
        self.templates: dict[str, tuple[list[str], list[str]]] = {}
        self.message = ""
        self.pool: Any = None
        self.with_scheduler = True
        self._writer_keys: dict[str, str] = {}  # worker group name -> its scheduler's key

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
            tenant_enqueue_rate=0,
        )

    def keys(self, queue: str) -> Any:
        from drm_taskiq.redis_queue import QueueKeys  # noqa: PLC0415

        return QueueKeys(self.namespace, queue)

    async def setup(self) -> None:
        """Migrate the bench schema, add the tenant, capture what a real enqueue sends."""
        from bench.drm_plugin import plugin  # noqa: PLC0415
        from drm_taskiq import store  # noqa: PLC0415
        from drm_taskiq.jobs import JobScheduler  # noqa: PLC0415
        from drm_taskiq.queue_broker import DrmBroker  # noqa: PLC0415

        settings = self.settings("tpl")
        await store.migrate(settings)
        self.pool = await store.create_pool(settings, max_size=2)
        await store.ensure_tenant(self.pool, TENANT, plugins={"bench": {}})
        client = JobScheduler(DrmBroker(settings, own_process=False), plugins=[plugin])
        await client.start()
        scripts = client.broker.queue._scripts  # the enqueue call is captured, not run
        real = scripts["enqueue"]
        self._fill = self.redis.register_script(_fill_script(real.script))
        captured: list[tuple[list[Any], list[Any]]] = []

        async def capture(keys: list[Any], args: list[Any], client: Any = None) -> Any:
            captured.append((list(keys), list(args)))
            return [1, b"waiting"]

        try:
            await client.load_plugins()
            scripts["enqueue"] = capture
            for name, job, data, labels in (
                ("noop", "noop", None, {}),
                ("backlog", "noop", None, {"priority": 10}),
                ("mark", "mark", {"k": PLACEHOLDER_KEY}, {}),
            ):
                task = client.broker.find_task(f"plugin:bench:{job}")
                assert task is not None
                captured.clear()
                kicker = task.kicker().with_task_id(PLACEHOLDER_ID).with_labels(**labels)
                await kicker.kiq(data, tenant_id=TENANT)
                keys, args = captured[-1]
                self.templates[name] = ([_text(k) for k in keys], [_text(a) for a in args])
        finally:
            scripts["enqueue"] = real
            await client.close()
        tpl = self.keys("tpl").base
        for name, (keys, args) in self.templates.items():
            # keys (and the key base the script takes as an argument) are the queue "tpl"'s:
            # make them queue-relative
            self.templates[name] = (
                [k.replace(tpl, "{QUEUEBASE}") for k in keys],
                ["{QUEUEBASE}" if a == tpl else a for a in args],
            )
        self.message = next(
            a for a in self.templates["noop"][1] if PLACEHOLDER_ID in a and a.startswith("{")
        )
        await self.clear("tpl")

    def start_workers(
        self,
        queue: str,
        workers: int,
        tag: str,
        *,
        extra: dict[str, str] | None = None,
        argv: tuple[str, ...] = (),
        with_scheduler: bool | None = None,
    ) -> ProcGroup:
        """``taskiq worker`` processes and, as deployed (unless ``with_scheduler`` is off), one
        ``taskiq scheduler``: the run ledger's dedicated writer (its CPU counts as the
        workers'). ``extra``: environment for both; ``argv``: more worker arguments."""
        extra = extra or {}
        env = drm_env(self.namespace, queue, BENCH_READY_KEY=self.ready_key(tag), **extra)
        group = taskiq_worker(
            f"drm-{tag}", "drm_taskiq.broker:broker", workers, env, *RECEIVER, *argv
        )
        if self.with_scheduler if with_scheduler is None else with_scheduler:
            command = [str(BIN_DIR / "taskiq"), "scheduler", "drm_taskiq.scheduler:sched"]
            env = drm_env(self.namespace, queue, **extra)
            group.companions.append(ProcGroup(f"drm-{tag}-scheduler", command, env))
            self._writer_keys[group.name] = self.keys(queue).ledger_writer
        return group

    async def wait_ready(self, group: ProcGroup, tag: str, workers: int) -> None:
        await super().wait_ready(group, tag, workers)
        writer_key = self._writer_keys.pop(group.name, None)
        if writer_key is not None:
            # the scheduler announced itself as the ledger's dedicated writer (whatever its
            # log level), so the workers' writers stand by from here on

            async def announced() -> bool:
                return bool(await self.redis.exists(writer_key))

            await wait_until(announced, within=90, what=f"{group.name}'s scheduler", procs=[group])
            await asyncio.sleep(1.1)  # a worker's writer looks every second (RunLedger)

    def client_env(self, queue: str) -> dict[str, str]:
        return drm_env(self.namespace, queue)

    async def _fill_range(
        self,
        queue: str,
        template: str,
        id_prefix: str,
        *,
        first: int,
        last: int,
        replace: dict[str, str] | None = None,
    ) -> int:
        keys, args = self.templates[template]
        base = self.keys(queue).base
        flat: list[Any] = []
        for index, raw in enumerate([*keys, *args]):
            value = (
                raw.replace("{QUEUEBASE}", base)
                if index < len(keys) or raw == "{QUEUEBASE}"
                else raw
            )
            for old, new in (replace or {}).items():
                value = value.replace(old, new)
            head, found, tail = value.partition(PLACEHOLDER_ID)
            flat.extend(("1", head, tail) if found else ("0", value, ""))
        created = await self._fill(
            keys=[], args=[id_prefix, first, last, len(keys), len(args), *flat]
        )
        return int(created)

    async def fill(self, queue: str, count: int, *, id_prefix: str, backlog: bool = False) -> None:
        template = "backlog" if backlog else "noop"
        for first in range(1, count + 1, CHUNK):
            last = min(first + CHUNK - 1, count)
            created = await self._fill_range(queue, template, id_prefix, first=first, last=last)
            if created != last - first + 1:
                raise RuntimeError(f"fill created {created} of {last - first + 1} jobs")

    async def push_mark(self, queue: str, key: str) -> None:
        await self._fill_range(
            queue, "mark", f"mark{time.time_ns()}-", first=1, last=1, replace={PLACEHOLDER_KEY: key}
        )

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


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


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

    def start_workers(
        self, queue: str, workers: int, tag: str, *, extra: dict[str, str] | None = None
    ) -> ProcGroup:
        """``extra``: more environment (``BENCH_PLAIN_ROWS``: a row per job, see plain_app)."""
        env = plain_env(self.list_name(queue), BENCH_READY_KEY=self.ready_key(tag), **(extra or {}))
        if env.get("BENCH_PLAIN_ROWS"):
            env.update(BENCH_DATABASE_URL=DATABASE_URL, BENCH_PLAIN_SCHEMA=self.namespace)
        return taskiq_worker(
            f"plain-{tag}", "bench.plain_app:broker", workers, env, "--log-level", "WARNING"
        )

    def client_env(self, queue: str) -> dict[str, str]:
        return plain_env(self.list_name(queue))

    async def fill(self, queue: str, count: int, *, id_prefix: str, backlog: bool = False) -> None:
        msg = self.templates["bench:noop"]
        for first in range(0, count, CHUNK):
            await self._fill(keys=[self.list_name(queue)], args=[msg, min(CHUNK, count - first)])

    async def push_mark(self, queue: str, key: str) -> None:
        msg = self.templates["bench:mark"].replace(PLACEHOLDER_KEY, key)
        await self.redis.lpush(self.list_name(queue), msg)

    async def pending(self, queue: str) -> dict[str, int]:
        return {"waiting": int(await self.redis.llen(self.list_name(queue)))}

    async def clear(self, queue: str, ranges: dict[str, int] | None = None) -> None:
        await self.redis.unlink(self.list_name(queue))


def message_size(system: System) -> int:
    if isinstance(system, DrmSystem):
        return len(system.message)
    assert isinstance(system, PlainSystem)
    return len(system.templates["bench:noop"])


def describe_templates(system: System) -> str:
    if isinstance(system, DrmSystem):
        return json.dumps(system.templates["noop"])
    assert isinstance(system, PlainSystem)
    return system.templates["bench:noop"]


async def settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)
