"""Clients people use: librdkafka (confluent-kafka) producing notifications and consuming
predictions from a running worker, and the worker's JSON logs following a batch."""

from __future__ import annotations

import json
import time
import uuid

import boto3
from confluent_kafka import Consumer, Producer

from streams.embedded.samples import generate_dataset
from streams.service.events import now_iso
from streams.service.s3events import ObjectRef, object_created_event
from inference.records.results import PREDICTION_SCHEMA

from .conftest import create_topics


def test_a_librdkafka_producer_and_consumer_talk_to_a_running_worker(settings, bucket, tmp_path, start_worker):
    settings = settings.with_overrides({"worker": {"log_format": "json"}})
    create_topics(settings)
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    paths = generate_dataset(tmp_path / "images", 12)
    keys = [path.relative_to(tmp_path / "images").as_posix() for path in paths]
    for path, key in zip(paths, keys, strict=True):
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    worker = start_worker(settings)
    worker.wait_ready()

    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers, "acks": "all"})
    delivered: list[str] = []
    for key in keys:
        event = object_created_event(ObjectRef(bucket, key, event_time=now_iso()))
        producer.produce(settings.topics.uploads, json.dumps(event).encode(), key=key.encode(),
                         on_delivery=lambda err, msg: delivered.append("ok" if err is None else str(err)))
    assert producer.flush(30) == 0 and delivered == ["ok"] * len(keys)

    consumer = Consumer({
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "group.id": f"librdkafka-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe([settings.topics.predictions])
    wanted = {f"s3://{bucket}/{key}" for key in keys}
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 180
    try:
        while not wanted <= seen.keys() and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            event = json.loads(message.value())
            seen[event["uri"]] = event
            assert message.key() == event["uri"].encode()
    finally:
        consumer.close()
    assert wanted <= seen.keys(), worker.log_tail()
    assert all(event["schema"] == PREDICTION_SCHEMA for event in seen.values())

    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    batches = [line for line in lines if line["message"] == "batch classified"]
    assert sum(line["images"] for line in batches) == len(keys)
    assert all(line["offsets"].startswith(settings.topics.uploads) and line["batch"] for line in batches)
