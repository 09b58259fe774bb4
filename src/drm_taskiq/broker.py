"""The broker that ``taskiq worker drm_taskiq.broker:broker`` runs, built from settings at import.

Importing this module also builds ``scheduler``, the process-wide :class:`JobScheduler`; the
broker's start-up (worker or client) loads the plugins, which register their jobs.
"""

from __future__ import annotations

import sys

from taskiq import TaskiqEvents, TaskiqState

from drm_taskiq.errors import SettingsError
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.process import stop_taskiq_supervisor
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.settings import get_settings

try:
    settings = get_settings()
except SettingsError as exc:
    sys.stderr.write(f"drm-taskiq: {exc}\n")
    stop_taskiq_supervisor()
    raise SystemExit(2) from None
broker = DrmBroker(settings)
scheduler = JobScheduler(broker)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _worker_startup(_: TaskiqState) -> None:
    await scheduler.load_plugins()
    scheduler.start_plugin_sync()  # plugins enabled for a tenant later get on_load too


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def _worker_shutdown(_: TaskiqState) -> None:
    await scheduler.stop_plugin_sync()


@broker.on_event(TaskiqEvents.CLIENT_STARTUP)
async def _client_startup(_: TaskiqState) -> None:
    await scheduler.load_plugins()
