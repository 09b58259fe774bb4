"""Errors raised by drm-taskiq. Every error derives from :class:`DrmTaskiqError`."""

from __future__ import annotations


class DrmTaskiqError(Exception):
    """An error occurred in drm-taskiq."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class SettingsError(DrmTaskiqError):
    """The settings are invalid."""


class InvalidInputError(DrmTaskiqError, ValueError):
    """A value given to the job API breaks a rule; nothing was enqueued."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class UnknownJobError(InvalidInputError):
    """No job with this plugin id and job name is registered."""


class UnknownTenantError(InvalidInputError):
    """The tenant does not exist or does not have the plugin enabled."""


class RateLimitedError(InvalidInputError):
    """The tenant enqueues faster than its limit allows; nothing was enqueued."""


class LimitExceededError(InvalidInputError):
    """A configured limit (schedules per tenant, ...) would be exceeded; nothing was changed."""


class PluginLoadError(DrmTaskiqError):
    """A plugin could not be loaded."""


class UnrecoverableError(DrmTaskiqError):
    """The job failed in a way retrying cannot fix; it fails at once, whatever `attempts` says."""


class JobTimeoutError(DrmTaskiqError, TimeoutError):
    """The job ran longer than its timeout."""


class RedisUnavailableError(DrmTaskiqError, ConnectionError):
    """Redis stayed unreachable longer than the configured limit."""
