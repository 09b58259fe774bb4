"""Shared pieces of the benchmark suite: servers, namespaces, processes, CPU and memory probes.

Everything the suite creates lives under one namespace ``bench_<hex>``: a PostgreSQL schema of
that name and Redis keys starting with ``{bench_<hex>:`` (drm-taskiq) or ``bench_<hex>:`` (plain
taskiq), in Redis database 15 (``BENCH_REDIS_URL``). :func:`cleanup_namespace` removes both;
nothing else on the shared servers is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
BIN_DIR = Path(sys.executable).parent

# Database 15: the suite's keys (up to a million jobs) stay out of the way of other users of a
# shared server (their SCANs would walk them); they also carry the bench_<hex> prefix.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

TENANT = "acme"
PLUGIN_ID = "bench"
SCHEDULES_PER_TENANT = 100  # DRM_MAX_SCHEDULES_PER_TENANT's default
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# Variables of the developer's shell that would leak into the processes under test.
_OWN_NAMES = ("REDIS_URL", "DATABASE_URL", "WORKER_CONCURRENCY", "PYTHONPATH")


def new_namespace() -> str:
    return f"bench_{uuid.uuid4().hex[:10]}"


def log_dir() -> Path:
    path = RESULTS_DIR / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def say(text: str) -> None:
    """Progress, on stderr (stdout carries the table)."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- environments
def base_env(**extra: Any) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DRM_", "BENCH_")) and key not in _OWN_NAMES
    }
    env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    # the servers this run uses (the clients read them from there too), and the breakdown switch
    env.update(BENCH_REDIS_URL=REDIS_URL, BENCH_DATABASE_URL=DATABASE_URL)
    if os.environ.get("BENCH_LAT_BREAKDOWN"):
        env["BENCH_LAT_BREAKDOWN"] = os.environ["BENCH_LAT_BREAKDOWN"]
    env.update({key: str(value) for key, value in extra.items()})
    return env


def drm_env(namespace: str, queue: str, **extra: Any) -> dict[str, str]:
    """The environment of a drm-taskiq worker or scheduler process: all defaults (leases,
    acknowledgements, priorities, retry/timeout handling, results and one ``plugin_runs`` row
    per attempt in PostgreSQL, JSON logs at INFO) except where the namespace must go."""
    return base_env(
        REDIS_URL=REDIS_URL,
        DATABASE_URL=DATABASE_URL,
        DRM_DB_SCHEMA=namespace,
        DRM_KEY_PREFIX=namespace,
        DRM_QUEUE=queue,
        DRM_PLUGINS="bench.drm_plugin:plugin",
        DRM_ENTRY_POINTS="false",
        # The bench plugin is not signed (signature checks run once, at start-up).
        DRM_ALLOW_UNSIGNED_PLUGINS="true",
        # No per-tenant enqueue rate limit (the default): the producers enqueue for one tenant.
        DRM_TENANT_ENQUEUE_RATE="0",
        DRM_LOG_FORMAT="json",
        **extra,
    )


def plain_env(queue: str, **extra: Any) -> dict[str, str]:
    return base_env(BENCH_REDIS_URL=REDIS_URL, BENCH_PLAIN_QUEUE=queue, **extra)


