"""The benchmark suite: drm-taskiq against plain taskiq, measured in the same run.

``python -m bench [--quick] [--phases a,b,...]`` (``bench/run`` sets up the environment first).
Prints one table on stdout, progress on stderr, and writes ``bench/results/latest.json`` (plus
a timestamped copy and ``latest.md``, the table with the machine facts).

Phases, in order: enqueue, drain, latency, scale, cron, ledger, profile, whatif (ledger, profile
and whatif may run earlier, while the cron phase waits for a minute boundary).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    BIN_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    cleanup_namespace,
    log_dir,
    machine_busy,
    new_namespace,
    percentile,
    say,
)
from bench.report import render_markdown, render_table, targets
from bench.systems import DrmSystem, PlainSystem, System

PHASES = ("enqueue", "drain", "latency", "scale", "cron", "ledger", "profile", "whatif")
# run only when named in --phases (not part of the full suite's 10 minutes)
OPTIONAL_PHASES = ("latency_rows",)


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "enqueue_jobs": 2000,
            "enqueue_rounds": 1,
            "producers": [1, 32],
            "drain_jobs": 3000,
            "drain_workers": [1, 2],
            "drain_rounds": 1,
            "latency_rate": 200,
            "latency_s": 3,
            "latency_rounds": 1,
            "scale_jobs": 3000,
            "scale_backlogs": [1000, 100_000],
            "scale_workers": 2,
            "ledger_rows": 3000,
            "ledger_batches": [20, 500],
            "cron": [{"schedules": 1000, "cron": "*/5 * * * * *", "timeout": 4.5}],
            "profile_jobs": 3000,
            "whatif_jobs": 3000,
        }
    return {
        "enqueue_jobs": 5000,
        "enqueue_rounds": 3,
        "producers": [1, 32],
        "drain_jobs": 10_000,
        "drain_workers": [1, 2, 4],
        "drain_rounds": 3,  # this VM's rounds vary by +-15%: best of 3 per system
        "latency_rate": 200,
        "latency_s": 10,
        "latency_rounds": 5,  # a round's p99 moves with the minute on this VM: median of 5
        "scale_jobs": 6000,
        "scale_backlogs": [1000, 100_000, 1_000_000],
        "scale_workers": 2,
        "ledger_rows": 10_000,
        "ledger_batches": [20, 100, 500, 2000],
        "cron": [
            {"schedules": 1000, "cron": "*/10 * * * * *", "timeout": 9.5},
            {"schedules": 10_000, "cron": "* * * * *", "timeout": 55, "profile": True},
        ],
        "profile_jobs": 6000,
        "whatif_jobs": 6000,
    }


# --------------------------------------------------------------------------- machine facts
def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_and_memory() -> tuple[str, int]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return cpu_model, mem_kb


async def machine_facts(system: System) -> dict[str, Any]:
    cpu_model, mem_kb = _cpu_and_memory()
    info = await system.redis.info("server")
    from importlib.metadata import version  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415

    from bench.common import DATABASE_URL  # noqa: PLC0415

    conn = await asyncpg.connect(DATABASE_URL)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    packages = {}
    for name in (
        "taskiq",
        "taskiq-redis",
        "redis",
        "asyncpg",
        "structlog",
        "croniter",
        "uvloop",
        "hiredis",
    ):
        try:
            packages[name] = version(name)
        except Exception:
            packages[name] = None
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": info.get("redis_version"),
        "postgresql": pg_version,
        "packages": packages,
        "git_commit": commit,
        "src_modified": bool(dirty),
    }


def background_busy_pct(seconds: float = 2.0) -> float:
    """How busy the machine is before we start (other users of the shared machine)."""
    b0, t0 = machine_busy()
    time.sleep(seconds)
    b1, t1 = machine_busy()
    return round(100 * (b1 - b0) / max(t1 - t0, 1), 1)


# --------------------------------------------------------------------------- phases
async def phase_enqueue(cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem) -> dict[str, Any]:
    """``enqueue_rounds`` rounds, the systems interleaved; the best round is reported."""
    from bench.producers import run_enqueue  # noqa: PLC0415

    rounds: dict[str, list[dict[str, Any]]] = {"plain": [], "drm": []}
    for _ in range(cfg["enqueue_rounds"]):
        for system in (plain, drm):
            rounds[system.name].append(
                await run_enqueue(system, cfg["enqueue_jobs"], cfg["producers"])
            )
    out: dict[str, Any] = {}
    for name, runs in rounds.items():
        out[name] = {}
        for producers in map(str, cfg["producers"]):
            best = max((run[producers] for run in runs), key=lambda r: r["rate"])
            out[name][producers] = {
                **best,
                "rates_all_rounds": [run[producers]["rate"] for run in runs],
            }
    return out


async def phase_drain(cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem) -> dict[str, Any]:
    """Each configuration ``drain_rounds`` times, the systems interleaved; the best round of
    each system is reported (the one least disturbed by other work on the machine)."""
    from bench.drain import run_drain  # noqa: PLC0415

    out: dict[str, Any] = {"plain": {}, "drm": {}}
    for workers in cfg["drain_workers"]:
        rounds = cfg["drain_rounds"] if workers in (1, 2) else 1
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "drm": []}
        for _ in range(rounds):
            for system in (plain, drm):
                runs[system.name].append(
                    await run_drain(
                        system, workers=workers, n=cfg["drain_jobs"], tag=f"drain{workers}"
                    )
                )
        for name, results in runs.items():
            best = max(results, key=lambda r: r["rate"])
            out[name][str(workers)] = {**best, "rates_all_rounds": [r["rate"] for r in results]}
    return out


async def wait_for_quiet(limit_s: float = 30.0, busy_pct: float = 5.0) -> dict[str, float]:
    """Wait up to ``limit_s`` for the machine to be under ``busy_pct`` busy over 2 s: work the
    previous phase left behind (PostgreSQL's autovacuum and checkpoint after the drains wrote
    tens of thousands of rows) would otherwise land in the first latency rounds. Returns how
    long it waited and the last reading."""
    started = time.time()
    busy = await asyncio.to_thread(background_busy_pct, 2.0)
    while busy > busy_pct and time.time() - started < limit_s:
        busy = await asyncio.to_thread(background_busy_pct, 2.0)
    waited = round(time.time() - started, 1)
    say(f"the machine is {busy}% busy after {waited} s (waited for under {busy_pct:g}%)")
    return {"waited_s": waited, "busy_pct": busy}


async def phase_latency(cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem) -> dict[str, Any]:
    """``latency_rounds`` rounds per system, interleaved, once the machine is quiet; each
    system's round with the median p99 is reported (a single 10 s round's p99 moves with other
    work on the machine), with the p50/p99 of every round and the p99 of all rounds' jobs
    together."""
    from bench.producers import run_latency  # noqa: PLC0415

    quiet = await wait_for_quiet()
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "drm": []}
    for _ in range(cfg.get("latency_rounds", 1)):
        for system in (plain, drm):
            runs[system.name].append(
                await run_latency(system, cfg["latency_rate"], cfg["latency_s"])
            )
    return {**_latency_summary(runs), "quiet_before": quiet}


def _latency_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per system: the round with the median p99, every round's p50 and p99, and the p99 of
    all rounds' jobs together."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        pooled = [x for r in results for x in r.pop("samples_ms")]
        ordered = sorted(results, key=lambda r: r["p99_ms"])
        out[name] = {
            **ordered[len(ordered) // 2],
            "p50_all_rounds": [r["p50_ms"] for r in results],
            "p99_all_rounds": [r["p99_ms"] for r in results],
            "p99_pooled_ms": round(percentile(pooled, 99), 3),
        }
    return out


_PLAIN_RUNS = """
CREATE TABLE IF NOT EXISTS plain_runs (LIKE plugin_runs INCLUDING DEFAULTS INCLUDING INDEXES);
ALTER TABLE plain_runs DROP CONSTRAINT IF EXISTS plain_runs_tenant;
ALTER TABLE plain_runs ADD CONSTRAINT plain_runs_tenant
  FOREIGN KEY (tenant_id) REFERENCES tenants(tenant_id) ON DELETE CASCADE;
