"""The run ledger writer against real Redis and PostgreSQL: hostile entries and refused rows."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from drm_taskiq import redis_queue, store
from drm_taskiq.options import storable_json
from drm_taskiq.redis_queue import RedisQueue
from drm_taskiq.runlog import RunLedger
from drm_taskiq.settings import Settings
from tests.support.ledger import ledger_entry

pytestmark = pytest.mark.asyncio


async def _write(settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, *raw: str) -> int:
    queue = RedisQueue(redis, settings.key_prefix, settings.queue)
    ledger = RunLedger(queue, db, consumer="test")
    await ledger.ensure_group()
    for text in raw:
        await redis.xadd(queue.keys.ledger, {"e": text})
    written = await ledger.drain()
    assert await redis.xlen(queue.keys.ledger) == 0  # settled: nothing left to write
    return written


async def test_hostile_text_in_a_failed_attempt_is_stored_not_refused(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """NUL characters and lone surrogates in a failed attempt's reason, message and progress
    are stored with replacements; the whole batch is written."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    hostile = "bad \ud800 and \x00 end"
    failed = ledger_entry(
        "h-1",
        status="error",
        state="failed",
        outcome="failed",
        value=hostile,
        msg=f'{{"args": ["{hostile}"]}}',
        progress=storable_json({"note": hostile}),  # as Job.update_progress stores it
    )
    assert "\\ud800" in failed  # json.dumps escapes the lone surrogate, as a hostile writer could
    assert await _write(settings, db, redis_client, ledger_entry("h-0"), failed) == 2
    runs = await db.fetch("SELECT status, error FROM plugin_runs ORDER BY status")
    assert [r["status"] for r in runs] == ["error", "success"]
    error = runs[0]["error"]
    assert error.startswith("bad ") and "\\u0000" in error and "\ud800" not in error
    job = await db.fetchrow("SELECT state, failed_reason, message FROM jobs WHERE job_id = 'h-1'")
    assert job["state"] == "failed" and job["failed_reason"] == error
    assert "\ud800" not in job["message"] and "\x00" not in job["message"]


# 3,200 random hex characters: too long for PostgreSQL's index on jobs.job_id (not compressible)
_HUGE_ID = "".join(f"{random.getrandbits(128):032x}" for _ in range(100))


@pytest.mark.parametrize(
    ("bad_id", "error"),
    [("bad-\ud800", "UnicodeEncodeError"), (_HUGE_ID, "ProgramLimitExceededError")],
    ids=["lone-surrogate", "too-large-to-index"],
)
async def test_an_entry_postgresql_cannot_store_is_refused_alone(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis, bad_id: str, error: str
) -> None:
    """An entry whose job id holds a lone surrogate (JSON cannot carry it) or is too long for
    PostgreSQL's index (no producer writes either: ids are checked; a hand-written or corrupted
    entry can) is logged and dropped; the rest of its batch is written and the writer goes on
    (it used to retry that batch for ever)."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    with capture_logs() as logs:
        written = await _write(
            settings,
            db,
            redis_client,
            ledger_entry("ok-1"),
            ledger_entry(bad_id),
            ledger_entry("ok-2"),
        )
    assert written == 3
    rows = await db.fetch("SELECT job_id FROM jobs ORDER BY job_id")
    assert [r["job_id"] for r in rows] == ["ok-1", "ok-2"]
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 2
    assert "ledger_batch_rejected" in [e["event"] for e in logs]
    rejected = [e for e in logs if e["event"] == "ledger_entry_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["error"].startswith(error)


def _record_reads(ledger: RunLedger) -> list[str]:
    """The start id of each stream read ``ledger`` makes from now on ("0": its own unsettled
    entries, ">": new ones), appended to the list returned."""
    starts: list[str] = []
    original = ledger._read

    async def recorded(start: str, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        starts.append(start)
        return await original(start, *args, **kwargs)

    ledger._read = recorded  # type: ignore[method-assign]
    return starts


async def _reads_for_one_batch(
    settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, waiting: int
) -> tuple[int, int]:
    """(stream reads, rows written) of one blocking ``flush_once`` with ``waiting`` entries."""
    queue = RedisQueue(redis, settings.key_prefix, settings.queue)
    ledger = RunLedger(queue, db, consumer="test", batch=100, block_ms=400)
    await ledger.ensure_group()
    for i in range(waiting):
        await redis.xadd(queue.keys.ledger, {"e": ledger_entry(f"w{waiting}-{i}")})
    starts = _record_reads(ledger)
    written = await ledger.flush_once(block=True)
    return len(starts), written


async def test_a_busy_stream_is_written_at_once_a_trickle_is_collected(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """Batch 100: with 40 entries waiting (a quarter batch or more) the writer writes them after
    its two reads (its own pending ones, then new ones), without lingering; with 3 waiting it
    looks again for more before writing (and finds none)."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    assert await _reads_for_one_batch(settings, db, redis_client, 40) == (2, 40)
    reads, written = await _reads_for_one_batch(settings, db, redis_client, 3)
    assert (reads, written) == (3, 3)
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 43


