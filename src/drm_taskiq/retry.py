"""The retry policy: given a failed attempt, retry at time T or fail. Pure; no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from drm_taskiq.errors import UnrecoverableError
from drm_taskiq.options import RetryOptions


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt: ``retry`` after ``delay_ms``, or ``fail``."""

    action: str  # "retry" | "fail"
    delay_ms: int = 0
    reason: str = ""


def backoff_delay(
    attempts_made: int,
    options: RetryOptions,
    *,
    rand: Callable[[], float] = random.random,
) -> int:
    """Milliseconds to wait after the ``attempts_made``-th failed attempt (1-based).

    fixed: ``delay``; exponential: ``delay * 2 ** (attempts_made - 1)`` (BullMQ's formula).
    With jitter j, the wait is drawn uniformly from ``[wait * (1 - j), wait]``. ``backoff_max``
    (when > 0) bounds the result.
    """
    if options.backoff_type == "exponential":
        wait = options.backoff_delay * 2 ** max(attempts_made - 1, 0)
    else:
        wait = options.backoff_delay
    if options.backoff_max > 0:
        wait = min(wait, options.backoff_max)
    if options.backoff_jitter > 0 and wait > 0:
        wait = int(wait * (1 - options.backoff_jitter * rand()))
    return int(wait)


def decide(
    attempts_made: int,
    error: BaseException,
    options: RetryOptions,
    *,
    unrecoverable: tuple[type[BaseException], ...] = (),
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Decide after the ``attempts_made``-th attempt (1-based, this one included) failed.

    ``attempts`` counts every try including the first, so ``attempts=3`` allows two retries.
    An :class:`UnrecoverableError` (or a type in ``unrecoverable``) fails at once.
    """
    reason = describe(error)
    if isinstance(error, (UnrecoverableError, *unrecoverable)):
        return Decision("fail", reason=reason)
    if attempts_made >= options.attempts:
        return Decision("fail", reason=reason)
    return Decision(
        "retry", delay_ms=backoff_delay(attempts_made, options, rand=rand), reason=reason
    )


def describe(error: BaseException) -> str:
    """A one-line description of ``error`` for ``failed_reason`` and ``plugin_runs.error``."""
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name