"""


async def phase_latency_rows(
    cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem
) -> dict[str, Any]:
    """What a run ledger costs plain taskiq's latency on this machine: plain taskiq whose
    ``lat`` handler also writes a ``plugin_runs``-shaped row per job (one INSERT each, or
    buffered and copied every 200 ms), against drm-taskiq as deployed and plain taskiq without
    rows; ``latency_rounds`` rounds each, interleaved, reported as the latency phase is."""
    import asyncpg  # noqa: PLC0415

    from bench.common import DATABASE_URL  # noqa: PLC0415
    from bench.producers import run_latency  # noqa: PLC0415

    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": drm.namespace})
    await conn.execute(_PLAIN_RUNS)
    quiet = await wait_for_quiet()
    variants: dict[str, tuple[System, dict[str, str] | None]] = {
        "plain": (plain, None),
        "plain_insert": (plain, {"BENCH_PLAIN_ROWS": "insert"}),
        "plain_copy": (plain, {"BENCH_PLAIN_ROWS": "copy"}),
        "drm": (drm, None),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        for _ in range(cfg.get("latency_rounds", 1)):
            for name, (system, env) in variants.items():
                before = await conn.fetchval("SELECT count(*) FROM plain_runs")
                result = await run_latency(system, cfg["latency_rate"], cfg["latency_s"], env)
                if env:  # the rows were written (copy: but for the last 200 ms' buffer)
                    result["rows_written"] = (
                        await conn.fetchval("SELECT count(*) FROM plain_runs") - before
                    )
                runs[name].append(result)
    finally:
        await conn.close()
    return {**_latency_summary(runs), "quiet_before": quiet}


async def phase_scale(cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem) -> dict[str, Any]:
    from bench.drain import run_drain  # noqa: PLC0415

    out: dict[str, Any] = {"plain": {}, "drm": {}}
    for backlog in cfg["scale_backlogs"]:
        for system in (plain, drm):
            out[system.name][str(backlog)] = await run_drain(
                system,
                workers=cfg["scale_workers"],
                n=cfg["scale_jobs"],
                backlog=backlog,
                tag=f"scale{backlog}",
            )
    return out


async def phase_ledger(cfg: dict[str, Any], drm: DrmSystem) -> list[dict[str, Any]]:
    from bench.ledger_bench import run_ledger  # noqa: PLC0415

    return await run_ledger(
        drm, rows=cfg["ledger_rows"], batches=cfg["ledger_batches"], profile_batch=500
    )


async def phase_cron(
    cfg: dict[str, Any], drm: DrmSystem, fillers: list[Any]
) -> list[dict[str, Any]]:
    from bench.cron_bench import run_cron  # noqa: PLC0415

    results = []
    for spec in cfg["cron"]:
        if len(spec["cron"].split()) == 5:
            await _align_to_minute(spec["schedules"], fillers)
        results.append(
            await run_cron(
                drm,
                schedules=spec["schedules"],
                cron=spec["cron"],
                within=spec["timeout"],
                profile=spec.get("profile", False),
            )
        )
    return results


async def _align_to_minute(schedules: int, fillers: list[Any]) -> None:
    """Start a minute-cron run so that the schedulers' first pass ends shortly before a minute
    boundary: run filler phases while the wait is long, then sleep what is left."""
    startup_guess = 5 + 1.2 * schedules / 1000  # seconds: processes, then the first pass

    def slack() -> float:
        wait = 60 - (time.time() % 60) - startup_guess - 4
        return wait if wait >= 0 else wait + 60

    while fillers and slack() > 25:
        await fillers.pop(0)()
    wait = slack()
    if wait > 0:
        say(f"waiting {wait:.0f} s so that the cron slot comes right after the schedulers start")
        await asyncio.sleep(wait)


async def phase_profile(cfg: dict[str, Any], plain: PlainSystem, drm: DrmSystem) -> dict[str, Any]:
    """py-spy (non-blocking, 200 Hz) on a worker of each system during a 1-process drain, and on
    a producer of each system enqueueing (1 producer)."""
    from bench.drain import run_drain  # noqa: PLC0415
    from bench.profile import Recorder, merge, summarize  # noqa: PLC0415

    out: dict[str, Any] = {}
    for system in (drm, plain):
        recorder = Recorder(f"{system.name}-worker")
        paths: list[Path] = []

        async def on_start(group: Any, recorder: Recorder = recorder) -> None:
            await recorder.start(group.worker_pids())

        async def on_end(
            group: Any, recorder: Recorder = recorder, paths: list[Path] = paths
        ) -> None:
            paths.extend(await recorder.stop())

        drain = await run_drain(
            system,
            workers=1,
            n=cfg["profile_jobs"],
            tag="profile",
            on_start=on_start,
            on_end=on_end,
        )
        if paths:
            path = merge(paths, recorder.dir / f"{system.name}-worker.txt")
            cpu = drain["cpu"]["worker_cpu_us_per_job"]
            out[f"{system.name}-worker"] = {
                "file": str(path.relative_to(REPO_ROOT)),
                "drain_rate_under_profiler": drain["rate"],
                **summarize(path, cpu_us_per_job=cpu),
            }
    for system in (drm, plain):
        path = RESULTS_DIR / "profiles" / f"{system.name}-client.txt"
        spec = {
            "system": system.name,
            "mode": "enqueue",
            "namespace": system.namespace,
            "queue": "profile-enq",
            "n": cfg["enqueue_jobs"],
            "producers": [1],
        }
        log = (log_dir() / f"client-profile-{system.name}.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                str(BIN_DIR / "py-spy"),
                "record",
                "-r",
                "200",
                "--nonblocking",
                "-f",
                "raw",
                "-o",
                str(path),
                "--",
                sys.executable,
                "-m",
                "bench.client",
                json.dumps(spec),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=system.client_env("profile-enq"),
            )
            stdout, _ = await proc.communicate()
        finally:
            log.close()
            await system.clear("profile-enq")
        cpu = None
        lines = [x for x in stdout.decode().splitlines() if x.startswith("{")]  # not py-spy's
        if lines:
            cpu = json.loads(lines[-1])["1"]["client_cpu_us_per_job"]
        if path.exists():
            out[f"{system.name}-client"] = {
                "file": str(path.relative_to(REPO_ROOT)),
                **summarize(path, focus=r"bench/client\.py:.*producer", cpu_us_per_job=cpu),
            }
    return out


async def phase_whatif(cfg: dict[str, Any], drm: DrmSystem) -> dict[str, Any]:
    """drm-taskiq with one setting changed (no code change): evidence for where the per-job
    cost goes. "no per-job log lines" turns off job_enqueued / job_started / job_succeeded
    (DRM_LOG_LEVEL=WARNING) and taskiq's own per-task line (--log-level WARNING)."""
    from bench.drain import run_drain  # noqa: PLC0415
    from bench.producers import run_enqueue  # noqa: PLC0415

    out: dict[str, Any] = {}
    out["enqueue, no per-job log lines"] = await run_enqueue(
        drm, cfg["enqueue_jobs"], cfg["producers"], env={"DRM_LOG_LEVEL": "WARNING"}
    )
    variants: dict[str, tuple[dict[str, str], list[str], bool]] = {
        "defaults (reference)": ({}, [], True),
        "no per-job log lines": ({"DRM_LOG_LEVEL": "WARNING"}, ["--log-level", "WARNING"], True),
        "WORKER_CONCURRENCY=100": ({"WORKER_CONCURRENCY": "100"}, [], True),
        # taskiq's stock receiver (the later --receiver wins): what drm's receiver saves
        "taskiq's own receiver": ({}, ["--receiver", "taskiq.receiver:Receiver"], True),
        # no scheduler process: the run ledger is written by the worker itself
        "ledger in the worker (no scheduler)": ({}, [], False),
    }
    original = drm.start_workers
    for index, (label, (extra, argv, with_scheduler)) in enumerate(variants.items()):
        drm.start_workers = functools.partial(  # type: ignore[method-assign]
            original, extra=extra, argv=tuple(argv), with_scheduler=with_scheduler
        )
        try:
            out[label] = await run_drain(drm, workers=1, n=cfg["whatif_jobs"], tag=f"whatif{index}")
        finally:
            drm.start_workers = original  # type: ignore[method-assign]
    return out


