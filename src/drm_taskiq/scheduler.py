"""The scheduler that ``taskiq scheduler drm_taskiq.scheduler:sched`` runs."""

from __future__ import annotations

from drm_taskiq.broker import broker, scheduler, settings
from drm_taskiq.cron import DrmScheduler
from drm_taskiq.logs import configure_logging

configure_logging(settings.log_format, settings.log_level)
sched = DrmScheduler(broker, scheduler)
