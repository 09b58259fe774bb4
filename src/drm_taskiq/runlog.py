"""The run ledger: one ``plugin_runs`` row per attempt, written to PostgreSQL in batches.

A job's attempt is settled in Redis by one Lua script that also appends a ledger entry to a
stream (so the entry exists exactly when the job is acknowledged). :class:`RunLedger` reads the
stream with a consumer group, writes each batch with one statement (``plugin_runs`` and
``jobs``, which the ``taskiq_results`` view reads; one transaction), and only then
acknowledges the entries. Row ids are derived from (job id, attempt), so writing an entry twice
leaves one row. While PostgreSQL is down, entries wait in Redis; they are written when it
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog
from redis.exceptions import ResponseError

from drm_taskiq.options import JobMetadata, metadata_body, ms_to_datetime, storable_json
from drm_taskiq.redis_queue import LEDGER_GROUP, RedisQueue, pool_options
from drm_taskiq.settings import Settings, mask_url

log = structlog.get_logger()

# The run ledger's first look for more entries of a trickle (RunLedger._linger).
LINGER_FIRST_S = 0.02

# Entries of one batch share their millisecond timestamps (several jobs finish per ms).
_datetime = functools.lru_cache(maxsize=4096)(ms_to_datetime)

RUN_NAMESPACE = uuid.UUID("5d1c7a52-7f0e-4d55-9a59-3b9f8f1f2c11")

# A batch is written by one statement (one round trip, atomic without BEGIN/COMMIT): its
# data-modifying CTE inserts the attempts' plugin_runs rows ($1), then the final states' jobs
# rows ($3; $2 is the queue; taskiq_results is a view over jobs, migration 0006). Each array is
# one JSON text of rows (each row an array, in the column order below): encoding it with orjson
# costs the writer a fraction of what asyncpg spends encoding one PostgreSQL array per column,
# and jsonb's element access is cheap on the server. The two tables are independent, so the
# statements sharing one snapshot changes nothing.
_WRITE_BATCH = """
WITH runs AS (
  INSERT INTO plugin_runs
    (plugin_run_id, plugin_id, tenant_id, hook_name, args_hash, status, result, error,
     executed_at)
  SELECT (r->>0)::uuid, r->>1, r->>2, r->>3, NULL, r->>4, r->5, r->>6, (r->>7)::timestamptz
  FROM jsonb_array_elements($1::jsonb) AS r
  WHERE EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = r->>2)
  ON CONFLICT (plugin_run_id) DO NOTHING
)
INSERT INTO jobs (job_id, queue, plugin_id, tenant_id, job_name, state, attempts_made, progress,
                  returnvalue, failed_reason, created_at, finished_at, message, generation,
                  started_at)
SELECT j->>0, $2, j->>1, j->>2, j->>3, j->>4, (j->>5)::int, (j->>6)::jsonb, (j->>7)::json,
       j->>8, (j->>9)::timestamptz, (j->>10)::timestamptz, j->>11, (j->>12)::int,
       (j->>13)::timestamptz
FROM jsonb_array_elements($3::jsonb) AS j
WHERE EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = j->>2)
ON CONFLICT (job_id) DO UPDATE SET
  state = EXCLUDED.state, attempts_made = EXCLUDED.attempts_made, progress = EXCLUDED.progress,
  returnvalue = EXCLUDED.returnvalue, failed_reason = EXCLUDED.failed_reason,
  finished_at = EXCLUDED.finished_at, message = EXCLUDED.message, generation = EXCLUDED.generation,
  started_at = EXCLUDED.started_at
