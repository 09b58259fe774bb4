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

# Areas of the code: a sample counts for an area when any frame of its stack matches.
AREAS: list[tuple[str, str]] = [
    ("structlog logging (all log calls)", r"(^|;)structlog/"),
    ("drm LifecycleMiddleware", r"drm_taskiq/middlewares/lifecycle\.py"),
    ("drm ValidationMiddleware", r"drm_taskiq/middlewares/validation\.py"),
    ("drm DrmBroker.listen/_take", r"drm_taskiq/queue_broker\.py:(listen|_take)"),
    ("drm DrmBroker._ack (finish.lua)", r"drm_taskiq/queue_broker\.py:_ack"),
    ("drm DrmBroker.kick (enqueue.lua)", r"drm_taskiq/queue_broker\.py:kick"),
    ("drm run ledger (RunLedger)", r"drm_taskiq/runlog\.py"),
    ("drm handler wrapper (run_plugin_job)", r"drm_taskiq/jobs\.py:run_plugin_job"),
    ("plugin context (create_plugin_context)", r"drm_taskiq/context\.py"),
    ("drm cron engine", r"drm_taskiq/cron\.py"),
    ("croniter", r"(^|;)croniter/"),
    ("pydantic", r"pydantic"),
    ("redis-py client", r"(^|;)redis/"),
    ("asyncpg", r"(^|;)asyncpg/"),
    ("taskiq receiver (callback/run_task)", r"taskiq/receiver/"),
    ("taskiq kicker (kiq)", r"taskiq/kicker\.py"),
    ("taskiq dependencies", r"taskiq_dependencies/"),
    ("anyio (timeout scopes)", r"(^|;)anyio/"),
    ("json", r"(^|;)json/"),
    ("asyncio event loop", r"(^|;)asyncio/"),
]


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


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames of a collapsed-stack profile."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    area_counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse_frame(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        names = [_short(func, file) for func, file in frames]
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
        joined = ";".join(f"{file}:{func}" for func, file in frames)
        for area, pattern in AREAS:
            if re.search(pattern, joined):
                area_counts[area] += count

    def pct(value: int) -> float:
        return round(100 * value / total, 1) if total else 0.0

    return {
        "samples": total,
        "self_top": [{"frame": k, "pct": pct(v)} for k, v in self_counts.most_common(top)],
        "inclusive_top": [
            {"frame": k, "pct": pct(v)} for k, v in incl_counts.most_common(top + 10)
        ],
        "areas": [
            {"area": area, "pct": pct(area_counts[area])}
            for area, _ in AREAS
            if area_counts[area]
        ],
    }


class Recorder:
    """``py-spy record`` attached to running processes (one py-spy per pid)."""

    def __init__(self, name: str, rate: int = 200) -> None:
        self.name = name
        self.rate = rate
        self.procs: list[tuple[int, Path, subprocess.Popen[bytes]]] = []
        self.dir = RESULTS_DIR / "profiles"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, pid: int, out: Path) -> subprocess.Popen[bytes]:
        argv = [
            str(BIN_DIR / "py-spy"), "record", "-p", str(pid), "-r", str(self.rate),
            "-f", "raw", "-o", str(out),
        ]
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
        for _pid, out, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        for _pid, out, proc in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:
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