async def test_a_batch_is_one_statement_and_a_caught_up_writer_reads_only_new_entries(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """Each batch reaches PostgreSQL as one statement (no BEGIN/COMMIT round trips); a writer
    whose last batch was settled asks Redis only for new entries; one whose write failed reads
    its own unsettled entries first, and writes them."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    statements: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        # what the pool itself sends when a connection is given back is not the ledger's
        conn.add_query_logger(
            lambda record: (
                statements.append(record.query)
                if "pg_advisory_unlock_all" not in record.query
                else None
            )
        )

    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=1,
        server_settings={"search_path": f"{settings.db_schema},public"},
        init=log_queries,
    )
    queue = RedisQueue(redis_client, settings.key_prefix, settings.queue)
    ledger = RunLedger(queue, pool, consumer="test", batch=100)
    await ledger.ensure_group()
    starts = _record_reads(ledger)

    async def flush(count: int, tag: str) -> int:
        for i in range(count):
            await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry(f"{tag}-{i}")})
        starts.clear()
        statements.clear()
        return await ledger.flush_once()

    assert await flush(30, "first") == 30
    assert starts == ["0", ">"]  # a new writer looks for entries left unsettled first
    assert len(statements) == 1 and "INSERT INTO plugin_runs" in statements[0]
    assert await flush(30, "second") == 30
    assert starts == [">"]
    assert len(statements) == 1

    # PostgreSQL cannot be reached (the pool is closed): the batch read stays unsettled
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await flush(5, "third")
    assert starts == [">"]
    ledger.pool = db
    starts.clear()
    assert await ledger.flush_once() == 5
    assert starts == ["0"]
    assert await redis_client.xlen(queue.keys.ledger) == 0
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 65
    assert await db.fetchval("SELECT count(*) FROM jobs") == 65
    assert await db.fetchval("SELECT count(*) FROM taskiq_results") == 65


async def test_two_final_attempts_of_one_job_in_one_batch_are_both_recorded(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """A job that failed and was retried by hand before the ledger wrote its failure (a
    PostgreSQL outage, a lagging writer) has two final entries in one batch: both attempts get
    their plugin_runs row, jobs and taskiq_results keep the newer run, and the batch is not
    refused."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    failed = ledger_entry(
        "twice", status="error", state="failed", outcome="failed", value="boom", gen=0
    )
    completed = ledger_entry("twice", value='{"ok": 1}', gen=1)
    other = ledger_entry("other")
    assert await _write(settings, db, redis_client, failed, completed, other) == 3
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 3
    row = await db.fetchrow(
        "SELECT state, generation, returnvalue FROM jobs WHERE job_id = 'twice'"
    )
    assert (row["state"], row["generation"], json.loads(row["returnvalue"])) == (
        "completed",
        1,
        {"ok": 1},
    )
    result = await db.fetchval("SELECT result FROM taskiq_results WHERE task_id = 'twice'")
    assert json.loads(result)["is_err"] is False


