"""Job options, job state and metadata types, and the labels that carry options on a message.

Options arrive as a :class:`JobOptions` or a plain dict; labels arrive as strings. Both are parsed
here, in one place, into typed values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterBadCronError, CroniterBadDateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drm_taskiq.errors import InvalidInputError

# Priorities 0 (highest) .. 2**21 - 1 (lowest). The wait set's score is priority * 2**32 + seq,
# which must stay below 2**53 to be exact in a double (BullMQ allows 2**21 itself).
MAX_PRIORITY = 2**21 - 1

# Label keys. Values on a message are strings; parse them with the helpers below.
LABEL_TENANT = "tenant_id"
LABEL_PLUGIN = "plugin_id"
LABEL_JOB = "job_name"
LABEL_PRIORITY = "priority"
LABEL_DELAY = "delay"  # milliseconds before the job may run
LABEL_ATTEMPTS = "attempts"
LABEL_BACKOFF_TYPE = "backoff_type"
LABEL_BACKOFF_DELAY = "backoff_delay"  # milliseconds
LABEL_BACKOFF_JITTER = "backoff_jitter"  # 0..1
LABEL_BACKOFF_MAX = "backoff_max"  # milliseconds, 0 = no bound
LABEL_TIMEOUT = "timeout"  # seconds: taskiq's receiver enforces this label (see below)
# A plugin job's timeout, moved here from LABEL_TIMEOUT by the worker's LifecycleMiddleware
# before taskiq's receiver sees it: run_plugin_job enforces it with asyncio.timeout, which
# costs a fraction of the anyio cancel scope taskiq opens for LABEL_TIMEOUT. Never sent.
LABEL_RUN_TIMEOUT = "drm_run_timeout"
LABEL_DEDUP = "dedup"  # "1"/"true": keep a dedup key for DRM_DEDUP_TTL_S; N > 1: N seconds
LABEL_SCHEDULE = "schedule_id"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@=+-]{0,254}$")

State = Literal["waiting", "active", "completed", "failed", "delayed"]


def check_id(value: object, field_name: str) -> str:
    """Return ``value`` if it is a valid plugin id, job name or tenant id; raise otherwise."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(field_name, "must be a non-empty string")
    if not _ID.fullmatch(value):
        raise InvalidInputError(
            field_name,
            "must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter"
            f" or digit (got {value[:40]!r})",
        )
    return value


def check_job_id(value: object, field_name: str = "job_id") -> str:
    """Return ``value`` if it is a valid caller-chosen job id; raise otherwise."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise InvalidInputError(
            field_name,
            "must be 1-255 characters of letters, digits and _ . : @ = + -, starting with a"
            " letter or digit",
        )
    return value


def task_name(plugin_id: str, job_name: str) -> str:
    """The taskiq task name of a plugin job."""
    return f"plugin:{plugin_id}:{job_name}"


def check_cron(expression: str, field_name: str = "cron") -> str:
    """Accept five fields, or six with seconds first (BullMQ's form)."""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise InvalidInputError(
            field_name, f"must have 5 fields, or 6 with seconds first (got {expression!r})"
        )
    if not croniter.is_valid(to_croniter(expression)):
        raise InvalidInputError(field_name, f"is not a valid cron expression: {expression!r}")
    try:
        croniter(to_croniter(expression), datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterBadDateError, CroniterBadCronError, ValueError, KeyError):
        raise InvalidInputError(
            field_name, f"never fires (no date matches it): {expression!r}"
        ) from None
    return expression


def to_croniter(expression: str) -> str:
    """croniter wants seconds last; BullMQ (and we) put them first."""
    fields = expression.split()
    if len(fields) == 6:
        return " ".join([*fields[1:], fields[0]])
    return " ".join(fields)


