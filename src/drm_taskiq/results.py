"""taskiq's result backend on PostgreSQL (taskiq-postgres), JSON instead of pickle.

Results are not written one by one here: the run ledger writes them in batches, in the same
transaction as the ``plugin_runs`` rows (see :mod:`drm_taskiq.runlog`). Reading
(``is_result_ready``, ``get_result``, ``task.wait_result()``) looks at the job's hash in Redis
first: a job that finished has its result there until the ledger has written it (and the hash
left Redis), so a result is ready as soon as the job settled, not only once the ledger wrote
it. Without a hash, taskiq-postgres reads the ``taskiq_results`` row.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import TaskiqResult
from taskiq.serializers import JSONSerializer
from taskiq_pg.asyncpg import AsyncpgResultBackend

from drm_taskiq.redis_queue import RedisQueue
from drm_taskiq.runlog import taskiq_result_json
from drm_taskiq.settings import Settings

# The job hash's fields a result is built from (finish.lua writes them when a job settles).
_FIELDS = ("state", "rv", "reason", "processed", "finished")


class JobResultBackend(AsyncpgResultBackend):
    """Reads taskiq results from a finished job's hash in Redis (``queue``), else from the
    ``taskiq_results`` table the migrations create."""

    def __init__(self, settings: Settings, queue: RedisQueue | None = None) -> None:
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

    async def _from_redis(self, task_id: str) -> tuple[bool, str | None]:
        """(whether the job's hash exists, its result's JSON when it finished). While Redis
        cannot be reached, (False, None): results already recorded are read from PostgreSQL."""
        if self.queue is None:
            return False, None
        try:
            raw = await self.queue.redis.hmget(self.queue.keys.job(task_id), *_FIELDS)
        except (RedisConnectionError, RedisTimeoutError):
            return False, None
        state, rv, reason, processed, finished = (
            None if v is None else v.decode() if isinstance(v, bytes) else str(v) for v in raw
        )
        if state not in ("completed", "failed"):
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
        exists, result = await self._from_redis(task_id)
        if exists:
            return result is not None
        return await super().is_result_ready(task_id)

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        """The finished job's result from its hash, else taskiq-postgres's row (the same JSON:
        the run ledger writes it with :func:`~drm_taskiq.runlog.taskiq_result_json`)."""
        _, result = await self._from_redis(task_id)
        if result is None:
            return await super().get_result(task_id, with_logs)
        return TaskiqResult[Any].model_validate(self.serializer.loadb(result.encode()))
