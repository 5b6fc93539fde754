"""One batch of input messages -> classified on the cluster -> events published. No Faust here.

``handle_batch`` returns only when every event for the batch has been published (and the
broker confirmed it); the caller acknowledges the input after that. It raises when the
batch could not be processed, and then nothing may be acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from inference.evaluation import percentile
from inference.results import ImageResult
from inference.settings import BatchSettings, FilterSettings, TopicSettings
from streams.errors import MalformedEvent
from streams.events import dead_letter_event, encode, prediction_event
from streams.s3events import ObjectRef, parse_notification

log = logging.getLogger(__name__)

Classify = Callable[[list[str], int], Awaitable[list[ImageResult]]]
Publish = Callable[[str, bytes, bytes], Awaitable[Any]]  # topic, key, value; awaits the broker's ack


@dataclass(frozen=True, slots=True)
class InputMessage:
    value: bytes
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int | None = None

    @property
    def source(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass
class Counters:
    """What the health endpoint reports."""

    events_in: int = 0
    objects_in: int = 0
    skipped: int = 0
    malformed: int = 0
    batches: int = 0
    images_classified: int = 0
    image_errors: int = 0
    batch_retries: int = 0
    in_flight_batches: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def snapshot(self) -> dict[str, Any]:
        data = {name: value for name, value in vars(self).items() if name != "latencies_ms"}
        ordered = sorted(self.latencies_ms)
        data["latency_ms"] = {
            "p50": percentile(ordered, 0.50),
            "p95": percentile(ordered, 0.95),
            "p99": percentile(ordered, 0.99),
            "samples": len(ordered),
        }
        return data


class BatchRetryExhausted(Exception):
    """The cluster kept failing for longer than ``batch.retry_timeout_s``."""


@dataclass
class BatchHandler:
    classify: Classify
    publish: Publish
    batch: BatchSettings
    topics: TopicSettings
    filter: FilterSettings
    counters: Counters = field(default_factory=Counters)

    async def __call__(self, messages: list[InputMessage], priority: int = 0) -> None:
        await self.handle(messages, priority)

    async def handle(self, messages: list[InputMessage], priority: int = 0) -> None:
        """Classify and publish everything in ``messages``; raise rather than lose anything."""
        pending: list[Awaitable[Any]] = []
        work: list[tuple[ObjectRef, InputMessage]] = []
        for message in messages:
            self.counters.events_in += 1
            try:
                notification = parse_notification(message.value, self.filter)
            except MalformedEvent as exc:
                self.counters.malformed += 1
                log.warning("dead-lettering malformed event at %s: %s", message.source, exc.reason)
                event = dead_letter_event("parse", exc.reason, message.value, message.source)
                pending.append(self.publish(self.topics.dead_letter, f"{message.topic}/{message.partition}/{message.offset}".encode(), encode(event)))
                continue
            self.counters.skipped += len(notification.skipped)
            for what, why in notification.skipped:
                log.debug("skipped %s: %s", what, why)
            work.extend((ref, message) for ref in notification.objects)
            self.counters.objects_in += len(notification.objects)
        for start in range(0, len(work), self.batch.size):
            pending.extend(await self._run_batch(work[start : start + self.batch.size], priority))
        await asyncio.gather(*pending)

    async def _run_batch(self, work: list[tuple[ObjectRef, InputMessage]], priority: int) -> list[Awaitable[Any]]:
        batch_id = uuid.uuid4().hex[:16]
        results = await self._classify_with_retry([ref.uri for ref, _ in work], priority)
        self.counters.batches += 1
        sends: list[Awaitable[Any]] = []
        for (ref, message), result in zip(work, results, strict=True):
            key = ref.uri.encode("utf-8")
            if result.error is None:
                self.counters.images_classified += 1
                event = prediction_event(ref, result, batch_id, len(work), message.timestamp_ms)
                if event["latency_ms"] is not None:
                    self.counters.latencies_ms.append(event["latency_ms"])
                sends.append(self.publish(self.topics.predictions, key, encode(event)))
            else:
                self.counters.image_errors += 1
                event = dead_letter_event(
                    result.error.stage, result.error.message, message.value, message.source, uri=ref.uri
                )
                sends.append(self.publish(self.topics.dead_letter, key, encode(event)))
        return sends

    async def _classify_with_retry(self, uris: list[str], priority: int) -> list[ImageResult]:
        deadline = time.monotonic() + self.batch.retry_timeout_s
        pause = self.batch.retry_backoff_s
        self.counters.in_flight_batches += 1
        try:
            while True:
                try:
                    results = await self.classify(uris, priority)
                    if len(results) != len(uris):
                        raise RuntimeError(f"cluster returned {len(results)} results for {len(uris)} images")
                    return results
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried, then the worker stops
                    if time.monotonic() + pause > deadline:
                        raise BatchRetryExhausted(
                            f"batch of {len(uris)} failed for {self.batch.retry_timeout_s:.0f} s: {exc}"
                        ) from exc
                    self.counters.batch_retries += 1
                    log.warning("batch of %d failed (%s); retrying in %.1f s", len(uris), exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 30.0)
        finally:
            self.counters.in_flight_batches -= 1

