"""structlog set-up for drm-taskiq processes. Library code only calls ``structlog.get_logger()``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog

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
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
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
    event_dict = _STAMP(logger, method_name, event_dict)
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    secrets = redaction.active()
    for key, value in event_dict.items():
        if type(value) is str:
            if secrets or "://" in value or "=" in value:
                event_dict[key] = mask_secrets(value)
        elif isinstance(value, (dict, list)):
            event_dict[key] = _mask_nested(value)
    return _JSON(event_dict)


_LEVELS = {"warn": "warning", "exception": "error"}
_STAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _json_fallback(value: Any) -> Any:
    """What JSONRenderer writes for a value JSON has no type for."""
    method = getattr(value, "__structlog__", None)
    return method() if callable(method) else repr(value)


_JSON = json.JSONEncoder(default=_json_fallback).encode


def _mask_nested(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: _mask_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value


class LoopBufferedLogger:
    """structlog's PrintLogger, written once per turn of the event loop instead of once per line.

    Lines logged while an event loop runs go into the stream's buffer and are flushed by a
    callback at the end of the loop's turn: a worker logs two lines per job, and a write system
    call for each was a measurable share of its time. Without a running loop each line is
    written at once. Python flushes ``sys.stderr`` when a process exits (taskiq's worker
    processes too); a killed process loses at most the lines of its last turn.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._binary = getattr(file, "buffer", None)
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def msg(self, message: str) -> None:
        """Write one line."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._binary is None:
            self._file.write(message + "\n")
            self._file.flush()
            return
        self._binary.write((message + "\n").encode("utf-8", "backslashreplace"))
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled_on = None
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the standard library to write one event per line to stderr."""
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
        [*shared, renderer]
        if log_format == "console"
        else [structlog.contextvars.merge_contextvars, _render_json]
    )
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=_shared(LoopBufferedLogger(sys.stderr)),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
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


def _shared(logger: LoopBufferedLogger) -> Callable[..., LoopBufferedLogger]:
    """A structlog logger factory that always returns ``logger`` (its state is shared)."""

    def factory(*_: Any) -> LoopBufferedLogger:
        return logger

    return factory
