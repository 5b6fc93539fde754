"""`visionstream lag` against the real broker: a consumer group partway through the uploads topic."""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.service.kafka import client_options, start_producer

from .conftest import create_topics, visionstream, write_config


def test_lag_shows_a_group_partway_through_the_uploads_topic(settings, tmp_path):
    """Committed offsets set by hand, half of each partition: the command reports them, the ends
    (the embedded broker's agreed with the 40 events sent here; its end offsets are known to be
    unreliable elsewhere), the lag between and the replicas a scaler at 7 per replica would run."""
    create_topics(settings)
    topic, group = settings.topics.uploads, settings.kafka.consumer_group

    async def half_consumed() -> dict[int, int]:
        producer = await start_producer(settings.kafka)
        try:
            for index in range(40):
                await producer.send_and_wait(topic, b"{}", key=str(index).encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**client_options(settings.kafka), group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or await _wait_partitions(consumer, topic))]
            ends = await consumer.end_offsets(tps)
            consumer.assign(tps)
            committed = {tp.partition: ends[tp] // 2 for tp in tps}
            await consumer.commit({tp: committed[tp.partition] for tp in tps})
            return committed
        finally:
            await consumer.stop()

    committed = asyncio.run(half_consumed())
    done = visionstream("lag", "--json", "--threshold", "7", "--config", str(write_config(settings, tmp_path / "c.yaml")))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    uploads = [p for p in report["partitions"] if p["topic"] == topic]
    assert {p["partition"]: p["committed"] for p in uploads} == committed
    assert sum(p["end"] for p in uploads) == 40
    assert all(p["lag"] == p["end"] - p["committed"] for p in uploads)
    assert report["total_lag"] == sum(p["lag"] for p in report["partitions"]) == 40 - sum(committed.values())
    lagging = sum(1 for p in report["partitions"] if p["lag"])
    assert report["replicas"] == min(-(-report["total_lag"] // 7), lagging)
    text = visionstream("lag", "--config", str(tmp_path / "c.yaml"))
    assert text.returncode == 0 and f"group {group}: total lag {report['total_lag']}" in text.stdout


async def _wait_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()
    for _ in range(100):
        if (found := consumer.partitions_for_topic(topic)) is not None:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no partitions for {topic}")


def test_a_worker_holding_no_partition_asks_for_a_rebalance_then_fails_livez_when_nobody_takes_the_events(settings, monkeypatch):
    """The orphaned-partitions watch on the real broker: events on the uploads topic, a group
    that commits nothing, this worker holding no partition. The group's offsets are read as
    `visionstream lag` reads them; the rebalance request itself (Faust's consumer thread) is the
    one thing replaced here, since no member runs."""
    from streams.service import liveness
    from streams.service.agents import StreamService

    create_topics(settings)

    async def run() -> tuple[list[object], tuple[bool, str]]:
        producer = await start_producer(settings.kafka)
        try:
            for index in range(12):
                await producer.send_and_wait(settings.topics.uploads, b"{}", key=str(index).encode())
        finally:
            await producer.stop()
        service = StreamService(settings.with_overrides({"worker": {"stall_s": 0.5}}))
        asked: list[object] = []

        async def rejoin(consumer: object) -> None:
            asked.append(consumer)

        monkeypatch.setattr(liveness, "_request_rejoin", rejoin)
        await service.liveness.watch_group(service.app, service.assigned)  # first sight: the window starts
        assert not asked and service.live()[0]
        await asyncio.sleep(0.6)
        await service.liveness.watch_group(service.app, service.assigned)  # still for a window: ask the group
        assert len(asked) == 1 and service.live()[0]
        await asyncio.sleep(0.6)
        await service.liveness.watch_group(service.app, service.assigned)  # still, a window after asking
        return asked, service.live()

    asked, (alive, why) = asyncio.run(run())
    assert len(asked) == 1 and not alive and "taken by no member of the group" in why and settings.topics.uploads in why
