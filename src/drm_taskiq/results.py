"""taskiq's result backend on PostgreSQL (taskiq-postgres), JSON instead of pickle.

Results are not written here: a finished job's result is its final state, which the job's hash
in Redis holds until the run ledger has written the job's ``jobs`` row (see
:mod:`drm_taskiq.runlog`); ``taskiq_results`` is a view over ``jobs`` (migration 0006). Reading
(``is_result_ready``, ``get_result``, ``task.wait_result()``) looks at the job's hash first, so
a result is ready as soon as the job settled, not only once the ledger wrote it. Without a
hash, taskiq-postgres reads the view. Progress (taskiq's ``ProgressTracker``) is kept with the
job's own progress (``ctx.update_progress``): in its hash, then in ``jobs.progress``.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress, TaskState
from taskiq.serializers import JSONSerializer
from taskiq_pg.asyncpg import AsyncpgResultBackend

from drm_taskiq.redis_queue import RedisQueue
from drm_taskiq.runlog import json_or_text
from drm_taskiq.settings import Settings

# The job hash's fields a result is built from (finish.lua writes them when a job settles).
_FIELDS = ("state", "rv", "reason", "processed", "finished")
_FINISHED = ("completed", "failed")


def taskiq_result_json(completed: bool, value: str, execution_time: float) -> str:
    """A finished job's taskiq result as JSON text: ``value`` is the return value's JSON
    (completed) or the failure's reason. The ``taskiq_results`` view (migration 0006) builds
    the same JSON from the job's ``jobs`` row."""
    if completed:  # the common case, without a pydantic model (same JSON)
        body: dict[str, Any] = {
            "is_err": False,
            "log": None,
            "return_value": None if value in ("", "null") else json_or_text(value),
            "execution_time": round(execution_time, 3),
            "labels": {},
            "error": None,
        }
        try:
            return orjson.dumps(body).decode()
        except TypeError:  # what only the standard library encodes (integers beyond 64 bits)
            return json.dumps(body)
    result: TaskiqResult[Any] = TaskiqResult(
        is_err=True,
        return_value=None,
        execution_time=round(execution_time, 3),
        error=RuntimeError(value),
        log=None,
    )
    return json.dumps(result.model_dump(mode="json"))


class JobResultBackend(AsyncpgResultBackend):
    """Reads taskiq results from a finished job's hash in Redis (``queue``), else from the
    ``taskiq_results`` view the migrations create."""

    def __init__(self, settings: Settings, queue: RedisQueue) -> None:
        self.queue = queue
        super().__init__(
            dsn=settings.database_url,
            keep_results=True,
            table_name="taskiq_results",
            serializer=JSONSerializer(),
            min_size=1,
            max_size=4,
            server_settings={"search_path": f"{settings.db_schema},public"},
        )

    async def startup(self) -> None:
        """Open the pool; the schema is owned by the migrations, so no DDL runs here."""
        self._database_pool = await asyncpg.create_pool(dsn=self.dsn, **self.connect_kwargs)

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        """Nothing to do: the run ledger stores the result with the attempt's row."""

    async def _hash_fields(self, task_id: str, *fields: str) -> list[str | None]:
        """The job hash's ``fields`` as text (None where missing). While Redis cannot be
        reached, all None, as for a job without a hash: what the ledger recorded is read from
        PostgreSQL."""
        try:
            raw = await self.queue.redis.hmget(self.queue.keys.job(task_id), *fields)
        except (RedisConnectionError, RedisTimeoutError):
            return [None] * len(fields)
        return [None if v is None else v.decode() if isinstance(v, bytes) else str(v) for v in raw]

    async def _from_redis(self, task_id: str) -> tuple[bool, str | None]:
        """(whether the job's hash exists, its result's JSON when it finished)."""
        state, rv, reason, processed, finished = await self._hash_fields(task_id, *_FIELDS)
        if state not in _FINISHED:
            # waiting, active, delayed (a retry), or no hash (None): not finished in Redis
            return state is not None, None
        try:
            took = (int(finished) - int(processed)) / 1000 if finished and processed else 0.0
        except ValueError:  # not written by finish.lua (a hand-edited hash): no duration
            took = 0.0
        completed = state == "completed"
        return True, taskiq_result_json(completed, (rv if completed else reason) or "", took)

    async def is_result_ready(self, task_id: str) -> bool:
        """Ready when the job's hash says it finished; while the hash says it has not (a job
        waiting, running or retrying, a failed job retried by hand), not ready, whatever an
        earlier run with this id left in PostgreSQL; without a hash, when its row exists."""
        [state] = await self._hash_fields(task_id, "state")
        if state is not None:
            return state in _FINISHED
        return await super().is_result_ready(task_id)

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        """The finished job's result from its hash, else from the ``taskiq_results`` view (the
        same JSON: the view builds it as :func:`taskiq_result_json` does).

        Raises ``LookupError`` when the result is not ready (``is_result_ready`` is False): the
        job's hash says it has not finished (an earlier run's row is not its result), or there
        is neither a hash nor a row. ``task.get_result()`` wraps it in taskiq's
        ``ResultGetError``."""
        exists, result = await self._from_redis(task_id)
        if exists and result is None:
            raise LookupError(f"job {task_id!r} has not finished")
        raw = (
            result.encode()
            if result is not None
            else await self._database_pool.fetchval(
                "SELECT result FROM taskiq_results WHERE task_id = $1", task_id
            )
        )
        if raw is None:
            raise LookupError(f"no result for job {task_id!r}")
        return TaskiqResult[Any].model_validate(self.serializer.loadb(raw))

    async def set_progress(self, task_id: str, progress: TaskProgress[Any]) -> None:
        """taskiq's progress, kept as the job's progress (what ``ctx.update_progress`` sets and
        ``get_job_status`` shows): ``{"state": ..., "meta": ...}``."""
        await self.queue.set_progress(task_id, progress.model_dump(mode="json"))

    async def get_progress(self, task_id: str) -> TaskProgress[Any] | None:
        """The job's progress: from its hash while it has one, else from its ``jobs`` row;
        None when it has none. Progress set by ``ctx.update_progress`` (any JSON value) is the
        ``meta`` of a ``STARTED`` progress."""
        state, text = await self._hash_fields(task_id, "state", "progress")
        if state is None:  # no hash (or Redis unreachable): what the ledger recorded
            text = await self._database_pool.fetchval(
                "SELECT progress::text FROM jobs WHERE job_id = $1", task_id
            )
        if text is None:
            return None
        value = json_or_text(text)
        if isinstance(value, dict) and value.keys() == {"state", "meta"}:
            return TaskProgress[Any].model_validate(value)
        return TaskProgress[Any](state=TaskState.STARTED, meta=value)
