"""drm-taskiq: plugin jobs for the DRM platform on taskiq, Redis and PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version

from drm_taskiq.context import PluginContext, TenantDatabase, create_plugin_context
from drm_taskiq.errors import (
    DrmTaskiqError,
    InvalidInputError,
    JobTimeoutError,
    LimitExceededError,
    PluginLoadError,
    RateLimitedError,
    RedisUnavailableError,
    SettingsError,
    UnknownJobError,
    UnknownTenantError,
    UnrecoverableError,
)
from drm_taskiq.hooks import HookRegistry
from drm_taskiq.jobs import Job, JobScheduler, TenantScheduler, close_scheduler, get_scheduler
from drm_taskiq.options import Backoff, JobEvent, JobMetadata, JobOptions, JobStatus
from drm_taskiq.plugins import Plugin, define_plugin
from drm_taskiq.runlog import log_plugin_run
from drm_taskiq.settings import Settings, load_settings

try:
    __version__ = version("drm-taskiq")
except PackageNotFoundError:  # pragma: no cover  (running from a source tree)
    __version__ = "0.0.0"

__all__ = [
    "Backoff",
    "DrmTaskiqError",
    "HookRegistry",
    "InvalidInputError",
    "Job",
    "JobEvent",
    "JobMetadata",
    "JobOptions",
    "JobScheduler",
    "JobStatus",
    "JobTimeoutError",
    "LimitExceededError",
    "Plugin",
    "PluginContext",
    "PluginLoadError",
    "RateLimitedError",
    "RedisUnavailableError",
    "Settings",
    "SettingsError",
    "TenantDatabase",
    "TenantScheduler",
    "UnknownJobError",
    "UnknownTenantError",
    "UnrecoverableError",
    "__version__",
    "close_scheduler",
    "create_plugin_context",
    "define_plugin",
    "get_scheduler",
    "load_settings",
    "log_plugin_run",
]