def _quiet_logging() -> None:
    """drm-taskiq's structlog events of this process (the setup client) go to a log file, so
    that stdout carries the table only."""
    import logging  # noqa: PLC0415

    import structlog  # noqa: PLC0415

    stream = (log_dir() / "bench.log").open("a", encoding="utf-8")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=stream),
    )
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# --------------------------------------------------------------------------- main
async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small, fast subset")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases")
    parser.add_argument("--output", default=str(RESULTS_DIR / "latest.json"))
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (default: 20, quick: 0)",
    )
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES) - set(OPTIONAL_PHASES)
    if unknown:
        known = ", ".join(PHASES + OPTIONAL_PHASES)
        parser.error(f"unknown phases: {sorted(unknown)}; known: {known}")
    cfg = config(args.quick)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(log_dir(), ignore_errors=True)
    log_dir()

    _quiet_logging()
    started = time.time()
    namespace = new_namespace()
    say(f"namespace {namespace} (schema and key prefix; removed at the end)")
    busy = background_busy_pct()
    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 20)
    deadline = time.time() + wait_quiet
    while busy > 15 and time.time() < deadline:
        say(f"the machine is {busy}% busy (other work); waiting for it to calm down")
        busy = background_busy_pct(3)
    if busy > 15:
        say(f"warning: the machine is already {busy}% busy; results will be noisy")
    plain, drm = PlainSystem(namespace), DrmSystem(namespace)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "phases_run": phases,
        "config": cfg,
        "background_busy_pct_before": busy,
        "phases": {},
        "errors": {},
        "durations_s": {},
    }

    async def run_phase(name: str, coro: Any) -> None:
        t = time.time()
        try:
            results["phases"][name] = await coro
        except Exception as exc:
            say(f"phase {name} failed: {type(exc).__name__}: {exc}")
            results["errors"][name] = f"{type(exc).__name__}: {exc}"[:4000]
        results["durations_s"][name] = round(time.time() - t, 1)

    try:
        await plain.setup()
        await drm.setup()
        results["machine"] = await machine_facts(drm)
        todo = {
            "enqueue": lambda: run_phase("enqueue", phase_enqueue(cfg, plain, drm)),
            "drain": lambda: run_phase("drain", phase_drain(cfg, plain, drm)),
            "latency": lambda: run_phase("latency", phase_latency(cfg, plain, drm)),
            "latency_rows": lambda: run_phase("latency_rows", phase_latency_rows(cfg, plain, drm)),
            "scale": lambda: run_phase("scale", phase_scale(cfg, plain, drm)),
            "ledger": lambda: run_phase("ledger", phase_ledger(cfg, drm)),
            "profile": lambda: run_phase("profile", phase_profile(cfg, plain, drm)),
            "whatif": lambda: run_phase("whatif", phase_whatif(cfg, drm)),
        }
        # phases that may run while the cron phase waits for a minute boundary
        flexible = [p for p in ("ledger", "profile", "whatif") if p in phases]
        fillers = [todo[p] for p in flexible]
        for name in phases:
            if name == "cron":
                await run_phase("cron", phase_cron(cfg, drm, fillers))
            elif name in flexible:
                if todo[name] in fillers:
                    fillers.remove(todo[name])
                    await todo[name]()
            else:
                await todo[name]()
        for filler in fillers:
            await filler()
    finally:
        await plain.close()
        await drm.close()
        await cleanup_namespace(namespace)
    results["total_s"] = round(time.time() - started, 1)
    results["targets"] = targets(results)
    output = _write_results(results, Path(args.output))
    sys.stdout.write(render_table(results) + "\n")
    say(f"done in {results['total_s']} s; JSON: {output}")
    return 1 if results["errors"] else 0


def _write_results(results: dict[str, Any], output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    output.write_text(text + "\n", "utf-8")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"run-{stamp}.json").write_text(text + "\n", "utf-8")
    (RESULTS_DIR / "latest.md").write_text(render_markdown(results), "utf-8")
    return output


def run() -> None:
    raise SystemExit(asyncio.run(main()))
