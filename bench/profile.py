"""py-spy profiles of drm-taskiq processes during a benchmark, and their summaries.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``), which
https://www.speedscope.app opens as they are. :func:`summarize` reports the functions with the
most samples on top of the stack (self) and anywhere in the stack (inclusive), and the share of
samples spent under a few areas of the code (logging, Redis client, taskiq receiver, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import BIN_DIR, RESULTS_DIR, say

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Areas of the code: a sample counts for an area when any frame of its stack matches (areas
# overlap: a nested area is also counted in the area around it).
AREAS: list[tuple[str, str]] = [
    # the worker, per message
    ("taskiq Receiver.callback: everything done per message", r"receiver\.py:Receiver\.callback"),
    ("  drm LifecycleMiddleware.pre_execute", r"lifecycle\.py:LifecycleMiddleware\.pre_execute"),
    ("  taskiq Receiver.run_task: calls the task", r"receiver\.py:Receiver\.run_task"),
    ("    anyio timeout scope (the timeout label)", r"^anyio/"),
    (
        "    drm run_plugin_job: Job, tenant config, context",
        r"drm_taskiq/jobs\.py:.*run_plugin_job",
    ),
    ("      drm create_plugin_context", r"drm_taskiq/context\.py:create_plugin_context"),
    ("  drm LifecycleMiddleware.post_execute", r"lifecycle\.py:LifecycleMiddleware\.post_execute"),
    ("  drm DrmBroker._ack: finish.lua", r"queue_broker\.py:DrmBroker\._ack"),
    ("drm DrmBroker.listen: take.lua, wake-ups", r"queue_broker\.py:DrmBroker\.listen"),
    ("plain ListQueueBroker.listen: BRPOP", r"redis_broker\.py:ListQueueBroker\.listen"),
    ("taskiq Receiver.prefetcher/runner", r"receiver\.py:Receiver\.(prefetcher|runner)$"),
    ("drm RunLedger: stream -> PostgreSQL -> settle", r"drm_taskiq/runlog\.py:RunLedger\.run"),
    (
        "drm lease renewal / stalled check",
        r"queue_broker\.py:DrmBroker\._(renew_leases|check_stalled)",
    ),
    # the producer
    ("taskiq AsyncKicker.kiq", r"taskiq/kicker\.py:AsyncKicker\.kiq"),
    ("  drm ValidationMiddleware.pre_send", r"validation\.py:ValidationMiddleware\.pre_send"),
    ("  drm DrmBroker.kick: enqueue.lua", r"queue_broker\.py:DrmBroker\.kick"),
    ("  drm LifecycleMiddleware.post_send", r"lifecycle\.py:LifecycleMiddleware\.post_send"),
    ("  plain ListQueueBroker.kick: LPUSH", r"redis_broker\.py:ListQueueBroker\.kick"),
    # the scheduler
    ("drm CronEngine.tick", r"drm_taskiq/cron\.py:CronEngine\.tick"),
    ("  drm CronEngine.load (re-read every DRM_SCHEDULE_POLL_S)", r"cron\.py:CronEngine\.load"),
    ("  drm CronEngine._fire (enqueue one slot)", r"cron\.py:CronEngine\._fire"),
    ("  croniter (slot arithmetic)", r"^croniter/"),
    # the run ledger
    ("drm RunLedger._read (XREADGROUP)", r"runlog\.py:RunLedger\._read"),
    ("drm write_entries (one transaction)", r"runlog\.py:write_entries$"),
    ("drm LedgerEntry.parse", r"runlog\.py:LedgerEntry\.parse"),
    ("drm settle (settle.lua)", r"redis_queue\.py:RedisQueue\.settle_ledger"),
    # across everything
    ("structlog (binding, contextvars, rendering)", r"^structlog/"),
    ("redis-py client code", r"^redis/"),
    ("asyncpg", r"^asyncpg/"),
    ("pydantic", r"^pydantic"),
    ("json", r"^json/"),
]


# A partition of the worker's samples (each sample counts once, for the first rule any frame of
# its stack matches): where each job's CPU goes, for the "what is shared with plain taskiq"
# arithmetic of docs/performance.md. Samples matching none are taskiq's receiver and asyncio.
PARTS: list[tuple[str, str]] = [
    ("run ledger (stream -> PostgreSQL rows -> settle)", r"drm_taskiq/runlog\.py:"),
    (
        "fetching jobs (plain: BRPOP per job; drm: take.lua, wake-ups)",
        r"redis_broker\.py:ListQueueBroker\.listen|queue_broker\.py:DrmBroker\.(listen|_take|_idle)"
        r"|redis_queue\.py:RedisQueue\.(take|wait_and_take)",
    ),
    (
        "acknowledgements (finish.lua, batched)",
        r"queue_broker\.py:(DrmBroker\._(ack|settle|finish|release)|Batcher\.)",
    ),
    ("lease renewal, stalled check", r"queue_broker\.py:DrmBroker\._(renew_leases|check_stalled)"),
    (
        "drm per job: lifecycle middleware, log lines, run_plugin_job, job context",
        r"drm_taskiq/(middlewares/|jobs\.py|context\.py|logs\.py)|^structlog/",
    ),
    ("redis-py / asyncpg elsewhere", r"^(redis|asyncpg)/"),
]


def partition(path: Path, cpu_us_per_job: float | None = None) -> list[dict[str, Any]]:
    """Each sample of a collapsed-stack profile in exactly one of :data:`PARTS` (or "taskiq
    receiver, asyncio and the rest"), as shares and, with ``cpu_us_per_job``, us per job."""
    rules = [(name, re.compile(rx)) for name, rx in PARTS]
    rest = "taskiq receiver, asyncio and the rest"
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        keys = [
            f"{file}:{func}" for func, file in map(_parse_frame, stack.split(";") if stack else [])
        ]
        count = int(count_text)
        total += count
        for name, rule in rules:
            if any(rule.search(k) for k in keys):
                counts[name] += count
                break
        else:
            counts[rest] += count
    out = []
    for name in [*(n for n, _ in PARTS), rest]:
        if counts[name]:
            item: dict[str, Any] = {"part": name, "pct": round(100 * counts[name] / total, 1)}
            if cpu_us_per_job:
                item["us_per_job"] = round(cpu_us_per_job * counts[name] / total)
            out.append(item)
    return out


def _parse_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match.group("file")
    for marker in ("site-packages/", "/src/", "lib/python3.11/", "/bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return match.group("func"), path


def _short(func: str, path: str) -> str:
    return f"{path}:{func}" if path else func


_COMPILED = [(area, re.compile(pattern)) for area, pattern in AREAS]
_FRAME_AREAS: dict[str, frozenset[str]] = {}


def _areas_of(frame: str) -> frozenset[str]:
    found = _FRAME_AREAS.get(frame)
    if found is None:
        found = frozenset(area for area, pattern in _COMPILED if pattern.search(frame))
        _FRAME_AREAS[frame] = found
    return found


def summarize(
    path: Path, top: int = 15, focus: str | None = None, cpu_us_per_job: float | None = None
) -> dict[str, Any]:
    """Top frames of a collapsed-stack profile; with ``focus`` (a regex on "file:function"),
    only the samples whose stack holds a matching frame (e.g. the producer loop, not start-up).
    With ``cpu_us_per_job`` each area's share is also given in microseconds per job."""
    focus_re = re.compile(focus) if focus else None
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    area_counts: Counter[str] = Counter()
    total = 0
    complete = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse_frame(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        keys = [f"{file}:{func}" for func, file in frames]
        if focus_re is not None and not any(focus_re.search(k) for k in keys):
            continue
        total += count
        if frames[0][0] in ("<module>", "_run_module_as_main"):
            complete += count
        names = [_short(func, file) for func, file in frames]
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
        hit: set[str] = set()
        for key in set(keys):
            hit |= _areas_of(key)
        for area in hit:
            area_counts[area] += count

    def pct(value: int) -> float:
        return round(100 * value / total, 1) if total else 0.0

    areas = []
    for area, _ in AREAS:
        if area_counts[area]:
            item: dict[str, Any] = {"area": area, "pct": pct(area_counts[area])}
            if cpu_us_per_job:
                item["us_per_job"] = round(cpu_us_per_job * area_counts[area] / total)
            areas.append(item)
    return {
        "samples": total,
        # samples whose stack reaches the program's entry; the others were cut short by the
        # non-blocking sampler (their inner frames still count)
        "complete_stack_pct": pct(complete),
        "focus": focus,
        "cpu_us_per_job": cpu_us_per_job,
        "self_top": [{"frame": k, "pct": pct(v)} for k, v in self_counts.most_common(top)],
        "inclusive_top": [
            {"frame": k, "pct": pct(v)} for k, v in incl_counts.most_common(top + 10)
        ],
        "areas": areas,
        "partition": partition(path, cpu_us_per_job) if focus is None else [],
    }


class Recorder:
    """``py-spy record`` attached to running processes (one py-spy per pid)."""

    def __init__(self, name: str, rate: int = 200, *, nonblocking: bool = True) -> None:
        self.name = name
        self.rate = rate
        # --nonblocking: the target is not paused per sample. Blocking mode was seen to add
        # ~50% CPU per job to a drm-taskiq worker (and to over-weight code doing syscalls);
        # non-blocking samples cost nothing but ~half of them have truncated stacks.
        self.nonblocking = nonblocking
        self.procs: list[tuple[int, Path, subprocess.Popen[bytes]]] = []
        self.dir = RESULTS_DIR / "profiles"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, pid: int, out: Path) -> subprocess.Popen[bytes]:
        argv = [
            str(BIN_DIR / "py-spy"),
            "record",
            "-p",
            str(pid),
            "-r",
            str(self.rate),
            "-f",
            "raw",
            "-o",
            str(out),
        ]
        if self.nonblocking:
            argv.append("--nonblocking")
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def start(self, pids: list[int]) -> None:
        for index, pid in enumerate(pids):
            out = self.dir / f"{self.name}-{index}.txt"
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            proc = None
            for _ in range(5):  # py-spy sometimes fails to read the interpreter version at once
                proc = self._spawn(pid, out)
                await asyncio.sleep(0.4)
                if proc.poll() is None:
                    break
            if proc is not None and proc.poll() is None:
                self.procs.append((pid, out, proc))
            else:
                say(f"  py-spy could not attach to {pid}")

    async def stop(self) -> list[Path]:
        outs = []
        for _pid, _out, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        for _pid, out, proc in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
            if out.exists():
                outs.append(out)
        self.procs = []
        return outs


def merge(paths: list[Path], target: Path) -> Path:
    """One collapsed-stack file from several (worker processes of one run)."""
    counts: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text("utf-8", errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                counts[stack] += int(count)
    target.write_text("".join(f"{k} {v}\n" for k, v in counts.items()), "utf-8")
    return target
