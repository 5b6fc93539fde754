"""One batch of input messages -> classified on the cluster -> events published. No Faust here.

``BatchHandler.handle`` returns only when every event for the batch has been published (and
the broker confirmed it); the caller acknowledges the input after that, through an
``AckTracker`` so that a partition's offsets are acknowledged in order. ``handle`` raises
only when the batch could not be processed for longer than ``batch.retry_timeout_s`` or a
publish failed; then nothing may be acknowledged.

Failures, and what becomes of them:
  - a message that is not a readable notification, whatever its bytes: a dead letter
    (stage ``parse``) for that message alone;
  - an object that cannot be fetched or decoded: a dead letter for that image (``fetch``,
    ``decode``); the rest of its batch is classified;
  - an image whose batch keeps killing Dask workers: the batch is split until the image
    is alone, and only it is dead-lettered (``worker``), once workers died with it alone on
    them twice (the scheduler's record, ``inference.client.deaths``: the same for every stream
    worker, and kept across their restarts); while one stream worker isolates, the others
    hold their new batches (a cluster-wide lease), so that a suspect really runs alone;
  - a batch past ``batch.timeout_s``: split like a batch that kills workers, so that an image
    that will not finish ends alone; it is dead-lettered (``decode``) once it timed out alone
    twice while other images were classified (a cluster that stalls as a whole convicts none);
  - anything else (cluster unreachable, a failed forward pass, storage down): transient; the
    batch is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from inference.records.results import Failure, ImageResult
from inference.settings import BatchSettings, EventSettings, FilterSettings, ReviewSettings, TopicSettings
from streams.errors import MalformedEvent
from streams.service.attempts import BatchAttempts, Classify
from streams.service.events import dead_letter_event, encode, encode_dead_letter, prediction_event
from streams.service.isolation import Isolation, NoLedger, PoisonIsolation
from streams.service.metrics import StreamMetrics
from streams.service.s3events import ObjectRef, parse_notification

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bytes], Awaitable[Any]]  # topic, key, value; awaits the broker's ack

MAX_WARNED_BUCKETS = 1000


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


def offset_ranges(messages: Iterable[InputMessage]) -> str:
    """``topic/partition:first-last`` per partition, the input a batch came from."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for message in messages:
        span = ranges.setdefault((message.topic, message.partition), [message.offset, message.offset])
        span[0], span[1] = min(span[0], message.offset), max(span[1], message.offset)
    return ",".join(f"{topic}/{partition}:{first}-{last}" for (topic, partition), (first, last) in sorted(ranges.items()))


Item = TypeVar("Item")


