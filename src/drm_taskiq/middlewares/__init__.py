"""taskiq middlewares: input validation before enqueueing, and the job lifecycle in workers."""

from drm_taskiq.middlewares.lifecycle import LifecycleMiddleware, PendingOutcome
from drm_taskiq.middlewares.validation import ValidationMiddleware

__all__ = ["LifecycleMiddleware", "PendingOutcome", "ValidationMiddleware"]
