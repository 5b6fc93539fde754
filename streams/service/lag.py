"""Consumer-group lag on the input topics: per partition, the group's committed offset, the end
offset and the difference; the total; and the replica count a lag autoscaler (KEDA's Apache
Kafka scaler) would choose. ``GroupLag`` is a value and pure; ``read_lag`` is the adapter.

The rule KEDA's Kafka scaler applies: ``ceil(total lag / lagThreshold)`` replicas, at least one
while there is lag, never more than the partitions that have lag (a consumer beyond them would
hold nothing) nor ``max_replicas``. A partition the group never committed counts from its
first offset, as the worker (``auto_offset_reset: earliest``) would read it.

The default threshold: one stream worker keeps ``batch.max_in_flight`` batches of
``batch.size`` on the cluster (at least two, as the worker does without a cluster to count),
so a lag of that much is one worker's work in hand; more than that per replica is backlog.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from inference.settings import BatchSettings, KafkaSettings
from streams.errors import BrokerUnavailable
from streams.service.kafka import client_options

METADATA_WAIT_S = 15.0


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    start: int  # the first offset still in the log
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.committed if self.committed is not None else self.start))


@dataclass(frozen=True, slots=True)
class GroupLag:
    group: str
    partitions: tuple[PartitionLag, ...]

    @property
    def total(self) -> int:
        return sum(partition.lag for partition in self.partitions)

    def replicas(self, threshold: int, max_replicas: int | None = None) -> int:
        """What a lag scaler with ``threshold`` would run (0 only when nothing is waiting)."""
        if threshold < 1:
            raise ValueError(f"threshold: 1 or more (got {threshold})")
        lagging = sum(1 for partition in self.partitions if partition.lag > 0)
        wanted = min(math.ceil(self.total / threshold), lagging)
        return wanted if max_replicas is None else min(wanted, max_replicas)

    def as_dict(self, threshold: int) -> dict[str, object]:
        return {
            "group": self.group,
            "partitions": [
                {"topic": p.topic, "partition": p.partition, "committed": p.committed, "end": p.end, "lag": p.lag}
                for p in self.partitions
            ],
            "total_lag": self.total,
            "threshold": threshold,
            "replicas": self.replicas(threshold),
        }


def default_threshold(batch: BatchSettings) -> int:
    """One stream worker's work in hand: its batches in flight, full."""
    return batch.size * max(2, batch.max_in_flight)


async def read_lag(kafka: KafkaSettings, group: str, topics: list[str]) -> GroupLag:
    """The group's lag on ``topics`` (every partition), read without joining the group."""
    consumer = AIOKafkaConsumer(**client_options(kafka), group_id=group, enable_auto_commit=False)
    try:
        await consumer.start()
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        await consumer.stop()
        raise BrokerUnavailable(kafka.bootstrap_servers, str(exc) or type(exc).__name__) from exc
    try:
        partitions = [TopicPartition(topic, index) for topic in topics for index in sorted(await _partitions(consumer, topic))]
        if not partitions:
            return GroupLag(group, ())
        starts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        found = []
        for tp in partitions:
            committed = await consumer.committed(tp)
            found.append(PartitionLag(tp.topic, tp.partition, committed, starts.get(tp, 0), ends.get(tp, 0)))
        return GroupLag(group, tuple(found))
    except KafkaError as exc:
        raise BrokerUnavailable(kafka.bootstrap_servers, f"cannot read the lag of group {group!r}: {exc}") from exc
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The topic's partitions; none for a topic that does not exist (it has no lag)."""
    if topic not in await consumer.topics():
        return set()
    deadline = asyncio.get_running_loop().time() + METADATA_WAIT_S
    while (found := consumer.partitions_for_topic(topic)) is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return set(found or ())