WHERE jobs.generation <= EXCLUDED.generation
"""


class RowEncodingError(ValueError):
    """A batch holds a value JSON cannot carry (a lone surrogate): written one by one, the entry
    that holds it is rejected like one PostgreSQL refuses."""


# What makes a batch go one entry at a time, and an entry be rejected (logged, dropped): rows
# PostgreSQL refuses (bad data, a broken constraint, two rows for one key, a value too large
# to index), and text no encoder takes (a lone surrogate in an id that no producer writes, but
# a hand-written entry can hold); retrying either would stop the ledger for good. Errors of the
# connection, the server or the schema (down, out of space, a missing table or privilege)
# fail every entry alike: the batch is retried until they pass, and nothing is dropped.
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.CardinalityViolationError,
    asyncpg.ProgramLimitExceededError,
    RowEncodingError,
    UnicodeError,
)


def _rows_json(rows: list[Any]) -> str:
    try:
        return orjson.dumps(rows).decode()
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise RowEncodingError(str(exc)) from exc


def run_id(job_id: str, attempt: int, generation: int = 0, created_ms: int = 0) -> uuid.UUID:
    """The ``plugin_run_id`` of one attempt: the same attempt always gets the same id.

    ``generation`` counts manual retries of a failed job (each starts its attempts at 1 again);
    ``created_ms`` (when the job was enqueued) tells apart two jobs that reused one id.
    """
    return uuid.UUID(hex=run_id_hex(job_id, attempt, generation, created_ms))


_RUN_NAMESPACE_BYTES = RUN_NAMESPACE.bytes


def run_id_hex(job_id: str, attempt: int, generation: int = 0, created_ms: int = 0) -> str:
    """:func:`run_id` as 32 hexadecimal digits, as the ledger sends it to asyncpg: RFC 4122's
    version-5 UUID (SHA-1 of namespace and name), without building a UUID object per row."""
    name = f"{job_id}:{created_ms}:{generation}:{attempt}".encode()
    digest = bytearray(hashlib.sha1(_RUN_NAMESPACE_BYTES + name, usedforsecurity=False).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest[:16].hex()


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~4 us per entry
class LedgerEntry:
    """One settled attempt, as the finish and stalled-check scripts wrote it."""

    entry_id: str
    job_id: str
    plugin_id: str
    tenant_id: str
    job_name: str
    attempt: int
    status: str  # success | error
    state: str  # completed | failed | delayed (retry)
    final: bool
    outcome: str
    value: str
    progress: str | None
    created: datetime
    started: datetime | None
    at: datetime
    at_ms: str
    extra: dict[str, Any]
    generation: int = 0
    message: str | None = None
    created_ms: int = 0

    @classmethod
    def parse(cls, entry_id: str, raw: str) -> LedgerEntry:
        """Parse a stream entry's JSON."""
        try:
            body = orjson.loads(raw)
        except ValueError:  # what only the standard library reads (escaped lone surrogates)
            body = json.loads(raw)
        get = body.get
        at = _datetime(body["at"])
        assert at is not None
        value = _storable(str(get("value") or ""))
        extra = get("extra")
        progress = get("progress")
        message = get("msg")
        ts = get("ts")
        return cls(
            entry_id=entry_id,
            job_id=str(body["id"]),
            plugin_id=str(get("plugin") or ""),
            tenant_id=str(get("tenant") or ""),
            job_name=str(get("job") or ""),
            attempt=int(body["attempt"]),
            status=str(body["status"]),
            state=str(body["state"]),
            final=bool(int(body["final"])),
            outcome=str(body["outcome"]),
            value=value,
            progress=_storable(progress) if isinstance(progress, str) else None,
            created=_datetime(ts) or at,
            started=_datetime(get("started")),
            at=at,
            at_ms=str(body["at"]),
            extra=_extra(extra),
            generation=int(get("gen") or 0),
            created_ms=int(float(ts or 0)),
            message=_storable(message) if isinstance(message, str) else None,
        )


def _extra(extra: Any) -> dict[str, Any]:
    if not extra or extra == "{}":
        return {}
    return _loads(extra) if isinstance(extra, str) else dict(extra)


def _storable(text: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone surrogates (the common case, plain
    ASCII without NUL, is returned as it is)."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\\u0000").encode("utf-8", "replace").decode("utf-8")


def _loads(text: str | bytes) -> Any:
    """JSON text parsed by orjson, or by the standard library where only it reads the text
    (NaN, integers beyond 64 bits, escaped lone surrogates)."""
    try:
        return orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return json.loads(text)


def json_or_text(value: str) -> Any:
    """``value`` parsed as JSON, or the text itself when it is not JSON."""
    try:
        return _loads(value)
    except ValueError:
        return value


def _jsonb_text(body: dict[str, Any]) -> str:
    """``storable_json`` (JSON text jsonb accepts) with orjson for what it encodes: ~1 us
    instead of ~6 for a row's result. What orjson refuses (a lone surrogate, an integer beyond
    64 bits, a type it does not know) goes the standard library's way, as before."""
    try:
        text = orjson.dumps(body).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return storable_json(body)
    return text.replace("\\u0000", "\\ufffd") if "\\u0000" in text else text


