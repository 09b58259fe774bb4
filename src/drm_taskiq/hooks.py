"""A small hook registry: plugins subscribe handlers to named hooks and the platform emits them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

HookHandler = Callable[..., Awaitable[Any]]

log = structlog.get_logger()


class HookRegistry:
    """Named hooks with async handlers, run in registration order."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[str, HookHandler]]] = {}

    def on(self, hook_name: str, handler: HookHandler, *, plugin_id: str = "") -> None:
        """Subscribe ``handler`` to ``hook_name``. Subscribing the same handler again (equal:
        the same function, or a bound method of the same object) changes nothing: ``on_load``
        runs once per tenant and may subscribe each time, and the handler still runs once per
        emit."""
        handlers = self._handlers.setdefault(hook_name, [])
        if any(known == handler for _, known in handlers):
            return
        handlers.append((plugin_id, handler))

    def off(self, hook_name: str, handler: HookHandler) -> None:
        """Unsubscribe ``handler`` from ``hook_name``."""
        self._handlers[hook_name] = [
            item for item in self._handlers.get(hook_name, []) if item[1] != handler
        ]

    def handlers(self, hook_name: str) -> list[HookHandler]:
        """The handlers subscribed to ``hook_name``."""
        return [handler for _, handler in self._handlers.get(hook_name, [])]

    async def emit(self, hook_name: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run every handler of ``hook_name``; a failing handler is logged and skipped."""
        results = []
        for plugin_id, handler in list(self._handlers.get(hook_name, [])):
            try:
                results.append(await handler(*args, **kwargs))
            except Exception as exc:
                log.error("hook_failed", hook=hook_name, plugin_id=plugin_id, error=repr(exc))
        return results
