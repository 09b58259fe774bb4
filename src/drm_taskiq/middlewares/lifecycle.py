"""The job lifecycle in a worker: structlog events, and the outcome of each attempt.

``post_execute`` decides what happens to the attempt (complete, retry later, fail) with the pure
policy in :mod:`drm_taskiq.retry`; the broker applies the decision atomically when taskiq
acknowledges the message (after the result is saved).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult

from drm_taskiq.context import current_message
from drm_taskiq.errors import JobTimeoutError
from drm_taskiq.logs import log_info
from drm_taskiq.options import (
    LABEL_JOB,
    LABEL_PLUGIN,
    LABEL_PRIORITY,
    LABEL_RUN_TIMEOUT,
    LABEL_TENANT,
    LABEL_TIMEOUT,
    EventState,
    JobEvent,
    RetryOptions,
    ms_to_datetime,
    storable_json,
)
from drm_taskiq.redaction import redact
from drm_taskiq.redis_queue import Outcome
from drm_taskiq.retry import decide, describe

if TYPE_CHECKING:
    from drm_taskiq.queue_broker import DrmBroker

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class PendingOutcome:
    """The decision for one attempt, applied by the broker when the message is acknowledged."""

    outcome: Outcome
    value: str = ""
    due_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # for a job registered with on_completed / on_failed: sent once the outcome is recorded
    event: JobEvent | None = None


def _identity(message: TaskiqMessage) -> dict[str, Any]:
    labels = message.labels
    return {
        "job_id": message.task_id,
        "task": message.task_name,
        "plugin_id": labels.get(LABEL_PLUGIN),
        "tenant_id": labels.get(LABEL_TENANT),
    }


def _returnvalue(value: Any) -> str:
    if value is None:  # most jobs return nothing
        return "null"
    try:
        json.dumps(value, allow_nan=False, default=str)
    except (TypeError, ValueError, RecursionError):
        value = repr(value)[:10_000]
    return redact(storable_json(value))


class LifecycleMiddleware(TaskiqMiddleware):
    """Logs every step of a job and decides the outcome of each attempt."""

    def __init__(self, unrecoverable: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__()
        self.unrecoverable = unrecoverable

    @property
    def drm_broker(self) -> DrmBroker:
        return self.broker  # type: ignore[return-value]

    def _event(
        self, message: TaskiqMessage, attempt: int, state: EventState, **fields: Any
    ) -> JobEvent | None:
        """The attempt's event when its job was registered with ``on_completed`` or
        ``on_failed`` (for the others nothing is built)."""
        if message.task_name not in self.drm_broker.event_tasks:
            return None
        labels = message.labels
        return JobEvent(
            job_id=message.task_id,
            plugin_id=str(labels.get(LABEL_PLUGIN, "")),
            job_name=str(labels.get(LABEL_JOB, "")),
            tenant_id=str(labels.get(LABEL_TENANT, "")),
            attempt=attempt,
            state=state,
            **fields,
        )

    def post_send(self, message: TaskiqMessage) -> None:
        """Log ``job_enqueued`` (not for a duplicate id, which the broker logged)."""
        if message.task_id in self.drm_broker.duplicates:
            self.drm_broker.duplicates.discard(message.task_id)
            return
        log_info(
            "job_enqueued",
            **_identity(message),
            job_name=message.labels.get(LABEL_JOB),
            priority=message.labels.get(LABEL_PRIORITY),
        )

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Record the start and log ``job_started``."""
        labels = message.labels
        if LABEL_PLUGIN in labels and LABEL_TIMEOUT in labels:
            # run_plugin_job enforces the timeout (asyncio.timeout); taskiq's receiver would
            # wrap the call in an anyio cancel scope, several times as costly per job.
            labels[LABEL_RUN_TIMEOUT] = labels.pop(LABEL_TIMEOUT)
        delivery = self.drm_broker.delivery(message.task_id)
        self.drm_broker.mark_started(message.task_id)
        current_message.set(message)
        log_info(
            "job_started",
            **_identity(message),
            attempt=(delivery.attempts_made if delivery else 0) + 1,
            stalled=delivery.stalled if delivery else 0,
        )
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """Decide complete / retry / fail, log it, and hand the decision to the broker."""
        broker = self.drm_broker
        delivery = broker.delivery(message.task_id)
        if delivery is None:
            # The lease was given back (shutdown grace expired) or lost: nothing to settle.
            log.warning("job_interrupted", **_identity(message))
            return
        attempt = delivery.attempts_made + 1
        duration_ms = int(result.execution_time * 1000)
        if not result.is_err:
            log_info(
                "job_succeeded", **_identity(message), attempt=attempt, duration_ms=duration_ms
            )
            broker.set_outcome(
                message.task_id,
                PendingOutcome(
                    "completed",
                    value=_returnvalue(result.return_value),
                    event=self._event(
                        message, attempt, "completed", returnvalue=result.return_value
                    ),
                ),
            )
            return
        self._failed(message, result, attempt, duration_ms)

    def _failed(
        self, message: TaskiqMessage, result: TaskiqResult[Any], attempt: int, duration_ms: int
    ) -> None:
        """A failed attempt: a timeout is named as such; retry later or fail for good."""
        broker = self.drm_broker
        job_log = log.bind(**_identity(message), attempt=attempt)
        error = result.error or RuntimeError("unknown error")
        extra: dict[str, Any] = {}
        labels = message.labels
        timeout_ms = int(float(labels.get(LABEL_RUN_TIMEOUT, labels.get(LABEL_TIMEOUT, 0))) * 1000)
        if (
            isinstance(error, TimeoutError)
            and not isinstance(error, JobTimeoutError)
            and timeout_ms
            and result.execution_time * 1000 >= timeout_ms * 0.95 - 20
        ):
            error = JobTimeoutError(f"timed out after {timeout_ms} ms")
            extra["timedOut"] = True
            job_log.warning("job_timed_out", timeout_ms=timeout_ms, duration_ms=duration_ms)
        reason = redact(describe(error))
        job_log.warning("job_failed", error=reason, duration_ms=duration_ms)
        decision = decide(
            attempt,
            error,
            RetryOptions.from_labels(message.labels),
            unrecoverable=self.unrecoverable,
        )
        if decision.action == "retry":
            due = int(time.time() * 1000) + decision.delay_ms
            extra["retryDelayMs"] = decision.delay_ms
            job_log.info(
                "job_retry_scheduled", delay_ms=decision.delay_ms, next_attempt=attempt + 1
            )
            event = self._event(
                message, attempt, "retrying", failed_reason=reason, retry_at=ms_to_datetime(due)
            )
            broker.set_outcome(
                message.task_id,
                PendingOutcome("retry", value=reason, due_ms=due, extra=extra, event=event),
            )
        else:
            job_log.error("job_failed_permanently", error=reason, attempts_made=attempt)
            event = self._event(message, attempt, "failed", failed_reason=reason)
            broker.set_outcome(
                message.task_id, PendingOutcome("failed", value=reason, extra=extra, event=event)
            )
