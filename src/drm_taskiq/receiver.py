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
import contextlib
from typing import TYPE_CHECKING, Any

import anyio
from taskiq.receiver import Receiver as TaskiqReceiver
from taskiq.receiver.receiver import _PrefetchedMessage, _PrefetchState, _QueueSignal

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskiq import AckableMessage

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

    async def prefetcher(
        self,
        queue: asyncio.Queue[_PrefetchedMessage | _QueueSignal],
        finish_event: asyncio.Event,
    ) -> None:
        """taskiq's prefetcher, with a shortcut for a message that is ready and a free slot."""
        ready = self._ready
        if ready is None:
            await super().prefetcher(queue, finish_event)
            return
        state = _PrefetchState(iterator=self.broker.listen())
        fetched_tasks = 0
        finish_waiter = asyncio.create_task(finish_event.wait())
        try:
            while not self._should_stop_prefetch(finish_event, fetched_tasks):
                message: bytes | AckableMessage | None = None
                if not self.sem_prefetch.locked():
                    message = ready()
                if message is not None:
                    # a free slot: acquire() returns without suspending
                    await self.sem_prefetch.acquire()
                else:
                    try:
                        message = await self._get_prefetched_message(
                            state, finish_event, finish_waiter
                        )
                    except StopAsyncIteration:
                        break
                    if message is None:
                        continue
                    state.owns_delivery_slot = False
                fetched_tasks += 1
                queue.put_nowait(_PrefetchedMessage(data=message, owns_delivery_slot=True))
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._enqueue_late_prefetched_message(queue, state)
                finally:
                    queue.put_nowait(_QueueSignal.DONE)
                    finish_waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await finish_waiter