class AckTracker(Generic[Item]):
    """Acknowledge each partition's messages in offset order, never past one still in work,
    and never a message taken under an assignment that has since been revoked.

    ``started`` registers messages as they are consumed (in order) and returns those that may
    be processed; ``finished`` marks some done and returns those that may now be acknowledged:
    per partition, the done prefix. A batch that completes before an earlier one on the same
    partition waits for it, so a committed offset never covers a message whose events were not
    published. Pure.

    Rebalances: Kafka's consumer revokes the whole assignment on every rebalance, and a message
    fetched before the revoke can still come out of a stream's buffer after it. Such a message
    belongs to an earlier generation of the group: ``started`` refuses it (its partition's new
    owner, maybe this worker again, consumes it from the committed offset), and a batch of them
    already in work acknowledges nothing when it finishes (``revoked`` forgot it). Within a
    generation a partition's offsets only grow: an offset at or below one already tracked is
    refused too, so a copy re-fetched behind the original never lets the original's
    acknowledgement run ahead of it.
    """

    def __init__(
        self,
        partition_of: Callable[[Item], Hashable],
        offset_of: Callable[[Item], int],
        generation_of: Callable[[Item], int | None] | None = None,
    ) -> None:
        self._partition_of, self._offset_of, self._generation_of = partition_of, offset_of, generation_of
        self._pending: dict[Hashable, deque[list[Any]]] = {}  # partition -> [[item, done], ...] in consumption order
        self._entries: dict[tuple[Hashable, int], list[Any]] = {}
        self._tail: dict[Hashable, int] = {}  # partition -> the highest offset tracked in this generation
        self.generation: int | None = None  # the assignment's; None between a revoke and the next assignment

    def _key(self, item: Item) -> tuple[Hashable, int]:
        return self._partition_of(item), self._offset_of(item)

    def assigned(self, generation: int | None) -> None:
        """A new assignment: messages of this generation may start."""
        self.generation = generation

    def revoked(self, partitions: Iterable[Hashable]) -> None:
        """A rebalance began: nothing taken so far may start, and what is in work on
        ``partitions`` is never acknowledged (it will be consumed again)."""
        self.generation = None
        self.forget(partitions)

    def current(self, item: Item) -> bool:
        """Taken under the current assignment (always, where generations are not tracked)."""
        if self._generation_of is None:
            return True
        return self.generation is not None and self._generation_of(item) == self.generation

    def started(self, items: Iterable[Item]) -> list[Item]:
        """Track ``items``; returns those that may be processed, in order. Refused: messages of
        an earlier generation, and offsets at or below what their partition already tracked."""
        accepted: list[Item] = []
        for item in items:
            if not self.current(item):
                continue
            partition, offset = key = self._key(item)
            if key in self._entries or offset <= self._tail.get(partition, -1):
                continue  # the same message again, or behind what this generation already took
            entry = [item, False]
            self._pending.setdefault(partition, deque()).append(entry)
            self._entries[key] = entry
            self._tail[partition] = offset
            accepted.append(item)
        return accepted

    def finished(self, items: Iterable[Item]) -> list[Item]:
        touched = set()
        for item in items:
            entry = self._entries.get(self._key(item))
            if entry is not None and entry[0] is item:  # not a copy tracked after a revoke
                entry[1] = True
                touched.add(self._partition_of(item))
        ready: list[Item] = []
        for partition in touched:
            queue = self._pending.get(partition)
            while queue and queue[0][1]:
                item = queue.popleft()[0]
                self._entries.pop(self._key(item), None)
                ready.append(item)
            if queue is not None and not queue:
                del self._pending[partition]
        return ready

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Partitions taken away by a rebalance: their messages will be consumed again elsewhere."""
        for partition in partitions:
            for entry in self._pending.pop(partition, ()):
                self._entries.pop(self._key(entry[0]), None)
            self._tail.pop(partition, None)

    def waiting(self) -> int:
        return len(self._entries)

    def oldest_waiting(self) -> dict[Hashable, int]:
        """Per partition, the offset of the oldest message still in work."""
        return {partition: self._offset_of(queue[0][0]) for partition, queue in self._pending.items() if queue}


@dataclass
class BatchHandler:
    classify: Classify
    publish: Publish
    batch: BatchSettings
    topics: TopicSettings
    filter: FilterSettings
    events: EventSettings = field(default_factory=EventSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    counters: StreamMetrics = field(default_factory=StreamMetrics)
    cluster: Isolation = field(default_factory=NoLedger)
    _warned_buckets: set[str] = field(default_factory=set, init=False, repr=False)
    isolation: PoisonIsolation = field(init=False, repr=False)

    def __post_init__(self) -> None:
        attempts = BatchAttempts(self.classify, self.batch, self.counters, self.cluster)
        self.isolation = PoisonIsolation(attempts, self.batch, self.counters, self.cluster)

    async def handle(self, messages: list[InputMessage], priority: int = 0) -> None:
        """Classify and publish everything in ``messages``; raise rather than lose anything."""
        pending: list[Awaitable[Any]] = []
        work: list[tuple[ObjectRef, InputMessage]] = []
        for message in messages:
            refs = self._read(message, pending)
            work.extend((ref, message) for ref in refs)
        for start in range(0, len(work), self.batch.size):
            pending.extend(await self._run_batch(work[start : start + self.batch.size], priority))
        await asyncio.gather(*pending)
        await self.isolation.published([ref.target for ref, _ in work])  # what isolating them found is no longer needed

    def _read(self, message: InputMessage, pending: list[Awaitable[Any]]) -> tuple[ObjectRef, ...]:
        """The objects one message announces; a dead letter (queued on ``pending``) if it is unreadable."""
        self.counters.event_consumed(message.topic)
        try:
            notification = parse_notification(message.value, self.filter, self.events)
        except MalformedEvent as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the stream either
            log.exception("parser failed on the message at %s", message.source)
            reason = f"unreadable notification: {type(exc).__name__}"
        else:
            for skipped in notification.skipped:
                self.counters.object_skipped(skipped.reason)
                log.debug("skipped %r: %s", skipped.what, skipped.detail)
                if skipped.bucket is not None:
                    self._warn_bucket(skipped.bucket)
            self.counters.objects_announced(len(notification.objects))
            return notification.objects
        self.counters.message_malformed()
        log.warning("dead-lettering the message at %s: %r", message.source, reason)
        key = f"{message.topic}/{message.partition}/{message.offset}".encode()
        pending.append(self._dead_letter(key, "parse", reason, message))
        return ()

    def _warn_bucket(self, bucket: str) -> None:
        """Once per bucket (for the first 1,000 buckets): events for it arrive and are skipped."""
        if bucket in self._warned_buckets or len(self._warned_buckets) >= MAX_WARNED_BUCKETS:
            return
        self._warned_buckets.add(bucket)
        allowed = ", ".join(self.filter.buckets) or "none"
        log.warning(
            "skipping uploads to bucket %r: only %s allowed. To classify them, add it to filter.buckets "
            "(VISIONSTREAM_FILTER__BUCKETS) or set storage.bucket; skipped objects are counted in "
            "visionstream_events_skipped_total{reason=\"bucket_not_allowed\"}", bucket, allowed,
        )

    def _dead_letter(self, key: bytes, stage: str, reason: str, message: InputMessage, ref: ObjectRef | None = None) -> Awaitable[Any]:
        """Publish one dead letter carrying (a capped copy of) the message it came from."""
        event = dead_letter_event(
            stage, reason, message.value, message.source, original_max_bytes=self.events.dead_letter_original_bytes,
            **({"uri": ref.uri, "etag": ref.etag, "version": ref.version} if ref is not None else {}),
        )
        return self.publish(self.topics.dead_letter, key, encode_dead_letter(event))

    async def _run_batch(self, work: list[tuple[ObjectRef, InputMessage]], priority: int) -> list[Awaitable[Any]]:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        outcomes = await self.isolation.classify([ref.target for ref, _ in work], priority)
        classified = [outcome for outcome in outcomes if isinstance(outcome, ImageResult)]
        self.counters.batch_classified(len(work), time.perf_counter() - started, classified[0].timings if classified else None)
        if classified:
            self.counters.model(classified[0].model)
        sends: list[Awaitable[Any]] = []
        failed = 0
        for (ref, message), outcome in zip(work, outcomes, strict=True):
            key = ref.uri.encode("utf-8")
            error = outcome if isinstance(outcome, Failure) else outcome.error
            if error is None:
                try:
                    event = prediction_event(ref, outcome, batch_id, len(work), message.timestamp_ms)  # type: ignore[arg-type]
                    value = encode(event)
                except (ValueError, TypeError, OverflowError) as exc:  # a NaN score, say: this image alone
                    error = Failure("inference", f"the result cannot be published: {exc}")
                else:
                    margin = outcome.margin  # type: ignore[union-attr]
                    low = margin is not None and margin < self.review.margin
                    self.counters.image_predicted(
                        event["latency_ms"], backfill=ref.backfill, version=outcome.model.version, match=outcome.match,  # type: ignore[union-attr]
                        confidence=outcome.prediction.score if outcome.prediction else None, low_margin=low,  # type: ignore[union-attr]
                    )
                    sends.append(self.publish(self.topics.predictions, key, value))
                    if low and self.review.enabled:  # for people to label: acknowledged only once it is there too
                        sends.append(self.publish(self.topics.review, key, value))
                    continue
            failed += 1
            self.counters.image_failed(error.stage)
            sends.append(self._dead_letter(key, error.stage, error.message, message, ref))
        log.info("batch classified", extra={
            "batch": batch_id, "offsets": offset_ranges(message for _, message in work), "images": len(work),
            "predictions": len(work) - failed, "dead_letters": failed, "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        })
        return sends

