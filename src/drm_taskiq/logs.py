"""structlog set-up for drm-taskiq processes. Library code only calls ``structlog.get_logger()``."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TextIO

import orjson
import structlog
from structlog.contextvars import merge_contextvars

from drm_taskiq import redaction
from drm_taskiq.redaction import redact

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?P<head>(?:^|[?&;\s])(?:password|passwd|pwd|secret|token)=)[^&\s]+", re.IGNORECASE
)


def mask_secrets(text: str) -> str:
    """``text`` with URL passwords, ``password=...`` values and plugin config secrets masked."""
    # Cheap substring tests first: this runs on every string of every log event.
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(r"\g<head>***", text)
    return redact(text)


def _drop_secrets(
    _: Any, __: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    # mask_secrets() only for strings it could change: a URL, a "key=value", or any string
    # while plugin config secrets are remembered (replacing values keeps the dict's size).
    secrets = redaction.active()
    for key, value in event_dict.items():
        if isinstance(value, str):
            if secrets or "://" in value or "=" in value:
                event_dict[key] = mask_secrets(value)
        elif isinstance(value, (dict, list)):
            event_dict[key] = _mask_nested(value)
    return event_dict


def _render_json(logger: Any, method_name: str, event_dict: structlog.typing.EventDict) -> str:
    """The JSON line of an event: level, timestamp, traceback, masked secrets, rendered.

    The same as structlog's add_log_level, TimeStamper(fmt="iso", utc=True), format_exc_info,
    _drop_secrets and JSONRenderer in a row, in one processor: workers write two lines per job,
    and the separate steps cost a third more."""
    event_dict["level"] = _LEVELS.get(method_name, method_name)
    event_dict["timestamp"] = _utc_now_iso()
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    return _dumps(_drop_secrets(logger, method_name, event_dict))


_LEVELS = {"warn": "warning", "exception": "error"}
_SECOND: list[Any] = [-1, ""]  # the last second formatted, and its text


def _utc_now_iso() -> str:
    """The time as TimeStamper(fmt="iso", utc=True) writes it ("2026-11-28T23:20:10.123456Z",
    always with microseconds); the date and time of day are formatted once per second, which
    costs half of a datetime's isoformat on every line."""
    now = time.time()
    second = int(now)
    if second != _SECOND[0]:
        _SECOND[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_SECOND[1]}.{int((now - second) * 1_000_000):06d}Z"


def _json_fallback(value: Any) -> Any:
    """What JSONRenderer writes for a value JSON has no type for."""
    method = getattr(value, "__structlog__", None)
    return method() if callable(method) else repr(value)


_JSON = json.JSONEncoder(default=_json_fallback).encode


def _dumps(event_dict: structlog.typing.EventDict) -> str:
    """The event as JSON: orjson (about a tenth of the standard library's cost; workers write
    two lines per job), or the standard library for what orjson refuses (keys that are not
    strings, integers beyond 64 bits)."""
    try:
        return orjson.dumps(event_dict, default=_json_fallback).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _JSON(event_dict)


def _mask_nested(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: _mask_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value


class LoopBufferedLogger:
    """structlog's PrintLogger, written in batches: at most ``FLUSH_AFTER_S`` after a line.

    Lines logged while an event loop runs are kept here and written together, in one write
    and flush: a worker logs two lines per job and a producer one, and a system call for each
    was a measurable share of their time (``PYTHONUNBUFFERED``, common in containers, makes
    every write to stderr a system call). The write is due ``FLUSH_AFTER_S`` after the previous
    one: when that time has passed already (a quiet process) the lines are written in the
    loop's next pass, without a timer of their own (waking an idle process for a timer costs
    more than the write); otherwise a timer writes them when it is due, so that under load one
    write carries the lines of ``FLUSH_AFTER_S``. Without a running loop a line is written at
    once, after what is pending. The standard library's log records go through the same object
    (it is the handler's stream), so lines keep their order. What is pending is written at exit
    (``atexit``, and multiprocessing's exit hook in taskiq's worker processes); a killed process
    loses at most the lines of its last ``FLUSH_AFTER_S``.
    """

    FLUSH_AFTER_S = 0.005
    MAX_PENDING = 512  # lines; written at once beyond that

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._written_at = float("-inf")  # loop time of the last write
        atexit.register(self.flush)
        self._register_process_exit()

    def _register_process_exit(self) -> None:
        """Forked worker processes leave through os._exit (no atexit); multiprocessing runs its
        own finalizers first."""
        with contextlib.suppress(Exception):
            from multiprocessing import util  # noqa: PLC0415

            util.Finalize(self, LoopBufferedLogger.flush, args=(self,), exitpriority=1)

    def msg(self, message: str) -> None:
        """Log one line."""
        self._pending.append(message)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(self._pending) >= self.MAX_PENDING:
            self.flush()
        elif self._scheduled_on is not loop:
            self._scheduled_on = loop
            wait = self._written_at + self.FLUSH_AFTER_S - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush_on, loop)
            else:
                loop.call_soon(self._flush_on, loop)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    def write(self, text: str) -> int:
        """The stream interface, for the standard library's StreamHandler (whole records,
        each ending with a newline)."""
        if text:
            self.msg(text.removesuffix("\n"))
        return len(text)

    def _flush_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._written_at = loop.time()
        self.flush()

    def flush(self) -> None:
        """Write what is pending."""
        self._scheduled_on = None
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            self._file.write(text)
            self._file.flush()


