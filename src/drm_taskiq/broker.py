"""The broker that ``taskiq worker drm_taskiq.broker:broker`` runs, built from settings at import.

Importing this module also builds ``scheduler``, the process-wide :class:`JobScheduler`; the
broker's start-up (worker or client) loads the plugins, which register their jobs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

from taskiq import TaskiqEvents, TaskiqState

from drm_taskiq.errors import SettingsError
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.settings import get_settings


def _stop_taskiq_supervisor() -> None:
    """In a ``taskiq worker`` child, stop the supervising parent too: it would otherwise restart
    this child forever, since bad settings do not heal. (It is ended by a signal, so the command
    exits non-zero.)"""
    in_child = multiprocessing.parent_process() is not None
    # taskiq's CLI strips its own name from sys.argv: a worker child sees ["worker", ...].
    if in_child and sys.argv[:1] == ["worker"]:
        os.kill(os.getppid(), signal.SIGUSR1)


try:
    settings = get_settings()
except SettingsError as exc:
    sys.stderr.write(f"drm-taskiq: {exc}\n")
    _stop_taskiq_supervisor()
    raise SystemExit(2) from None
broker = DrmBroker(settings)
scheduler = JobScheduler(broker)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _worker_startup(_: TaskiqState) -> None:
    await scheduler.load_plugins()


@broker.on_event(TaskiqEvents.CLIENT_STARTUP)
async def _client_startup(_: TaskiqState) -> None:
    await scheduler.load_plugins()
