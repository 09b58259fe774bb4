"""Secret values of plugin configuration, and their removal from logs, errors and run rows.

A value in ``tenant_plugins.config`` is secret when its key is ``password``, ``token``,
``secret``, ``api_key`` or ends with ``_password``, ``_token``, ``_secret`` or ``_key`` (at any
depth). Plugin code receives such values in ``ctx.config`` as they are; everything the platform
writes (structlog events, ``failed_reason``, ``plugin_runs.error`` and ``result``) has them
replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_SECRET_KEY = re.compile(r"^(password|token|secret|api_key)$|_(password|token|secret|key)$", re.I)
MIN_LENGTH = 4  # shorter values would mask ordinary words

_known: set[str] = set()
_pattern: re.Pattern[str] | None = None


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret."""
    return bool(_SECRET_KEY.search(key))


def secret_values(config: Any) -> list[str]:
    """The secret string values in a (nested) config."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, str) and is_secret_key(str(key)):
                found.append(value)
            elif isinstance(value, (dict, list)):
                found.extend(secret_values(value))
    elif isinstance(config, list):
        for item in config:
            found.extend(secret_values(item))
    return found


def remember(values: Iterable[str]) -> None:
    """Add secret values that :func:`redact` must remove from now on (this process)."""
    global _pattern  # noqa: PLW0603  (process-wide, like the logging configuration)
    new = {v for v in values if len(v) >= MIN_LENGTH} - _known
    if not new:
        return
    _known.update(new)
    ordered = sorted(_known, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def active() -> bool:
    """Whether any secret value is remembered (:func:`redact` would change some text)."""
    return _pattern is not None


def redact(text: str) -> str:
    """``text`` with every remembered secret value replaced by ``***``."""
    if _pattern is None or not text:
        return text
    return _pattern.sub("***", text)


def forget_all() -> None:
    """Forget every remembered secret (tests)."""
    global _pattern  # noqa: PLW0603
    _known.clear()
    _pattern = None
