"""Backfill's pieces without S3 or Kafka: the plan, the publishers (a fake producer at the seam), the rate limit."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from streams.service.backfill import CHUNK, BackfillPlan, ChunkPublisher, DryRun, RateLimit, object_ref
from streams.service.events import BACKFILL_HEADER


class Producer:
    """aiokafka's send: returns a future that the broker's acknowledgement resolves."""

    def __init__(self, acknowledge: bool = True) -> None:
        self.acknowledge = acknowledge
        self.sent: list[tuple[str, bytes, list]] = []
        self.futures: list[asyncio.Future[None]] = []

    async def send(self, topic: str, value: bytes, key: bytes, headers: list) -> asyncio.Future[None]:
        self.sent.append((topic, key, headers))
        future = asyncio.get_running_loop().create_future()
        if self.acknowledge:
            future.set_result(None)
        self.futures.append(future)
        return future


def ref(key: str):
    return object_ref("b", key, {"ETag": '"e"', "Size": 3})


def test_a_plan_is_a_value_parsed_from_an_s3_uri():
    plan = BackfillPlan.parse("s3://bucket/some/prefix/", "backfill", limit=3)
    assert (plan.bucket, plan.prefix, plan.topic, plan.limit, plan.dry_run) == ("bucket", "some/prefix/", "backfill", 3, False)
    assert plan.reached(3) and not plan.reached(2) and not BackfillPlan("b", "", "t").reached(10**9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.limit = 4  # type: ignore[misc]
    with pytest.raises(ValueError):
        BackfillPlan.parse("http://bucket/prefix", "backfill")


def test_the_publisher_counts_only_what_the_broker_confirmed():
    async def run() -> None:
        producer = Producer(acknowledge=False)
        out = ChunkPublisher(producer, "topic")
        await out.send(ref("a.jpg"))
        await out.send(ref("b.jpg"))
        assert (out.confirmed, out.last_key) == (0, None)  # sent, not yet acknowledged
        for future in producer.futures:
            future.set_result(None)
        await out.flush()
        assert (out.confirmed, out.last_key) == (2, "b.jpg")
        assert producer.sent[0] == ("topic", b"s3://b/a.jpg", [(BACKFILL_HEADER, b"1")])

    asyncio.run(run())


def test_a_failed_confirmation_moves_nothing_forward():
    async def run() -> None:
        producer = Producer(acknowledge=False)
        out = ChunkPublisher(producer, "topic")
        await out.send(ref("a.jpg"))
        producer.futures[0].set_exception(RuntimeError("broker gone"))
        with pytest.raises(RuntimeError):
            await out.flush()
        assert (out.confirmed, out.last_key) == (0, None)

    asyncio.run(run())


def test_a_full_chunk_is_confirmed_without_being_asked():
    async def run() -> None:
        out = ChunkPublisher(Producer(), "topic")
        for index in range(CHUNK):
            await out.send(ref(f"{index:04d}.jpg"))
        assert (out.confirmed, out.last_key) == (CHUNK, f"{CHUNK - 1:04d}.jpg")

    asyncio.run(run())


def test_a_dry_run_counts_every_event_at_once():
    async def run() -> None:
        out = DryRun()
        await out.send(ref("a.jpg"))
        await out.send(ref("b.jpg"))
        assert (out.confirmed, out.last_key) == (2, "b.jpg")

    asyncio.run(run())


def test_the_rate_limit_holds_events_back_to_the_rate():
    async def run() -> float:
        limit = RateLimit(50)
        for events in range(1, 11):
            await limit.wait(events)
        return time.monotonic() - limit.started

    assert asyncio.run(run()) >= 10 / 50
    unlimited = RateLimit(None)
    asyncio.run(unlimited.wait(10**6))  # returns at once
