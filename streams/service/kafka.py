"""Kafka connection options, topic creation and plain producers/consumers (adapter over aiokafka)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from inference.settings import KafkaSettings, TopicSettings
from streams.errors import BrokerUnavailable

log = logging.getLogger(__name__)


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments: servers and security (SASL / TLS)."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(cafile=kafka.ssl_cafile)
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return options


def all_topics(topics: TopicSettings) -> list[str]:
    return [topics.uploads, topics.backfill, topics.predictions, topics.dead_letter, topics.models]


def new_topic(name: str, topics: TopicSettings) -> NewTopic:
    """How the service creates ``name``: the model topic in one partition (its commands in order),
    compacted (the latest command kept however old); the others with ``topics.partitions``."""
    if name == topics.models:
        return NewTopic(name, 1, topics.replication_factor, topic_configs={"cleanup.policy": "compact"})
    return NewTopic(name, topics.partitions, topics.replication_factor)


async def ensure_topics(kafka: KafkaSettings, topics: TopicSettings, names: list[str] | None = None) -> None:
    """Create the service's topics with the configured partitions; existing ones are left alone."""
    wanted = names or all_topics(topics)
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=15000)
    try:
        await admin.start()
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        raise BrokerUnavailable(kafka.bootstrap_servers, str(exc) or type(exc).__name__) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            try:
                await admin.create_topics([new_topic(name, topics) for name in missing])
                log.info("created topics %s with %d partitions", missing, topics.partitions)
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        raise BrokerUnavailable(kafka.bootstrap_servers, f"cannot create topics {wanted}: {exc}") from exc
    finally:
        await admin.close()


async def start_producer(kafka: KafkaSettings, **extra: Any) -> AIOKafkaProducer:
    """acks=all; idempotent (no duplicates from its own retries) where ``kafka.enable_idempotence``."""
    producer = AIOKafkaProducer(
        **client_options(kafka),
        acks="all",
        linger_ms=5,
        enable_idempotence=kafka.enable_idempotence,
        request_timeout_ms=int(min(kafka.delivery_timeout_s, 30.0) * 1000),
        **extra,
    )
    try:
        await producer.start()
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        await producer.stop()
        hint = " (if the broker has no idempotent producer, set kafka.enable_idempotence: false)" if kafka.enable_idempotence else ""
        raise BrokerUnavailable(kafka.bootstrap_servers, f"{str(exc) or type(exc).__name__}{hint}") from exc
    return producer


async def start_consumer(kafka: KafkaSettings, *topics: str, from_beginning: bool, group: str | None = None) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        *topics,
        **client_options(kafka),
        group_id=group,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=group is not None,
    )
    try:
        await consumer.start()
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        await consumer.stop()
        raise BrokerUnavailable(kafka.bootstrap_servers, str(exc) or type(exc).__name__) from exc
    return consumer


READ_BATCH = 2000  # records per fetch while reading topics whole


class TopicTail:
    """One topic read whole from its start, then followed: no consumer group (every reader sees
    every record). For the model topic: small, compacted."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka, self.topic = kafka, topic
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self, idle_s: float = 2.0) -> list[bytes | None]:
        """The topic's records so far: until ``idle_s`` passes without one (a compacted topic of
        a few records; the embedded broker's end offsets cannot be trusted)."""
        self.consumer = await start_consumer(self.kafka, self.topic, from_beginning=True)
        values: list[bytes | None] = []
        while batch := await self.consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=READ_BATCH):
            values.extend(record.value for records in batch.values() for record in records)
        return values

    async def new(self) -> list[bytes | None]:
        """The records that arrived since the last call (none waited for)."""
        if self.consumer is None:
            return []
        batch = await self.consumer.getmany(timeout_ms=0, max_records=READ_BATCH)
        return [record.value for records in batch.values() for record in records]

    async def stop(self) -> None:
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            await consumer.stop()
ASSIGN_WAIT_S = 30.0  # for the topics' metadata before reading
ENDS_GRACE_S = 30.0  # without a record while the end offsets say more are there: give up on them
POSITION_WAIT_S = 10.0


async def read_topics(
    kafka: KafkaSettings,
    topics: list[str],
    idle_s: float,
    take: Callable[[str, list[Any]], None],
    on_read: Callable[[int], None] | None = None,
    *,
    from_beginning: bool = True,
    limit: int | None = None,
) -> int:
    """Read ``topics`` from their start up to the end offsets the broker gives when reading
    begins, handing each fetched batch to ``take`` (topic, its records: ``partition``, ``offset``,
    ``value``); where the broker
    gives none, until ``idle_s`` passes without a record. Records that arrive meanwhile may be
    read too. Not ``from_beginning``: only records that arrive from now on, until ``idle_s``
    passes without one. Stops once ``limit`` records (or a few more, one fetch's worth) were
    read. Returns how many were read; ``on_read`` sees the count as it grows."""
    consumer = await start_consumer(kafka, *topics, from_beginning=from_beginning)
    read = 0
    try:
        ends = await _end_offsets(consumer) if from_beginning else {}
        quiet_since = time.monotonic()
        while limit is None or read < limit:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=READ_BATCH)
            if not batch:
                if not ends:
                    break  # no end offsets: quiet for idle_s is the end
                if time.monotonic() - quiet_since >= ENDS_GRACE_S:
                    log.warning("the end offsets of %s promise more records, but none came for %.0f s; stopping there", topics, ENDS_GRACE_S)
                    break
                if await _caught_up(consumer, ends):
                    break
                continue
            quiet_since = time.monotonic()
            for partition, records in batch.items():
                take(partition.topic, records)
                read += len(records)
            if on_read is not None:
                on_read(read)
            if ends and await _caught_up(consumer, ends):
                break
    finally:
        await consumer.stop()
    return read


async def _caught_up(consumer: AIOKafkaConsumer, ends: dict[Any, int]) -> bool:
    for partition, end in ends.items():
        try:
            position = await asyncio.wait_for(consumer.position(partition), timeout=POSITION_WAIT_S)
        except (TimeoutError, KafkaError):
            return False  # not known yet: read on (ENDS_GRACE_S bounds it)
        if position < end:
            return False
    return True


async def _end_offsets(consumer: AIOKafkaConsumer) -> dict[Any, int]:
    """The end offsets of every partition assigned; {} where the broker will not say."""
    deadline = time.monotonic() + ASSIGN_WAIT_S
    while not consumer.assignment() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    try:
        return dict(await consumer.end_offsets(list(consumer.assignment())))
    except Exception as exc:  # noqa: BLE001 - then the read stops when the topics go quiet
        log.warning("the broker did not give end offsets (%s); reading until the topics are quiet", exc)
        return {}