def configure_logging(
    log_format: str = "json", level: str = "INFO", *, cache: bool = False
) -> None:
    """Configure structlog and the standard library to write one event per line to stderr.

    ``cache``: each module's logger binds its configuration once, at its first event (structlog's
    ``cache_logger_on_first_use``), instead of at every event; for processes that configure
    logging once, before their first event, and log on the hot path (workers). Without it a
    later ``configure_logging`` (tests) reaches every logger."""
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,  # before masking: tracebacks can hold secrets
        _drop_secrets,
    ]
    chain: list[structlog.typing.Processor] = (
        [*shared, renderer] if log_format == "console" else [merge_contextvars, _render_json]
    )
    output = _output_for(sys.stderr)
    wrapper = structlog.make_filtering_bound_logger(logging.getLevelName(level))
    factory = _shared(output)
    structlog.configure(
        processors=chain,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    global _DIRECT  # noqa: PLW0603  (the set-up log_info checks against)
    _DIRECT = (
        None
        if log_format == "console"
        else _JsonSetUp(chain, wrapper, factory, info_enabled(level))
    )
    handler: logging.StreamHandler[Any] = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        ),
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # taskiq's receiver logs every execution at INFO ("Executing task ..."); our own job_started
    # says the same with the job's identity, so taskiq's INFO lines are noise on the hot path.
    logging.getLogger("taskiq.receiver.receiver").setLevel(max(logging.WARNING, root.level))


_OUTPUT: list[LoopBufferedLogger] = []  # the logger of the last configure_logging call


class _JsonSetUp(NamedTuple):
    """The JSON set-up of a configure_logging call, as given to structlog."""

    chain: list[Any]
    wrapper_class: Any
    logger_factory: Callable[..., LoopBufferedLogger]
    info_enabled: bool


_DIRECT: _JsonSetUp | None = None  # the last configure_logging call's (None: console)


def info_enabled(level: str) -> bool:
    """Whether events at INFO pass the level ``level`` ("DEBUG", "INFO", ...)."""
    number = logging.getLevelName(level.upper())
    return not isinstance(number, int) or number <= logging.INFO


def log_info(event: str, **fields: Any) -> None:
    """``structlog.get_logger().info(event, **fields)``, for the events logged for every job
    (``job_enqueued`` in the caller's process, ``job_started`` and ``job_succeeded`` in the
    worker).

    While structlog is configured as :func:`configure_logging` left it with the JSON format
    (the same processor list, unchanged, the same wrapper class and logger factory), the line is
    made by the same two processors and written to the same output directly: structlog's
    per-call steps (a bound logger assembled per event without ``cache``, the level method, the
    processor loop) cost a producer about a tenth of its time per ``kiq``
    (docs/performance.md). The line is the same, field for field and in the same order. Any
    other configuration (the console format, one made by the application, or
    ``structlog.testing.capture_logs``, which edits the processor list in place) gets the event
    through structlog as usual."""
    config = structlog.get_config()
    direct = _DIRECT
    chain = config["processors"]
    if direct is None:
        structlog.get_logger().info(event, **fields)
        return
    own_chain, wrapper_class, logger_factory, enabled = direct
    if (
        chain is not own_chain
        or config["wrapper_class"] is not wrapper_class
        or config["logger_factory"] is not logger_factory
        or len(chain) != 2
        or chain[0] is not merge_contextvars
        or chain[1] is not _render_json
    ):
        structlog.get_logger().info(event, **fields)
        return
    if not enabled:
        return
    fields["event"] = event
    output = logger_factory()
    output.msg(_render_json(output, "info", merge_contextvars(output, "info", fields)))


def _output_for(stream: TextIO) -> LoopBufferedLogger:
    """One LoopBufferedLogger per stream: configuring again (tests, a second call) keeps the
    pending lines in order and registers no further exit hooks; a new stream (pytest swaps
    stderr) gets a new one, after what the previous one holds is written."""
    if _OUTPUT and _OUTPUT[0]._file is stream:
        return _OUTPUT[0]
    if _OUTPUT:
        _OUTPUT.pop().flush()
    _OUTPUT.append(LoopBufferedLogger(stream))
    return _OUTPUT[0]


def _shared(logger: LoopBufferedLogger) -> Callable[..., LoopBufferedLogger]:
    """A structlog logger factory that always returns ``logger`` (its state is shared)."""

    def factory(*_: Any) -> LoopBufferedLogger:
        return logger

    return factory
