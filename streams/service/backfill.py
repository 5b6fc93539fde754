"""Backfill: a bucket listing -> synthetic ObjectCreated events on the backfill topic.

The listing is read page by page (never whole), events are published in confirmed chunks,
and the last confirmed key is always known, so an interrupted backfill resumes exactly
with ``--start-after``. Events carry ``"visionstream": {"backfill": true}`` and the
``visionstream-backfill`` header; they go to their own topic, which the worker consumes
with a bounded share of its in-flight batches so live uploads never wait behind them.

The pieces, each doing one thing: ``BackfillPlan`` (what to replay, a value),
``listing`` (the pages, the next one listed while this one is published), ``RateLimit``,
``ChunkPublisher`` / ``DryRun`` (send, and know what the broker confirmed), and
``run_backfill``, which strings them together and returns a ``BackfillProgress`` value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from inference.settings import KafkaSettings, Settings, StorageSettings, TopicSettings
from inference.client.sources import iter_s3_pages
from streams.service.events import BACKFILL_HEADER, encode
from streams.service.kafka import ensure_topics, start_producer
from streams.service.s3events import ObjectRef, object_created_event

CHUNK = 500  # events in flight before we wait for the broker's confirmation
CONFIRM_EVERY_S = 1.0  # ... or this long, so a slow (rate-capped) backfill always knows where it is
SOURCE = "visionstream-backfill"  # the events' requestParameters.sourceIPAddress

Page = list[tuple[str, dict[str, Any]]]  # (key, object summary) as the listing returns them


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    """What to replay and how."""

    bucket: str
    prefix: str
    topic: str
    rate_per_s: float | None = None  # at most this many events a second
    limit: int | None = None  # stop after this many events
    start_after: str | None = None  # resume after this key
    dry_run: bool = False  # count only; publish nothing

    @classmethod
    def parse(cls, uri: str, topic: str, **options: Any) -> BackfillPlan:
        """A plan for ``s3://bucket/prefix``; ValueError if ``uri`` is not one, or a limit is below 1."""
        limit = options.get("limit")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit: a number of events, 1 or more (got {limit})")
        return cls(*parse_s3_uri(uri), topic, **options)

    def reached(self, events: int) -> bool:
        return self.limit is not None and events >= self.limit


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Where a backfill stands: every key up to and including ``last_key`` is confirmed published."""

    published: int = 0
    skipped: int = 0  # objects that are not images (``filter``)
    last_key: str | None = None
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.published / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def listing(plan: BackfillPlan, storage: StorageSettings) -> AsyncIterator[Page]:
    """The listing under the plan's prefix, page by page. boto3 blocks, so each page is listed
    in a thread, and the next one while the caller publishes this one."""
    pages = iter_s3_pages(plan.bucket, plan.prefix, storage, start_after=plan.start_after)
    next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))
    try:
        while (page := await next_page) is not None:
            next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))
            yield page
    finally:
        next_page.cancel()


class RateLimit:
    """At most ``per_s`` events a second, counted from the first; no limit when ``per_s`` is None."""

    def __init__(self, per_s: float | None) -> None:
        self.per_s = per_s
        self.started = time.monotonic()

    async def wait(self, events: int) -> None:
        """Return when the ``events``-th event may go."""
        if self.per_s:
            ahead = events / self.per_s - (time.monotonic() - self.started)
            if ahead > 0:
                await asyncio.sleep(ahead)


class Publisher(Protocol):
    confirmed: int  # events the broker acknowledged (a dry run: events counted)
    last_key: str | None  # the last of them

    async def send(self, ref: ObjectRef) -> None: ...

    async def flush(self) -> None: ...


class ChunkPublisher:
    """Sends backfill events and waits for the broker's confirmation every ``CHUNK`` events or
    ``CONFIRM_EVERY_S``, whichever comes first; ``confirmed`` and ``last_key`` count only
    confirmed events."""

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer, self.topic = producer, topic
        self.confirmed, self.last_key = 0, None
        self._pending: list[asyncio.Future[Any]] = []
        self._pending_last: str | None = None
        self._confirmed_at = time.monotonic()

    async def send(self, ref: ObjectRef) -> None:
        event = encode(object_created_event(ref, SOURCE))
        self._pending.append(await self.producer.send(self.topic, event, key=ref.uri.encode(), headers=[(BACKFILL_HEADER, b"1")]))
        self._pending_last = ref.key
        if len(self._pending) >= CHUNK or time.monotonic() - self._confirmed_at > CONFIRM_EVERY_S:
            await self.flush()

    async def flush(self) -> None:
        """Wait until the broker confirmed every event sent so far."""
        if self._pending:
            await asyncio.gather(*self._pending)
            self.confirmed += len(self._pending)
            self.last_key = self._pending_last
            self._pending.clear()
        self._confirmed_at = time.monotonic()


class DryRun:
    """Counts what would be published."""

    def __init__(self) -> None:
        self.confirmed, self.last_key = 0, None

    async def send(self, ref: ObjectRef) -> None:
        self.confirmed += 1
        self.last_key = ref.key

    async def flush(self) -> None:
        pass


@asynccontextmanager
async def publisher(plan: BackfillPlan, kafka: KafkaSettings, topics: TopicSettings) -> AsyncIterator[Publisher]:
    """A ``DryRun``, or a ``ChunkPublisher`` on its own producer, stopped on the way out."""
    if plan.dry_run:
        yield DryRun()
        return
    await ensure_topics(kafka, topics, [plan.topic])
    producer = await start_producer(kafka)
    try:
        yield ChunkPublisher(producer, plan.topic)
    finally:
        await producer.stop()


def object_ref(bucket: str, key: str, summary: dict[str, Any]) -> ObjectRef:
    """The object a listing entry names, as a backfill event announces it."""
    return ObjectRef(
        bucket, key, etag=str(summary.get("ETag", "")).strip('"') or None,
        size_bytes=summary.get("Size"), event_time=_iso(summary.get("LastModified")), backfill=True,
    )


async def run_backfill(
    plan: BackfillPlan, settings: Settings, on_progress: Callable[[BackfillProgress], None] | None = None
) -> BackfillProgress:
    """Publish one event per image object of the plan's listing; ``on_progress`` sees where the
    backfill stands after each event (what an interrupted caller resumes from)."""
    started = time.monotonic()
    rate = RateLimit(plan.rate_per_s)
    sent = skipped = 0
    async with publisher(plan, settings.kafka, settings.topics) as out:

        def progress() -> BackfillProgress:
            return BackfillProgress(out.confirmed, skipped, out.last_key, time.monotonic() - started)

        async with aclosing(listing(plan, settings.storage)) as pages:
            async for page in pages:
                for key, summary in page:
                    if plan.reached(sent):
                        break
                    if not settings.filter.accepts(key):
                        skipped += 1
                        continue
                    sent += 1
                    await rate.wait(sent)
                    await out.send(object_ref(plan.bucket, key, summary))
                    if on_progress is not None:
                        on_progress(progress())
                if plan.reached(sent):
                    break
        await out.flush()
        return progress()


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)