# --------------------------------------------------------------------------- /proc probes
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    head, _, rest = raw.rpartition(")")
    return [head.split(" (", 1)[0], head.split(" (", 1)[-1], *rest.split()]


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and int(stat[3]) == pid:
                found.append(int(entry))
    return sorted(found)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of the given processes (seconds)."""
    total = 0
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            total += int(stat[13]) + int(stat[14])
    return total / CLK_TCK


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            out[pid] = (int(stat[13]) + int(stat[14])) / CLK_TCK
    return out


def cpu_delta(start: dict[int, float], end: dict[int, float]) -> float:
    """CPU used between two snapshots by the processes alive at the end (those that exited in
    between are not counted; those that started in between count in full)."""
    return sum(value - start.get(pid, 0.0) for pid, value in end.items())


def postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == "postgres":
                pids.append(int(entry))
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class CpuProbe:
    """CPU used by a set of processes, by Redis, by PostgreSQL and by the machine over a window."""

    redis_cpu: Callable[[], Awaitable[float]]
    pids: Callable[[], list[int]]
    _start: dict[str, float] = field(default_factory=dict)

    _pg: dict[int, float] = field(default_factory=dict)

    async def _sample(self) -> dict[str, float]:
        busy, total = machine_busy()
        return {
            "procs": cpu_seconds(self.pids()),
            "redis": await self.redis_cpu(),
            "machine_busy": busy / CLK_TCK,
            "machine_total": total / CLK_TCK,
            "wall": time.monotonic(),
        }

    async def start(self) -> None:
        self._start = await self._sample()
        self._pg = cpu_by_pid(postgres_pids())

    async def stop(self, jobs: int) -> dict[str, float]:
        end = await self._sample()
        d = {key: end[key] - self._start[key] for key in end}
        d["postgres"] = cpu_delta(self._pg, cpu_by_pid(postgres_pids()))
        jobs = max(jobs, 1)
        cores = os.cpu_count() or 1
        return {
            "worker_cpu_us_per_job": round(d["procs"] / jobs * 1e6, 1),
            "redis_cpu_us_per_job": round(d["redis"] / jobs * 1e6, 1),
            "postgres_cpu_us_per_job": round(d["postgres"] / jobs * 1e6, 1),
            "machine_cpu_us_per_job": round(d["machine_busy"] / jobs * 1e6, 1),
            "machine_busy_pct": round(100 * d["machine_busy"] / max(d["wall"] * cores, 1e-9), 1),
        }


# The top-level commands each system sends (a script's inner commands are timed in EVALSHA).
OWN_COMMANDS = {
    "drm": ("evalsha", "xreadgroup", "xautoclaim", "blpop"),
    "plain": ("brpop", "lpush", "rpush"),
}


def own_usec(rows: list[dict[str, Any]], system: str) -> float:
    """Redis time per job of the commands ``system`` sends itself (``command_costs`` rows)."""
    return round(sum(r["usec_per_job"] for r in rows if r["command"] in OWN_COMMANDS[system]), 1)


def command_costs(
    before: dict[str, Any], after: dict[str, Any], jobs: int, top: int = 40
) -> list[dict[str, Any]]:
    """Redis time per command during the window (INFO commandstats; the server is shared, so
    other clients' commands may show up too)."""
    rows = []
    for name, stat in after.items():
        old = before.get(name, {"calls": 0, "usec": 0})
        calls = int(stat["calls"]) - int(old["calls"])
        usec = int(stat["usec"]) - int(old["usec"])
        if calls > 0:
            rows.append(
                {
                    "command": name.removeprefix("cmdstat_"),
                    "calls_per_job": round(calls / max(jobs, 1), 3),
                    "usec_per_call": round(usec / calls, 2),
                    "usec_per_job": round(usec / max(jobs, 1), 1),
                }
            )
    rows.sort(key=lambda r: -r["usec_per_job"])
    return rows[:top]


async def redis_cpu_seconds(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --------------------------------------------------------------------------- processes
class ProcGroup:
    """A started command (its own process group) with stdout/stderr in log files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        # Processes of the same deployment started with this group (drm-taskiq's scheduler):
        # counted in pids() (CPU), stopped with it; not paused, not in worker_pids().
        self.companions: list[ProcGroup] = []
        self.log_path = log_dir() / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None and all(c.alive() for c in self.companions)

    def pids(self) -> list[int]:
        """The main process and its children (taskiq's worker processes), and companions'."""
        return [self.pid, *children(self.pid), *(p for c in self.companions for p in c.pids())]

    def worker_pids(self) -> list[int]:
        kids = children(self.pid)
        return kids or [self.pid]

    def rss(self) -> dict[str, float | None]:
        return {str(pid): rss_mb(pid) for pid in self.worker_pids()}

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for raw in self.log_path.read_text("utf-8", errors="replace").splitlines():
            if not raw.startswith("{"):
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text("utf-8", errors="replace").splitlines()
        return "\n".join([*text[-lines:], *(c.tail(lines) for c in self.companions)])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL the whole group after ``timeout``."""
        for companion in self.companions:
            companion.stop(timeout)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        for companion in self.companions:
            companion.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._log.close()


def taskiq_worker(name: str, app: str, workers: int, env: dict[str, str], *extra: str) -> ProcGroup:
    argv = [str(BIN_DIR / "taskiq"), "worker", app, "--workers", str(workers), *extra]
    return ProcGroup(name, argv, env)


async def wait_until(
    predicate: Callable[[], Any],
    *,
    within: float,
    interval: float = 0.05,
    what: str = "condition",
    procs: Iterable[ProcGroup] = (),
) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
            raise TimeoutError(f"{what} not met within {within} s\n{tails}")
        await asyncio.sleep(interval)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-pct * len(ordered) // 100)))  # ceil(pct/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


# --------------------------------------------------------------------------- cleanup
async def delete_keys(redis: Any, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, never KEYS or FLUSH*)."""
    deleted = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            deleted += await redis.unlink(*batch)
            batch = []
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


async def cleanup_namespace(namespace: str) -> None:
    import asyncpg  # noqa: PLC0415
    import redis.asyncio as aioredis  # noqa: PLC0415

    redis = aioredis.from_url(REDIS_URL)
    try:
        await delete_keys(redis, f"{{{namespace}:*")
        await delete_keys(redis, f"{namespace}:*")
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    finally:
        await conn.close()
