"""Kafka connection options, topic creation and plain producers/consumers (adapter over aiokafka)."""

from __future__ import annotations

import logging
import ssl
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
    return [topics.uploads, topics.backfill, topics.predictions, topics.dead_letter]


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
                await admin.create_topics(
                    [NewTopic(name, topics.partitions, topics.replication_factor) for name in missing]
                )
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
