"""taskiq's result backend on PostgreSQL (taskiq-postgres), JSON instead of pickle.

Results are not written one by one here: the run ledger writes them in batches, in the same
transaction as the ``plugin_runs`` rows (see :mod:`drm_taskiq.runlog`). Reading
(``is_result_ready``, ``get_result``, ``task.wait_result()``) is taskiq-postgres's own.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from taskiq import TaskiqResult
from taskiq.serializers import JSONSerializer
from taskiq_pg.asyncpg import AsyncpgResultBackend

from drm_taskiq.settings import Settings


class JobResultBackend(AsyncpgResultBackend):
    """Reads taskiq results from the ``taskiq_results`` table the migrations create."""

    def __init__(self, settings: Settings) -> None:
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