# Entries prepared between two turns of the event loop: a batch must not hold up the jobs of
# the process it shares (a worker's writer), ~15 us an entry.
YIELD_EVERY = 16


async def write_entries(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    queue_name: str,
    entries: list[LedgerEntry],
) -> None:
    """Write ledger entries in one statement (one transaction); entries already written change
    nothing.

    The rows are prepared in slices, letting the event loop run between them: the ledger
    shares its process with running jobs, and a large batch must not hold them up."""
    runs: list[tuple[Any, ...]] = []
    # one final state per job: a job failed and retried by hand before its failure was written
    # has two final entries in a batch (one statement may not upsert a row twice); entries come
    # in stream order, so the later one (the newer run) wins
    finals: dict[str, tuple[Any, ...]] = {}
    for index, e in enumerate(entries):
        if index and index % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if not (e.plugin_id and e.tenant_id):
            continue
        runs.append(
            (
                run_id_hex(e.job_id, e.attempt, e.generation, e.created_ms),
                e.plugin_id,
                e.tenant_id,
                f"job:{e.job_name}",
                e.status,
                orjson.Fragment(_run_result(e)),
                None if e.status == "success" else e.value,
                e.started or e.at,
            )
        )
        if e.final:
            finals[e.job_id] = (
                e.job_id,
                e.plugin_id,
                e.tenant_id,
                e.job_name,
                e.state,
                e.attempt,
                e.progress,
                e.value if e.state == "completed" and e.value else None,
                e.value if e.state == "failed" else None,
                e.created,
                e.at,
                e.message if e.state == "failed" else None,
                e.generation,
                e.started,
            )
    if runs or finals:
        await conn.execute(
            _WRITE_BATCH, _rows_json(runs), queue_name, _rows_json(list(finals.values()))
        )


def _run_result(e: LedgerEntry) -> str:
    """``plugin_runs.result``: the attempt's JobMetadata as JSON, its extra holding attempt,
    state, timing, return value and the metadata the worker attached."""
    extra: dict[str, Any] = {"attempt": e.attempt, "state": e.state}
    if e.generation:
        extra["generation"] = e.generation
    if e.started is not None:
        extra["startedAt"] = e.started.isoformat()
        extra["durationMs"] = int((e.at - e.started).total_seconds() * 1000)
    if e.status == "success" and e.value:
        extra["returnvalue"] = json_or_text(e.value)
    if e.extra:
        extra.update(e.extra)
    # its values came from JSON: orjson encodes them as storable_json would
    return _jsonb_text(metadata_body(e.job_id, e.job_name, e.attempt, e.created, extra=extra))


