"""The classify agents: take a batch of upload events, hand it to the cluster, publish, then ack.

Two agents share the cluster: ``classify_uploads`` for live uploads and ``classify_backfill``
for replayed ones. Backfill holds at most ``worker.backfill_share`` of the batches in flight
and its tasks run at a lower Dask priority, so a live upload never waits behind a backfill.

Faust's ``Stream.take`` acks its buffer even when processing raised; we use ``noack_take``
and ack each event ourselves, only after its batch's events are published. A batch that
cannot be processed (the cluster unreachable past ``batch.retry_timeout_s``, the broker
refusing our events) crashes the worker, which exits non-zero for its supervisor to restart:
the unacknowledged events are then consumed again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import faust
from faust.types import EventT, StreamT

from inference.cluster import InferenceCluster
from inference.settings import Settings
from streams.app import create_app
from streams.processing import BatchHandler, Counters, InputMessage

log = logging.getLogger(__name__)

LIVE_PRIORITY, BACKFILL_PRIORITY = 10, 0


class StreamService:
    """The stream worker: a Faust app, its agents, the cluster client and the counters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.counters = Counters()
        self.cluster = InferenceCluster.from_settings(settings)
        topics = settings.topics
        self.uploads = self.app.topic(topics.uploads, partitions=topics.partitions)
        self.backfill = self.app.topic(topics.backfill, partitions=topics.partitions)
        self.outputs = {
            name: self.app.topic(name, partitions=topics.partitions) for name in (topics.predictions, topics.dead_letter)
        }
        self.handler = BatchHandler(
            classify=self.cluster.classify,
            publish=self.publish,
            batch=settings.batch,
            topics=topics,
            filter=settings.filter,
            counters=self.counters,
        )
        in_flight = settings.batch.max_in_flight
        self.live_slots = asyncio.Semaphore(in_flight)
        self.backfill_slots = asyncio.Semaphore(max(1, math.floor(in_flight * settings.worker.backfill_share)))
        self._cluster_started: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        self.assigned = 0
        self._register()

    def _register(self) -> None:
        app = self.app
        app.agent(self.uploads, name="classify_uploads")(self._live_agent)
        app.agent(self.backfill, name="classify_backfill")(self._backfill_agent)

        @app.page("/health")
        async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            return web.json(self.health())

        @app.on_partitions_assigned.connect
        async def on_assigned(app: Any, assigned: set[Any], **kwargs: Any) -> None:
            inputs = (self.settings.topics.uploads, self.settings.topics.backfill)
            self.assigned = sum(1 for tp in assigned if tp.topic in inputs)

    async def _live_agent(self, stream: StreamT[bytes]) -> None:
        await self.run_agent(stream, self.live_slots, LIVE_PRIORITY)

    async def _backfill_agent(self, stream: StreamT[bytes]) -> None:
        await self.run_agent(stream, self.backfill_slots, BACKFILL_PRIORITY)

    async def run_agent(self, stream: StreamT[bytes], slots: asyncio.Semaphore, priority: int) -> None:
        batch = self.settings.batch
        await self.ensure_cluster()
        async for events in stream.noack_take(batch.size, within=batch.linger_s):
            await slots.acquire()  # backpressure: lag stays in Kafka, memory stays flat
            task = asyncio.create_task(self._process(stream, list(events), slots, priority))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, stream: StreamT[bytes], events: list[EventT], slots: asyncio.Semaphore, priority: int) -> None:
        try:
            messages = [_input_message(event) for event in events]
            await self.handler.handle(messages, priority)
            for event in events:
                await stream.ack(event)
        except asyncio.CancelledError:
            raise  # stopping: nothing acked, the events are consumed again
        except Exception as exc:  # noqa: BLE001
            log.critical("batch could not be processed, stopping the worker so nothing is lost: %s", exc)
            await self.app.crash(exc)
        finally:
            slots.release()

    async def ensure_cluster(self) -> None:
        """Connect to (or start) the Dask cluster once, shared by both agents."""
        if self._cluster_started is None:
            self._cluster_started = asyncio.ensure_future(self.cluster.start())
        try:
            await asyncio.shield(self._cluster_started)
        except Exception as exc:
            log.critical("cannot start: %s", exc)
            await self.app.crash(exc)
            raise

    async def publish(self, topic: str, key: bytes, value: bytes) -> Any:
        """Send, and return only once the broker has the event."""
        delivery = await self.outputs[topic].send(key=key, value=value, force=True)
        return await delivery

    @property
    def ready(self) -> bool:
        """The cluster is up and this worker has input partitions."""
        started = self._cluster_started
        cluster_up = started is not None and started.done() and not started.cancelled() and started.exception() is None
        return cluster_up and self.assigned > 0

    def health(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "starting",
            "cluster": self.cluster.address,
            "assigned_partitions": self.assigned,
            "counters": self.counters.snapshot(),
        }


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