def check_timezone(name: str, field_name: str = "tz") -> str:
    """Return ``name`` if it is a known IANA time zone."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInputError(field_name, f"unknown IANA time zone {name!r}") from None
    return name


class Backoff(BaseModel):
    """How long to wait before the next attempt (milliseconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["exponential", "fixed"] = "fixed"
    delay: int = Field(default=0, ge=0, le=30 * 24 * 3600 * 1000)
    jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    max_delay: int | None = Field(default=None, ge=0)


class JobOptions(BaseModel):
    """Options of a job, with the specification's meanings. Times are in milliseconds.

    ``missed`` and ``overlap`` apply to cron jobs: after downtime run the ``latest`` missed slot
    once or ``skip`` missed slots; ``allow`` overlapping runs or ``skip`` a slot while the previous
    run of the schedule is still waiting or active.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str | None = None
    tz: str = "UTC"
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    attempts: int = Field(default=1, ge=1)
    backoff: Backoff | None = None
    timeout: int | None = Field(default=None, ge=1)
    delay: int = Field(default=0, ge=0, le=365 * 24 * 3600 * 1000)
    job_id: str | None = None
    missed: Literal["latest", "skip"] = "latest"
    overlap: Literal["allow", "skip"] = "allow"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_cron(value)
            except InvalidInputError as exc:
                raise ValueError(exc.rule) from None
        return value

    @field_validator("tz")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            check_timezone(value)
        except InvalidInputError as exc:
            raise ValueError(exc.rule) from None
        return value

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_job_id(value)
            except InvalidInputError as exc:
                raise ValueError(exc.rule) from None
        return value

    @classmethod
    def coerce(
        cls, value: JobOptions | Mapping[str, Any] | None, field_name: str = "options"
    ) -> JobOptions:
        """Accept a JobOptions, a dict with the same keys, or None; raise naming the field."""
        if value is None:
            return cls()
        if isinstance(value, JobOptions):
            return value
        if not isinstance(value, Mapping):
            raise InvalidInputError(field_name, "must be a JobOptions or a dict")
        try:
            return cls.model_validate(dict(value))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            rule = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
            raise InvalidInputError(f"{field_name}.{where}", rule) from None

    def merged(self, override: JobOptions | None) -> JobOptions:
        """These options with the fields explicitly set in ``override`` taking precedence."""
        if override is None:
            return self
        values = self.model_dump()
        values.update(override.model_dump(exclude_unset=True))
        return JobOptions.model_validate(values)

    def labels(self, default_timeout_ms: int) -> dict[str, Any]:
        """The message labels that carry these options."""
        labels: dict[str, Any] = {
            LABEL_PRIORITY: self.priority,
            LABEL_ATTEMPTS: self.attempts,
            LABEL_TIMEOUT: (self.timeout or default_timeout_ms) / 1000,
        }
        if self.delay:
            labels[LABEL_DELAY] = self.delay
        if self.backoff is not None:
            labels[LABEL_BACKOFF_TYPE] = self.backoff.type
            labels[LABEL_BACKOFF_DELAY] = self.backoff.delay
            labels[LABEL_BACKOFF_JITTER] = self.backoff.jitter
            labels[LABEL_BACKOFF_MAX] = self.backoff.max_delay or 0
        return labels


@dataclass(frozen=True, slots=True)
class RetryOptions:
    """The retry-related options of a message, parsed from its labels."""

    attempts: int = 1
    backoff_type: Literal["exponential", "fixed"] = "fixed"
    backoff_delay: int = 0
    backoff_jitter: float = 0.0
    backoff_max: int = 0

    @classmethod
    def from_labels(cls, labels: Mapping[str, Any]) -> RetryOptions:
        """Parse the labels (strings or typed values) set by :meth:`JobOptions.labels`."""
        backoff_type = str(labels.get(LABEL_BACKOFF_TYPE, "fixed"))
        return cls(
            attempts=max(1, int(labels.get(LABEL_ATTEMPTS, 1))),
            backoff_type="exponential" if backoff_type == "exponential" else "fixed",
            backoff_delay=int(labels.get(LABEL_BACKOFF_DELAY, 0)),
            backoff_jitter=float(labels.get(LABEL_BACKOFF_JITTER, 0.0)),
            backoff_max=int(labels.get(LABEL_BACKOFF_MAX, 0)),
        )


def label_int(labels: Mapping[str, Any], key: str, default: int = 0) -> int:
    """An integer label, or ``default`` when absent."""
    value = labels.get(key)
    return default if value is None or value == "" else int(float(value))


@dataclass(slots=True)
class JobStatus:
    """The state of one job, as the specification's JobStatus."""

    id: str
    state: State
    attempts_made: int
    progress: Any = None
    returnvalue: Any = None
    failed_reason: str | None = None
    finished_on: datetime | None = None
    plugin_id: str | None = None
    tenant_id: str | None = None
    job_name: str | None = None
    delayed_until: datetime | None = None
    # when the latest attempt started (BullMQ's processedOn); None before the first one
    processed_on: datetime | None = None


EventState = Literal["completed", "failed", "retrying"]


@dataclass(frozen=True, slots=True)
class JobEvent:
    """How one attempt of a job ended, for the ``on_completed`` / ``on_failed`` callbacks of
    ``register_job``: sent once the outcome is recorded in Redis."""

    job_id: str
    plugin_id: str
    job_name: str
    tenant_id: str
    attempt: int  # the attempt that ended, from 1
    state: EventState  # retrying: another attempt is due
    returnvalue: Any = None  # completed: what the handler returned
    failed_reason: str | None = None  # failed, retrying: the error (secrets masked)
    retry_at: datetime | None = None  # retrying: when the next attempt is due


@dataclass(slots=True)
class JobMetadata:
    """What a ``plugin_runs`` row stores in ``result`` for a job run."""

    job_id: str
    job_name: str
    attempts_made: int
    timestamp: datetime
    data: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """JSON with the specification's camelCase keys (:func:`metadata_body`)."""
        return storable_json(
            metadata_body(
                self.job_id,
                self.job_name,
                self.attempts_made,
                self.timestamp,
                data=self.data,
                extra=self.extra,
            )
        )


def metadata_body(
    job_id: str,
    job_name: str,
    attempts_made: int,
    timestamp: datetime,
    *,
    data: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:class:`JobMetadata` as a dict: the specification's camelCase keys, then ``extra`` (the
    run ledger builds it per row without the object)."""
    body: dict[str, Any] = {
        "jobId": job_id,
        "jobName": job_name,
        "attemptsMade": attempts_made,
        "timestamp": timestamp.isoformat(),
    }
    if data is not None:
        body["data"] = data
    if extra:
        body.update(extra)
    return body


def ms_to_datetime(value: str | int | float | None) -> datetime | None:
    """A millisecond epoch timestamp as an aware UTC datetime."""
    if value in (None, "", False):
        return None
    return datetime.fromtimestamp(int(float(value)) / 1000, tz=UTC)


def storable_json(value: Any) -> str:
    """JSON text PostgreSQL's jsonb accepts: NUL escapes and lone surrogates are replaced."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\\u0000", "\\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


MAX_DEPTH = 64  # nesting levels of job data; deeper data is refused


def _check_json_tree(data: Any, field_name: str) -> None:
    """Refuse what JSON (and PostgreSQL's jsonb) would not keep exactly: non-string keys, NUL
    characters, lone surrogates, non-finite floats, nesting deeper than ``MAX_DEPTH``."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise InvalidInputError(field_name, f"is nested deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidInputError(
                        field_name, f"has a non-string object key {key!r}; JSON keys are strings"
                    )
                _check_text(key, field_name)
                stack.append((item, depth + 1))
        elif isinstance(value, (list, tuple)):
            if depth > MAX_DEPTH:
                raise InvalidInputError(field_name, f"is nested deeper than {MAX_DEPTH} levels")
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value, field_name)


def _check_text(text: str, field_name: str) -> None:
    if "\x00" in text:
        raise InvalidInputError(field_name, "contains a NUL character, which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            field_name, "contains a lone surrogate, which is not valid Unicode text"
        ) from None


def encode_payload(data: Any, max_bytes: int, field_name: str = "data") -> str:
    """``data`` as JSON text, refusing what is not JSON, would not round-trip, or is too large."""
    _check_json_tree(data, field_name)
    try:
        text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(field_name, f"must be JSON-serializable ({exc})") from None
    except RecursionError:
        raise InvalidInputError(field_name, "is nested too deeply to serialize") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidInputError(field_name, f"is {size} bytes as JSON; the limit is {max_bytes}")
    return text