async def test_an_older_run_written_late_does_not_replace_the_newer_result(
    settings: Settings, db: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """The retried run's completion is written first and the earlier run's failure later (an
    entry another writer had read and a claim brought back): the failure gets its plugin_runs
    row, while jobs and taskiq_results keep the newer, completed run."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    completed = ledger_entry("late", value='{"ok": 1}', gen=1)
    failed = ledger_entry(
        "late", status="error", state="failed", outcome="failed", value="boom", gen=0
    )
    assert await _write(settings, db, redis_client, completed) == 1
    assert await _write(settings, db, redis_client, failed) == 1
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 2
    row = await db.fetchrow("SELECT state, generation FROM jobs WHERE job_id = 'late'")
    assert (row["state"], row["generation"]) == ("completed", 1)
    result = await db.fetchval("SELECT result FROM taskiq_results WHERE task_id = 'late'")
    assert json.loads(result)["is_err"] is False


async def test_a_batch_is_settled_in_parts_and_finished_jobs_leave_redis(
    settings: Settings,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis answers no other client while a script runs: with parts of 16 entries, a written
    batch of 40 is settled by three script calls (16, 16, 8 entries), not one. Every entry is
    acknowledged and removed from the stream; the hash of a job whose entry was its final one
    leaves Redis, while one that finished again since (a retried job's newer run) stays."""
    monkeypatch.setattr(redis_queue, "SETTLE_PART", 16)
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    queue = RedisQueue(redis_client, settings.key_prefix, settings.queue)
    ledger = RunLedger(queue, db, consumer="test", batch=100)
    await ledger.ensure_group()
    at_ms = 1_790_000_000_000
    for i in range(40):
        await redis_client.hset(
            queue.keys.job(f"p-{i}"), mapping={"state": "completed", "finished": str(at_ms)}
        )
        await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry(f"p-{i}", at_ms=at_ms)})
    # p-7 finished again after the entry was written: its newer run is not the ledger's yet
    await redis_client.hset(queue.keys.job("p-7"), "finished", str(at_ms + 5))
    parts: list[int] = []
    settle = queue._scripts["settle"]

    async def counting(*, keys: list[str], args: list[Any]) -> Any:
        parts.append(len(json.loads(args[3])) // 3)
        return await settle(keys=keys, args=args)

    queue._scripts["settle"] = counting  # type: ignore[assignment]
    assert await ledger.flush_once() == 40
    assert parts == [16, 16, 8]
    assert await redis_client.xlen(queue.keys.ledger) == 0
    assert (await redis_client.xpending(queue.keys.ledger, "ledger"))["pending"] == 0
    left = [i for i in range(40) if await redis_client.exists(queue.keys.job(f"p-{i}"))]
    assert left == [7]
    assert await db.fetchval("SELECT count(*) FROM plugin_runs") == 40


@pytest.mark.parametrize(
    ("block_ms", "arriving", "steps"),
    [
        (4000, 0, [0.02]),  # the last entries of a burst: one short look, then written
        (4000, 5, [0.02, 0.04, 0.08, 0.16, 0.32]),  # a trickle: looks less and less often
        (400, 5, [0.02, 0.04, 0.08, 0.1, 0.1]),  # ... at most every quarter of block_ms
    ],
    ids=["burst-end", "trickle", "trickle-capped"],
)
async def test_a_trickle_is_collected_with_looks_further_and_further_apart(
    settings: Settings,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    block_ms: int,
    arriving: int,
    steps: list[float],
) -> None:
    """Batch 100 (a quarter: 25), 3 entries waiting. The writer looks for more after 20 ms,
    then twice as long after each look that brought entries, at most every quarter of
    ``DRM_LEDGER_FLUSH_MS``, until a quarter batch is there or a look brings nothing. (Here
    each wait brings ``arriving`` new entries and takes no time.) A fixed quarter of the
    interval before the first look held the end of every burst back by that much."""
    await store.ensure_tenant(db, "acme", plugins={"testp": {}})
    queue = RedisQueue(redis_client, settings.key_prefix, settings.queue)
    ledger = RunLedger(queue, db, consumer="test", batch=100, block_ms=block_ms)
    await ledger.ensure_group()
    for i in range(3):
        await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry(f"t-{i}")})
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def arrive_while_waiting(seconds: float, *args: Any) -> Any:
        if seconds > 0.001:  # the linger's waits (the writer's own yields are sleep(0))
            waits.append(round(seconds, 3))
            for _ in range(arriving):
                n = await redis_client.xlen(queue.keys.ledger)
                await redis_client.xadd(queue.keys.ledger, {"e": ledger_entry(f"a-{n}-{seconds}")})
        return await real_sleep(0, *args)

    monkeypatch.setattr(asyncio, "sleep", arrive_while_waiting)
    written = await ledger.flush_once(block=True)
    monkeypatch.undo()
    assert waits == steps
    assert written == 3 + arriving * len(steps)