class RunLedger:
    """Moves ledger entries from the Redis stream into PostgreSQL, in batches.

    A ``dedicated`` writer (``drm-taskiq ledger``, the scheduler process) announces itself in
    Redis while it runs and writes (``ledger-writer``, refreshed every second, expiring after
    ``WRITER_TTL_MS``; not refreshed while its batches fail). A worker's writer (not
    dedicated) stands by while such an announcement exists, so that its event loop runs jobs
    only, and writes again as soon as the last one expired (a dedicated writer that stopped,
    died or cannot write): entries never wait for a process nobody runs. Entries a writer read
    but did not store are claimed by another after ``claim_idle_ms``; those of a dedicated
    writer whose announcement expired, by the worker's writer that takes over, at once.
    """

    WRITER_TTL_MS = 5_000
    CHECK_EVERY_S = 1.0  # how often a dedicated writer renews, and a standby one looks

    def __init__(
        self,
        queue: RedisQueue,
        pool: asyncpg.Pool,
        *,
        consumer: str,
        batch: int = 500,
        block_ms: int = 200,
        retention_ms: int = 0,
        claim_idle_ms: int = 60_000,
        dedicated: bool = False,
    ) -> None:
        self.queue = queue
        self.pool = pool
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.retention_ms = retention_ms
        self.claim_idle_ms = claim_idle_ms
        self.dedicated = dedicated
        self._group_ready = False
        self._checked_at = float("-inf")
        self._standing_by = False
        self._writer_seen = ""  # the dedicated writer last seen announced (standby writers)
        # No entry was read by this consumer and left unsettled: a batch starts with the new
        # ones (one XREADGROUP fewer per batch). Cleared before every write, and by a claim.
        self._caught_up = False

    @classmethod
    def from_settings(
        cls,
        queue: RedisQueue,
        pool: asyncpg.Pool,
        settings: Settings,
        consumer: str = "",
        *,
        dedicated: bool = False,
    ) -> RunLedger:
        """A ledger writer configured by ``DRM_LEDGER_*`` and ``DRM_RETENTION_S``."""
        return cls(
            queue,
            pool,
            consumer=consumer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            batch=settings.ledger_batch,
            block_ms=settings.ledger_flush_ms,
            retention_ms=settings.retention_s * 1000,
            claim_idle_ms=settings.ledger_claim_idle_ms,
            dedicated=dedicated,
        )

    async def standing_by(self, *, healthy: bool = True) -> bool:
        """Whether this writer should leave the entries to a dedicated one now (checked with
        Redis at most every ``CHECK_EVERY_S``). A dedicated writer renews its announcement while
        it is ``healthy`` (its last batch was written): one that cannot reach PostgreSQL lets it
        expire, so that the workers' writers try meanwhile."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < self.CHECK_EVERY_S:
            return self._standing_by
        self._checked_at = loop.time()
        key = self.queue.keys.ledger_writer
        if self.dedicated:
            if healthy:
                await self.queue.redis.set(key, self.consumer, px=self.WRITER_TTL_MS)
            return False
        raw = await self.queue.redis.get(key)
        writer = raw.decode() if isinstance(raw, bytes) else raw
        standing_by = writer is not None
        if standing_by != self._standing_by:
            log.info(
                "ledger_standing_by" if standing_by else "ledger_writing",
                consumer=self.consumer,
                dedicated_writer=writer,
            )
        if writer is not None:
            self._writer_seen = writer
        elif self._standing_by and self._writer_seen:
            # The dedicated writer's announcement expired: it died, stopped or cannot write.
            # Take over what it read and did not settle now, not after claim_idle_ms.
            gone, self._writer_seen = self._writer_seen, ""
            await self.claim_from(gone)
        self._standing_by = standing_by
        return standing_by

    async def claim_from(self, consumer: str) -> int:
        """Take over, at once, the entries ``consumer`` (a dedicated writer whose announcement
        expired) read but did not settle. Writing an entry twice changes nothing (each row's
        id comes from its attempt: ``ON CONFLICT DO NOTHING``), so a writer that was only
        slow loses nothing either."""
        redis, key = self.queue.redis, self.queue.keys.ledger
        claimed = 0
        while True:
            pending = await redis.xpending_range(
                key, LEDGER_GROUP, min="-", max="+", count=1000, consumername=consumer
            )
            ids: list[Any] = [item["message_id"] for item in pending or []]
            if not ids:
                break
            await redis.xclaim(
                key, LEDGER_GROUP, self.consumer, min_idle_time=0, message_ids=ids, justid=True
            )
            claimed += len(ids)
        self._claimed(claimed, from_consumer=consumer)
        return claimed

    def _claimed(self, count: int, **fields: Any) -> None:
        if count:
            self._caught_up = False  # the claimed entries are this consumer's pending ones now
            log.info("ledger_entries_claimed", count=count, **fields)

    async def _retire(self) -> None:
        """A dedicated writer that stops removes its announcement (if it is still its own),
        so that the workers' writers take over at once."""
        if not self.dedicated:
            return
        key = self.queue.keys.ledger_writer
        with contextlib.suppress(Exception):
            if await self.queue.redis.get(key) == self.consumer.encode():
                await self.queue.redis.delete(key)

    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) if it does not exist."""
        if self._group_ready:
            return
        try:
            await self.queue.redis.xgroup_create(
                self.queue.keys.ledger, LEDGER_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(
        self, start: str, block: int | None, count: int | None = None
    ) -> list[tuple[str, str]]:
        reply = await self.queue.redis.xreadgroup(
            LEDGER_GROUP,
            self.consumer,
            {self.queue.keys.ledger: start},
            count=count or self.batch,
            block=block,
        )
        out: list[tuple[str, str]] = []
        streams: list[Any] = list(reply or [])
        for _stream, items in streams:
            for entry_id, fields in items:
                raw = fields.get(b"e") if fields else None
                eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
                out.append((eid, text))
        return out

    async def _linger(self, have: int) -> list[tuple[str, str]]:
        """While entries keep arriving, collect more of them (up to a quarter of a batch, for
        at most ``block_ms``) so that a trickle is written in transactions of many rows: one
        per job costs the writer and PostgreSQL several times more per row. Looks again after
        ``LINGER_FIRST_S``, then twice as long after each look that brought entries (at most a
        quarter of ``block_ms``), and stops when a look brings nothing new: a lone entry, or
        the last entries of a burst, wait ``LINGER_FIRST_S`` (a fixed quarter of ``block_ms``
        held the end of every drain back by that much); at a steady low rate this is a few
        reads per batch, not one per entry. A busy stream is not waited for: what came in
        while the last batch was being written (a quarter of a batch or more) is written at
        once, so the rows follow the jobs closely under load instead of in ``block_ms``
        steps."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_ms / 1000
        longest = max(self.block_ms / 4000, 0.002)
        step = min(LINGER_FIRST_S, longest)
        enough = max(1, self.batch // 4)
        more: list[tuple[str, str]] = []
        while have + len(more) < enough and loop.time() < deadline:
            await asyncio.sleep(min(step, max(deadline - loop.time(), 0.0)))
            got = await self._read(">", None, count=self.batch - have - len(more))
            if not got:
                break
            more += got
            step = min(step * 2, longest)
        return more

    async def flush_once(self, *, block: bool = False) -> int:
        """Write one batch: this consumer's unacknowledged entries first, then new ones."""
        await self.ensure_group()
        items = [] if self._caught_up else await self._read("0", None)
        pending = bool(items)
        if not items:
            # Until the batch is settled: a read that fails may have been delivered all the
            # same (the entries are then this consumer's pending ones).
            self._caught_up = False
            items = await self._read(">", self.block_ms if block else None)
            if block and items:
                items += await self._linger(len(items))
        if not items:
            self._caught_up = True
            return 0
        entries: list[LedgerEntry] = []
        unreadable: list[str] = []
        for index, (entry_id, raw) in enumerate(items):
            if index and index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            try:
                entries.append(LedgerEntry.parse(entry_id, raw))
            except (ValueError, KeyError, TypeError):
                log.error("ledger_entry_unreadable", entry_id=entry_id, raw=raw[:200])
                unreadable.append(entry_id)
        try:
            async with self.pool.acquire() as conn:
                await write_entries(conn, self.queue.keys.queue, entries)
        except _REFUSED as exc:
            # One entry PostgreSQL will never accept must not hold back every other row.
            log.warning("ledger_batch_rejected", error=f"{type(exc).__name__}: {exc}")
            unreadable += await self._write_one_by_one(entries)
            dropped = set(unreadable)
            entries = [e for e in entries if e.entry_id not in dropped]
        await self.queue.settle_ledger(
            [(e.entry_id, e.job_id, e.at_ms if e.final else "") for e in entries]
            + [(entry_id, "", "") for entry_id in unreadable],
            self.retention_ms,
        )
        # every entry read is settled; a full batch of pending ones may have left more
        self._caught_up = not (pending and len(items) >= self.batch)
        return len(items)

    async def _write_one_by_one(self, entries: list[LedgerEntry]) -> list[str]:
        """Write entries singly; returns the ids of those PostgreSQL refuses (logged, dropped)."""
        rejected: list[str] = []
        async with self.pool.acquire() as conn:
            for entry in entries:
                try:
                    await write_entries(conn, self.queue.keys.queue, [entry])
                except _REFUSED as exc:
                    log.error(
                        "ledger_entry_rejected",
                        entry_id=entry.entry_id,
                        job_id=entry.job_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    rejected.append(entry.entry_id)
        return rejected

    async def claim_abandoned(self) -> int:
        """Take over entries another consumer read but never acknowledged (it died)."""
        await self.ensure_group()
        reply = await self.queue.redis.xautoclaim(
            self.queue.keys.ledger,
            LEDGER_GROUP,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=self.batch,
            justid=True,
        )
        # redis-py returns [next_id, ids, deleted] from XAUTOCLAIM, or just the ids with JUSTID
        claimed: list[Any] = list(reply or [])
        if len(claimed) >= 2 and isinstance(claimed[1], list):  # [next id, ids, deleted ids]
            claimed = claimed[1]
        self._claimed(len(claimed))
        return len(claimed)

    async def drain(self, max_seconds: float = 3.0) -> int:
        """Write what is pending now (shutdown, tests), for at most ``max_seconds``; what is
        left stays in Redis for another worker. Returns how many entries were written."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_seconds
        total = 0
        while loop.time() < deadline:
            written = await self.flush_once()
            if not written:
                break
            total += written
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Flush continuously until ``stop`` is set; back off while PostgreSQL or Redis is down."""
        failures = 0
        last_claim = 0.0
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        while not stop.is_set() and not (task is not None and task.cancelling()):
            try:
                if await self.standing_by(healthy=not failures):
                    await _sleep_or_stop(stop, self.CHECK_EVERY_S)
                    continue
                if loop.time() - last_claim > self.claim_idle_ms / 2000:
                    last_claim = loop.time()
                    await self.claim_abandoned()
                await self.flush_once(block=True)
                if failures:
                    log.info("ledger_recovered", after_failures=failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the writer must outlive any error; it retries
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "ledger_write_failed",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=failures,
                    )
                await _sleep_or_stop(stop, min(0.1 * 2**failures, 5.0))
        try:
            if not self._standing_by:  # else the dedicated writer has them
                await self.drain()
        except Exception as exc:  # rows stay in Redis and are written by another worker
            log.warning("ledger_not_drained_on_shutdown", error=f"{type(exc).__name__}: {exc}")
        await self._retire()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def log_plugin_run(  # noqa: PLR0917  (the specification's positional signature)
    plugin_id: str,
    tenant_id: str,
    hook_name: str,
    status: str,
    metadata: JobMetadata | None = None,
    error: str | None = None,
    *,
    pool: asyncpg.Pool | None = None,
) -> uuid.UUID:
    """Insert one ``plugin_runs`` row now (the specification's ``logPluginRun``).

    Job attempts are recorded by the run ledger; this is for hooks and other one-off runs.
    """
    from drm_taskiq.errors import InvalidInputError  # noqa: PLC0415
    from drm_taskiq.options import check_id  # noqa: PLC0415

    check_id(plugin_id, "plugin_id")
    check_id(tenant_id, "tenant_id")
    if status not in ("success", "error"):
        raise InvalidInputError("status", "must be 'success' or 'error'")
    if not hook_name:
        raise InvalidInputError("hook_name", "must be a non-empty string")
    if pool is None:
        from drm_taskiq.jobs import get_scheduler  # noqa: PLC0415  (process-wide default)

        pool = get_scheduler().pool
    row_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO plugin_runs (plugin_run_id, plugin_id, tenant_id, hook_name, args_hash,"
        " status, result, error) VALUES ($1, $2, $3, $4, NULL, $5, $6::jsonb, $7)",
        row_id,
        plugin_id,
        tenant_id,
        hook_name,
        status,
        metadata.to_json() if metadata is not None else None,
        error,
    )
    return row_id


async def serve(settings: Settings) -> int:
    """``drm-taskiq ledger``: write the run ledger in a process of its own until SIGTERM or
    SIGINT, then write what is pending (for a few seconds) and exit 0.

    A dedicated writer: while it runs, the workers' writers stand by (see :class:`RunLedger`),
    so that its batches do not share an event loop with running jobs. Any number may run (they
    share the stream's consumer group).
    """
    from redis.asyncio import Redis  # noqa: PLC0415

    from drm_taskiq import store  # noqa: PLC0415

    if settings.migrate_on_start:
        await store.migrate(settings)
    pool = await store.create_pool(settings, max_size=2)
    redis = Redis.from_url(settings.redis_url, **pool_options())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        queue = RedisQueue(redis, settings.key_prefix, settings.queue)
        ledger = RunLedger.from_settings(queue, pool, settings, dedicated=True)
        log.info(
            "ledger_started",
            consumer=ledger.consumer,
            queue=settings.queue,
            redis=mask_url(settings.redis_url),
            database=mask_url(settings.database_url),
        )
        await ledger.run(stop)
        log.info("ledger_stopped", consumer=ledger.consumer)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await pool.close()
        await redis.aclose()
    return 0
