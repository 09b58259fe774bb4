"""drm-taskiq's receiver: taskiq's ``Receiver`` with a cheaper hand-over of leased jobs.

``taskiq worker drm_taskiq.broker:broker --receiver drm_taskiq.receiver:Receiver``

taskiq's ``Receiver.prefetcher`` asks the broker for every message through two new tasks and
two ``asyncio.wait`` calls (a free delivery slot, then the next message, each raced against
the shutdown event). ``DrmBroker`` leases jobs in batches, so most messages are already in
memory when asked for; this receiver takes those directly (``DrmBroker.ready_message``: no
task, no wait) and goes through taskiq's racing path only when the broker has to go to Redis
or every delivery slot is taken. Everything else (slots, ``--max-async-tasks``,
``--max-tasks-per-child``, shutdown, the callback that runs a job) is taskiq's own code.

With any other broker it behaves exactly like taskiq's ``Receiver``. Measured in bench/
(docs/performance.md): worker CPU per job 5-25% lower.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from taskiq.receiver import Receiver as TaskiqReceiver

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskiq import AckableMessage
    from taskiq.receiver.receiver import _PrefetchState

__all__ = ["Receiver"]


class Receiver(TaskiqReceiver):
    """taskiq's receiver; jobs the broker has already leased are handed over without a task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready: Callable[[], AckableMessage | None] | None = getattr(
            self.broker, "ready_message", None
        )
        if self._ready is not None:
            self.broker.receiver_kind = "drm"  # type: ignore[attr-defined]

    async def _get_prefetched_message(
        self,
        state: _PrefetchState,
        finish_event: asyncio.Event,
        finish_waiter: asyncio.Task[bool],
    ) -> bytes | AckableMessage | None:
        """What taskiq's prefetcher asks for each message: a delivery slot, then the next
        message. With a free slot and a message the broker already holds, both are taken here
        at once; otherwise taskiq's own path races them against the shutdown event."""
        if self._ready is not None and not self.sem_prefetch.locked():
            message = self._ready()
            if message is not None:
                await self.sem_prefetch.acquire()  # a free slot: returns without suspending
                state.owns_delivery_slot = True
                return message
        return await super()._get_prefetched_message(state, finish_event, finish_waiter)
