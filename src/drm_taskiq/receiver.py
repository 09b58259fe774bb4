"""drm-taskiq's receiver: taskiq's ``Receiver`` with a cheaper hand-over of leased jobs.

``taskiq worker drm_taskiq.broker:broker --receiver drm_taskiq.receiver:Receiver``

taskiq's ``Receiver.prefetcher`` asks the broker for every message through two new tasks and
two ``asyncio.wait`` calls (a delivery slot, then the next message, each raced against the
shutdown event), so an idle worker's job passes through five turns of the event loop before
taskiq's runner sees it. With ``DrmBroker`` this receiver's prefetcher is one long-lived task
(the pump) that takes a delivery slot and then the next job, directly: jobs the broker has
already leased in a batch come from memory (``DrmBroker.ready_message``), the others from the
broker's ``listen`` (which waits for Redis); no task or wait per job. Shutdown cancels the pump
(a job taken from Redis and not handed out goes back to waiting: ``DrmBroker.listen`` gives
back what it holds when it is closed). Everything else (slots, ``--max-async-tasks``,
``--max-tasks-per-child``, the runner, the callback that runs a job) is taskiq's own code.

With any other broker it is exactly taskiq's ``Receiver``. Measured in bench/
(docs/performance.md): worker CPU per job 5-25% lower, and fewer turns of the event loop from
a job's arrival to its handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio
from taskiq.receiver import Receiver as TaskiqReceiver
from taskiq.receiver import receiver as _taskiq_receiver

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable

    from taskiq import AckableMessage
    from taskiq.receiver.receiver import _PrefetchedMessage, _QueueSignal

    _Queue = asyncio.Queue[_PrefetchedMessage | _QueueSignal]

__all__ = ["Receiver"]

logger = logging.getLogger("taskiq.receiver.receiver")

# What of taskiq's receiver (0.13) the pump relies on: when a taskiq release no longer has it,
# the receiver falls back to taskiq's own prefetcher (slower, same behaviour) instead of failing.
_INTERNALS = (
    hasattr(_taskiq_receiver, "_PrefetchedMessage")
    and hasattr(_taskiq_receiver, "_QueueSignal")
    and hasattr(_taskiq_receiver._QueueSignal, "DONE")
    and all(
        callable(getattr(TaskiqReceiver, name, None))
        for name in ("prefetcher", "_should_stop_prefetch", "_record_listen_error")
    )
)


class Receiver(TaskiqReceiver):
    """taskiq's receiver; with ``DrmBroker``, jobs reach taskiq's runner through one pump
    task instead of a task and a wait per job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready: Callable[[], AckableMessage | None] | None = getattr(
            self.broker, "ready_message", None
        )
        if self._ready is not None and not _INTERNALS:
            logger.warning(
                "drm_taskiq.receiver: this taskiq version's receiver differs from the one it was"
                " built for (0.13); using taskiq's own prefetcher"
            )
            self._ready = None
        if self._ready is not None:
            self.broker.receiver_kind = "drm"  # type: ignore[attr-defined]

    async def prefetcher(self, queue: _Queue, finish_event: asyncio.Event) -> None:
        """taskiq's prefetcher contract (jobs into ``queue``, then ``DONE``; stop at the
        finish event or after ``max_tasks_to_execute``), served by one pump task."""
        if self._ready is None:
            await super().prefetcher(queue, finish_event)
            return
        iterator = self.broker.listen()
        pump = asyncio.create_task(self._pump(iterator, queue, finish_event))
        finish_waiter = asyncio.create_task(finish_event.wait())
        try:
            await asyncio.wait({pump, finish_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()  # the listener's error, if it failed
        finally:
            logger.info("Stopping prefetching messages...")
            with anyio.CancelScope(shield=True):
                try:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pump  # its error (if any) was raised above
                    try:
                        await iterator.aclose()
                    except (asyncio.CancelledError, StopAsyncIteration):
                        pass
                    except BaseException as exc:  # recorded, as taskiq does
                        self._record_listen_error(exc)
                finally:
                    queue.put_nowait(_taskiq_receiver._QueueSignal.DONE)
                    finish_waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await finish_waiter

    async def _pump(
        self,
        iterator: AsyncGenerator[bytes | AckableMessage, None],
        queue: _Queue,
        finish_event: asyncio.Event,
    ) -> None:
        """A delivery slot, then the next job (from memory when the broker already leased it,
        else from its listener), into taskiq's queue; until the broker stops listening."""
        ready = self._ready
        assert ready is not None
        fetched = 0
        while not self._should_stop_prefetch(finish_event, fetched):
            await self.sem_prefetch.acquire()
            try:
                message: bytes | AckableMessage | None = ready()
                if message is None:
                    # The listener goes to Redis next: first let taskiq's runner take the jobs
                    # just queued (one turn) and their callbacks start (a second), so a job
                    # does not wait for the next fetch to be sent (taskiq's own prefetcher
                    # suspends here too).
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    message = ready()
                    if message is None:
                        message = await anext(iterator)
            except StopAsyncIteration:
                self.sem_prefetch.release()
                return
            except BaseException:
                # cancelled while waiting for a job: DrmBroker.listen gives back what it holds
                self.sem_prefetch.release()
                raise
            fetched += 1
            queue.put_nowait(
                _taskiq_receiver._PrefetchedMessage(data=message, owns_delivery_slot=True)
            )
