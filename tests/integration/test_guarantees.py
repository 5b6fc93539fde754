"""The guarantees, against real services: hostile input, exact keys, allowlisted buckets,
deadlines, a stalled and a restarted cluster, and a graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import boto3
import pytest

from streams.embedded.samples import generate_dataset
from streams.embedded.stack import S3_TEST_CREDENTIALS, start_dask_scheduler, start_dask_worker
from streams.service.events import now_iso
from streams.service.kafka import start_consumer
from streams.service.s3events import ObjectRef, object_created_event
from inference.records.results import PREDICTION_SCHEMA

from .conftest import collect_events, create_topics, drain_topic, plain_scheduler, wait_until
from .test_stream import put_images, send_raw


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def notification(bucket: str, key: str) -> dict[str, Any]:
    return object_created_event(ObjectRef(bucket, key, event_time=now_iso()))


def test_hostile_messages_exact_keys_and_foreign_buckets_never_stop_the_worker(settings, bucket, tmp_path, start_worker):
    create_topics(settings)
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    [image] = generate_dataset(tmp_path / "one", 1)
    body = image.read_bytes()
    exact = ["Images/[x].jpg", "Images/what?.jpg", "Images/a?versionId=1.jpg", "Images/star*.jpg"]
    for key in ["Images/a.jpg", "Images/b.jpg", "private/doc", *exact]:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    foreign = f"{bucket}-foreign"
    s3.create_bucket(Bucket=foreign)
    s3.put_object(Bucket=foreign, Key="Images/secret.jpg", Body=body)
    hostile: list[bytes | dict] = [
        b'{"Records": "\\udfff"}',  # a lone surrogate
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json
        json.dumps({"Records": [dict(notification(bucket, "Images/a.jpg")["Records"][0], eventTime=12)]}).encode(),
        json.dumps(notification(bucket, "Images/a.jpg")).replace('"size": null', '"size": 1e400').encode(),
        bytes(range(128, 256)) * 6000,  # ~760 KB, not UTF-8
        notification(bucket, "private/doc::x.jpg"),  # would read private/doc through fsspec's chaining
        notification(bucket, "Images/*.jpg"),  # would glob the bucket
        notification(foreign, "Images/secret.jpg"),  # a bucket the credentials can read, but not ours
    ]
    send_raw(settings, hostile)
    uris = put_images(settings, tmp_path, 20)
    send_raw(settings, [notification(bucket, key) for key in exact])
    worker = start_worker(settings)
    pid = worker.wait_ready() and worker.process.pid
    wanted = uris | {f"s3://{bucket}/{key}" for key in exact} | {f"s3://{bucket}/Images/*.jpg"}
    events = collect_events(settings, wanted)
    for uri in uris | {f"s3://{bucket}/{key}" for key in exact}:
        assert [event["schema"] for event in events[uri]] == [PREDICTION_SCHEMA], (uri, worker.log_tail())
    [glob] = events[f"s3://{bucket}/Images/*.jpg"]  # read as a key, which does not exist
    assert glob["stage"] == "fetch" and "not found" in glob["reason"]
    # collect_events stops once every wanted URI has an event; a parse dead letter (no URI) may still be on its way
    parse_failures = [e for e in drain_topic(settings, settings.topics.dead_letter) if e.get("uri") is None]
    assert len(parse_failures) == 6 and {e["stage"] for e in parse_failures} == {"parse"}
    assert any("::" in e["reason"] for e in parse_failures)
    assert not any(uri.startswith(f"s3://{foreign}/") for uri in events), "a foreign bucket was fetched"
    health = worker.health()
    assert worker.process.poll() is None and worker.process.pid == pid  # never crashed, never restarted
    assert health["counters"]["skipped"] == 1 and health["counters"]["malformed"] == 6
    metrics = urllib.request.urlopen(worker.url.replace("/health", "/metrics"), timeout=2).read().decode()
    assert 'visionstream_events_skipped_total{reason="bucket_not_allowed"} 1.0' in metrics
    assert 'visionstream_dead_letters_total{stage="parse"} 6.0' in metrics
    assert f"visionstream_images_predicted_total {len(uris) + len(exact)}.0" in metrics
    assert 'visionstream_dead_letters_total{stage="fetch"} 1.0' in metrics
    assert f"visionstream_batch_size_images_sum {len(uris) + len(exact) + 1}.0" in metrics  # every fetched image in a batch
    assert f"visionstream_batches_total {health['counters']['batches']}.0" in metrics and health["counters"]["batches"] >= 1
    assert 'visionstream_model_info{device="cpu",name="resnet18",precision="fp32",version="random:seed=0",weights="none"} 1.0' in metrics


def test_a_stalled_worker_is_reported_and_its_batch_is_cancelled_and_retried(settings, bucket, tmp_path, start_worker):
    """SIGSTOP the Dask worker mid-batch: the batch misses its deadline and is retried, /livez
    and /readyz fail once nothing completes for worker.stall_s, and all recover on SIGCONT."""
    env = os.environ | S3_TEST_CREDENTIALS
    scheduler = start_dask_scheduler(tmp_path)
    dask_worker = start_dask_worker(f"tcp://127.0.0.1:{scheduler.port}", tmp_path, env=env)
    try:
        settings = settings.with_overrides({
            "cluster": plain_scheduler(f"tcp://127.0.0.1:{scheduler.port}"),
            "batch": {"size": 10, "timeout_s": 4, "retry_backoff_s": 0.2},
            "worker": {"stall_s": 3},
        })
        create_topics(settings)
        worker = start_worker(settings)
        worker.wait_ready()
        livez, readyz = worker.url.replace("/health", "/livez"), worker.url.replace("/health", "/readyz")
        assert status(livez) == 200 and status(readyz) == 200
        os.kill(dask_worker.pid, signal.SIGSTOP)
        uris = put_images(settings, tmp_path, 10)
        wait_until(lambda: status(livez) == 503, 60, "/livez to report the stall", worker.log_tail)
        assert status(readyz) == 503
        wait_until(lambda: worker.health()["counters"]["batch_retries"] >= 1, 60, "the hung batch to be retried", worker.log_tail)
        os.kill(dask_worker.pid, signal.SIGCONT)
        events = collect_events(settings, uris)
        assert uris <= events.keys(), worker.log_tail()
        wait_until(lambda: status(livez) == 200 and status(readyz) == 200, 60, "recovery", worker.log_tail)
    finally:
        os.kill(dask_worker.pid, signal.SIGCONT)
        dask_worker.stop()
        scheduler.stop()


@pytest.mark.slow  # about a minute here: `make test-slow` (CI runs both)
def test_a_scheduler_restart_mid_stream_loses_nothing_and_the_model_comes_back(settings, bucket, tmp_path, start_worker):
    env = os.environ | S3_TEST_CREDENTIALS
    scheduler = start_dask_scheduler(tmp_path / "first")
    address = f"tcp://127.0.0.1:{scheduler.port}"
    dask_worker = start_dask_worker(address, tmp_path / "first", env=env)
    try:
        settings = settings.with_overrides({"cluster": plain_scheduler(address), "batch": {"size": 10}})
        create_topics(settings)
        worker = start_worker(settings)
        worker.wait_ready()
        readyz = worker.url.replace("/health", "/readyz")
        before = put_images(settings, tmp_path, 10, prefix="before/")
        assert before <= collect_events(settings, before).keys()
        os.kill(scheduler.pid, signal.SIGKILL)  # and the Dask worker goes when its scheduler does
        dask_worker.stop()
        wait_until(lambda: status(readyz) == 503, 60, "/readyz to report the lost cluster", worker.log_tail)
        after = put_images(settings, tmp_path, 20, prefix="after/")  # waits in Kafka meanwhile
        scheduler = start_dask_scheduler(tmp_path / "second", port=scheduler.port)
        dask_worker = start_dask_worker(address, tmp_path / "second", env=env)  # as a supervisor would
        events = collect_events(settings, after, timeout_s=240)
        assert after <= events.keys(), worker.log_tail()
        assert all(found[0]["schema"] == PREDICTION_SCHEMA for uri, found in events.items() if uri in after)
        assert worker.process.poll() is None
        wait_until(lambda: status(readyz) == 200, 60, "/readyz to recover", worker.log_tail)
    finally:
        dask_worker.stop()
        scheduler.stop()


@pytest.mark.slow  # about a minute here: `make test-slow` (CI runs both)
def test_sigterm_lets_in_flight_batches_finish_and_a_restart_duplicates_nothing(settings, bucket, tmp_path, start_worker):
    settings = settings.with_overrides({"batch": {"size": 10, "max_in_flight": 2}, "topics": {"partitions": 1}, "worker": {"shutdown_grace_s": 60}})
    create_topics(settings)
    uris = put_images(settings, tmp_path, 60)
    first = start_worker(settings, "first")
    first.wait_ready()
    wait_until(lambda: (first.health() or {}).get("counters", {}).get("in_flight_batches", 0) > 0, 120, "a batch in flight", first.log_tail)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0, first.log_tail()
    second = start_worker(settings.with_overrides({"worker": {"data_dir": str(tmp_path / "second-data")}}), "second")
    second.wait_ready()
    assert uris <= collect_events(settings, uris, timeout_s=240).keys(), second.log_tail()
    wait_until(lambda: second.health()["counters"]["in_flight_batches"] == 0, 60, "the second worker to be idle")
    predictions = [e["uri"] for e in drain_topic(settings, settings.topics.predictions)]
    duplicates = {uri for uri in predictions if predictions.count(uri) > 1}
    assert sorted(predictions) == sorted(uris) and not duplicates, f"{len(duplicates)} duplicated"


def committed_offset(settings, topic: str) -> int:
    from aiokafka import TopicPartition

    async def run() -> int:
        consumer = await start_consumer(settings.kafka, from_beginning=True, group=settings.kafka.consumer_group)
        try:
            return await consumer.committed(TopicPartition(topic, 0)) or 0
        finally:
            await consumer.stop()

    return asyncio.run(run())


@pytest.mark.slow  # about a minute here: `make test-slow` (CI runs both)
def test_a_commit_never_covers_an_earlier_batch_still_in_flight(settings, bucket, tmp_path, start_worker):
    """One partition, two batches in flight; the first hangs on a stopped Dask worker while the
    second finishes on another. After a commit has certainly happened (a control event on the
    backfill topic is committed), SIGKILL: a restart must still predict the first batch."""
    from distributed import Client

    env = os.environ | S3_TEST_CREDENTIALS
    # one task per thread: the second batch waits for a free thread instead of queueing on the stopped worker
    scheduler = start_dask_scheduler(tmp_path, env=os.environ | {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"})
    address = f"tcp://127.0.0.1:{scheduler.port}"
    stuck = start_dask_worker(address, tmp_path / "stuck", threads=1, env=env)
    other = None
    try:
        settings = settings.with_overrides({
            "cluster": plain_scheduler(address),
            "batch": {"size": 5, "max_in_flight": 2, "timeout_s": 600, "linger_s": 30},  # full batches of 5, never partial
            "topics": {"partitions": 1},
        })
        create_topics(settings)
        first = start_worker(settings, "first")
        first.wait_ready()
        os.kill(stuck.pid, signal.SIGSTOP)
        early = put_images(settings, tmp_path, 5, prefix="early/")  # offsets 0-4: onto the stopped worker
        wait_until(lambda: first.health()["counters"]["events_in"] == 5, 60, "the first batch in flight", first.log_tail)
        assert first.health()["counters"]["in_flight_batches"] == 1
        other = start_dask_worker(address, tmp_path / "other", threads=1, env=env)
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        late = put_images(settings, tmp_path, 5, prefix="late/")  # offsets 5-9: onto the running worker
        assert late <= collect_events(settings, late, timeout_s=180).keys(), first.log_tail()
        control = put_images(settings.with_overrides({"topics": {"uploads": settings.topics.backfill}}), tmp_path, 5, prefix="control/")
        assert control <= collect_events(settings, control, timeout_s=120).keys()
        wait_until(lambda: committed_offset(settings, settings.topics.backfill) >= 1, 60, "a commit after the later batch", first.log_tail)
        first.kill()
        assert not early & collect_events(settings, early, timeout_s=1).keys(), "the first batch finished: nothing was tested"
        assert committed_offset(settings, settings.topics.uploads) == 0
        second = start_worker(settings.with_overrides({"worker": {"data_dir": str(tmp_path / "second-data")}}), "second")
        os.kill(stuck.pid, signal.SIGKILL)
        second.wait_ready()
        assert early <= collect_events(settings, early, timeout_s=240).keys(), second.log_tail()
    finally:
        for process in (stuck, other):
            if process is not None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                process.stop()
        scheduler.stop()
