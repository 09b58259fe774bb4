"""structlog set-up for drm-taskiq processes. Library code only calls ``structlog.get_logger()``."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

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


def _mask_nested(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: _mask_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value


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
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
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
