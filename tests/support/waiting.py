"""Polling helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Watched(Protocol):
    """A process a wait gives up on when it exits."""

    name: str

    @property
    def returncode(self) -> int | None: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    procs: Sequence[Watched] | None = None,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail on timeout or if a process dies."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        for proc in procs or []:
            if proc.returncode is not None:
                raise AssertionError(
                    f"{proc.name} exited with code {proc.returncode} while waiting for {what}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)


async def key_gone(redis: Any, key: str) -> bool:
    """Whether ``key`` no longer exists in Redis (a wait_until predicate)."""
    return not await redis.exists(key)
