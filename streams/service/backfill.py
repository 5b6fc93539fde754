"""Backfill: a bucket listing -> synthetic ObjectCreated events on the backfill topic.

The listing is read page by page (never whole), events are published in confirmed chunks,
and the last confirmed key is always known, so an interrupted backfill resumes exactly
with ``--start-after``. Events carry ``"visionstream": {"backfill": true}`` and the
``visionstream-backfill`` header; they go to their own topic, which the worker consumes
with a bounded share of its in-flight batches so live uploads never wait behind them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.settings import Settings
from inference.sources import iter_s3_pages
from streams.service.events import BACKFILL_HEADER, encode
from streams.service.kafka import ensure_topics, start_producer
from streams.service.s3events import ObjectRef, object_created_event

CHUNK = 500  # events in flight before we wait for the broker's confirmation
CONFIRM_EVERY_S = 1.0  # ... or this long, so a slow (rate-capped) backfill always knows where it is


@dataclass
class BackfillProgress:
    published: int = 0
    skipped: int = 0
    last_key: str | None = None  # every key up to and including this one is confirmed published
    started: float = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.published / elapsed if elapsed > 0 else 0.0


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


async def run_backfill(
    uri: str,
    settings: Settings,
    topic: str | None = None,
    rate: float | None = None,
    limit: int | None = None,
    start_after: str | None = None,
    dry_run: bool = False,
    progress: BackfillProgress | None = None,
    on_event: Callable[[BackfillProgress], None] | None = None,
) -> BackfillProgress:
    bucket, prefix = parse_s3_uri(uri)
    topic = topic or settings.topics.backfill
    state = progress or BackfillProgress()
    state.started = time.monotonic()
    producer = None
    if not dry_run:
        await ensure_topics(settings.kafka, settings.topics, [topic])
        producer = await start_producer(settings.kafka)
    pending: list[Any] = []
    chunk_last: str | None = None
    counted = 0
    confirmed_at = time.monotonic()
    pages = iter_s3_pages(bucket, prefix, settings.storage, start_after=start_after)
    next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))  # list the next page while publishing this one
    try:
        while (page := await next_page) is not None and (limit is None or counted < limit):
            next_page = asyncio.ensure_future(asyncio.to_thread(next, pages, None))
            for key, summary in page:
                if limit is not None and counted >= limit:
                    break
                if not settings.filter.accepts(key):
                    state.skipped += 1
                    continue
                counted += 1
                if rate:
                    ahead = counted / rate - (time.monotonic() - state.started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if producer is None:
                    state.published += 1
                    state.last_key = key
                else:
                    ref = ObjectRef(
                        bucket, key, etag=str(summary.get("ETag", "")).strip('"') or None,
                        size_bytes=summary.get("Size"), event_time=_iso(summary.get("LastModified")),
                        backfill=True,
                    )
                    pending.append(await producer.send(topic, encode(object_created_event(ref, "visionstream-backfill")),
                                                       key=ref.uri.encode(), headers=[(BACKFILL_HEADER, b"1")]))
                    chunk_last = key
                    if len(pending) >= CHUNK or time.monotonic() - confirmed_at > CONFIRM_EVERY_S:
                        await _confirm(pending, state, chunk_last)
                        confirmed_at = time.monotonic()
                if on_event is not None:
                    on_event(state)
        if pending:
            await _confirm(pending, state, chunk_last)
        next_page.cancel()
    finally:
        if producer is not None:
            await producer.stop()
    return state


async def _confirm(pending: list[Any], state: BackfillProgress, last_key: str | None) -> None:
    await asyncio.gather(*pending)
    state.published += len(pending)
    state.last_key = last_key
    pending.clear()


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)
