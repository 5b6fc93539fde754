"""Taking batches from a Faust stream: wait for a slot, admit, process, acknowledge in order.

Faust's ``Stream.take`` acks its buffer even when processing raised; ``BatchIntake`` uses
``noack_take`` and acks each event itself, only after its batch's events are published, and per
partition only in offset order (``AckTracker``). While the worker stops (``draining``) or a
rebalance takes its partitions (``revoking``) nothing new starts: what was taken stays
unacknowledged and is consumed again. A batch that cannot be processed is fatal (``fail``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from faust.types import EventT, StreamT

from inference.settings import BatchSettings
from streams.service.capacity import BatchSlots
from streams.service.liveness import LivenessWatch
from streams.service.metrics import StreamMetrics
from streams.service.processing import AckTracker, BatchHandler, InputMessage

Fail = Callable[[BaseException, str], Awaitable[None]]  # the error, what failed: stops the worker


class BatchIntake:
    """The agents' loop and the batches it has in flight (``tasks``)."""

    def __init__(
        self, batch: BatchSettings, handler: BatchHandler, slots: BatchSlots, liveness: LivenessWatch, counters: StreamMetrics, fail: Fail
    ) -> None:
        self.batch = batch
        self.handler = handler
        self.slots = slots
        self.liveness = liveness
        self.counters = counters
        self.fail = fail
        self.acks: AckTracker[EventT] = AckTracker(
            lambda event: event.message.tp, lambda event: event.message.offset, lambda event: event.message.generation_id
        )
        self.draining = False
        self.revoking = False  # from a revoke until the next assignment: no batch starts
        self.tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks

    @property
    def stopped(self) -> bool:
        return self.draining or self.revoking

    async def run(self, stream: StreamT[bytes], priority: int) -> None:
        slots = self.slots.slots[priority]
        async for taken in stream.noack_take(self.batch.size, within=self.batch.linger_s):
            now = time.monotonic()
            for event in taken:
                self.liveness.taken(event.message.tp, event.message.offset, now)
            if self.stopped:
                continue  # left unacknowledged: consumed again after the restart or the rebalance
            await self.slots.acquire(priority)  # backpressure: lag stays in Kafka, memory stays flat
            if self.stopped:
                slots.release()
                continue
            events = self.admit(taken)
            if not events:
                slots.release()
                continue
            task = asyncio.create_task(self.process(stream, events, slots, priority))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def admit(self, taken: list[EventT]) -> list[EventT]:
        """The taken events that may be processed: those taken under the current assignment,
        each once, in offset order (``AckTracker``). The rest were taken before a rebalance;
        their partition's owner, maybe this worker again, consumes them from the committed offset."""
        events = self.acks.started(taken)
        if len(events) < len(taken):
            self.counters.events_fenced(len(taken) - len(events))
        return events

    async def process(self, stream: StreamT[bytes], events: list[EventT], slots: asyncio.Semaphore, priority: int) -> None:
        try:
            messages = [_input_message(event) for event in events]
            await self.handler.handle(messages, priority)
            for event in self.acks.finished(events):
                await stream.ack(event)
            self.counters.batch_completed()
        except asyncio.CancelledError:
            raise  # stopping: nothing acked, the events are consumed again
        except Exception as exc:  # noqa: BLE001
            await self.fail(exc, "batch could not be processed, stopping the worker so nothing is lost")
        finally:
            slots.release()

    async def finish(self, grace_s: float) -> set[asyncio.Task[None]]:
        """Wait up to ``grace_s`` for the batches in flight; those still running."""
        tasks = set(self.tasks)
        if not tasks:
            return set()
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        return pending


def _input_message(event: EventT) -> InputMessage:
    message = event.message
    value = event.value if isinstance(event.value, bytes) else (message.value or b"")
    return InputMessage(
        value=value,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
    )
