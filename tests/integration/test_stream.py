"""The stream service end to end: S3 events on a real broker -> `visionstream worker` -> Dask -> events."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from inference.client.embedded import embedded_cluster, reaching
from streams.embedded.samples import generate_dataset
from streams.embedded.stack import S3_TEST_CREDENTIALS
from streams.service.events import now_iso
from streams.service.kafka import start_producer
from streams.service.s3events import ObjectRef, object_created_event
from streams.service.uploads import upload_paths
from inference.records.results import PREDICTION_SCHEMA

from .conftest import collect_events, create_topics, drain_topic, plain_scheduler, wait_until


def put_images(settings, tmp_path: Path, count: int, prefix: str = "", bad_files: int = 0) -> set[str]:
    root = tmp_path / f"images-{prefix.strip('/') or 'root'}"
    generate_dataset(root, count, bad_files=bad_files, seed=count)
    asyncio.run(upload_paths([str(root / "Images")], prefix, settings, notify=True))
    return {f"s3://{settings.storage.bucket}/{prefix}{p.relative_to(root).as_posix()}" for p in (root / "Images").rglob("*") if p.is_file()}


def send_raw(settings, payloads: list[bytes | dict]) -> None:
    async def run() -> None:
        producer = await start_producer(settings.kafka)
        try:
            for payload in payloads:
                value = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                await producer.send_and_wait(settings.topics.uploads, value)
        finally:
            await producer.stop()

    asyncio.run(run())


def test_150_uploads_give_exactly_150_predictions_in_batches_of_at_most_60(settings, bucket, tmp_path, start_worker):
    create_topics(settings)
    uris = put_images(settings, tmp_path, 150)  # uploaded before the worker starts: lag is consumed
    worker = start_worker(settings)
    worker.wait_ready()
    assert "libtorch" not in Path(f"/proc/{worker.process.pid}/maps").read_text()  # the model runs on Dask workers only
    events = collect_events(settings, uris)
    assert uris <= events.keys(), worker.log_tail()
    flat = [event for event in drain_topic(settings, settings.topics.predictions) if event["uri"] in uris]  # late duplicates too
    assert all(event["schema"] == PREDICTION_SCHEMA for event in flat)
    assert len(flat) == 150  # one event per image, no duplicates without a failure
    batches: dict[str, int] = {}
    for event in flat:
        batches[event["batch"]["id"]] = event["batch"]["size"]
        assert event["ground_truth"]["wnid"] and event["match"] in (True, False)
        assert event["latency_ms"] > 0 and event["etag"]
    assert max(batches.values()) <= 60 and sum(batches.values()) == 150
    health = worker.health()
    assert health["counters"]["images_classified"] == 150 and health["counters"]["in_flight_batches"] == 0


def test_every_input_shape_and_bad_input(settings, bucket, tmp_path, start_worker):
    create_topics(settings)
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    [image] = generate_dataset(tmp_path / "one", 1)
    body = image.read_bytes()
    keys = {
        "aws": "Images/n02085620-Chihuahua/a dog+plus ünïcode.jpg",
        "minio": "minio/n02085620-Chihuahua/x y.jpg",
        "eventbridge": "eb/n02085620-Chihuahua/é.jpg",
    }
    for key in keys.values():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key="Images/notes.jpg", Body=b"this is text, not a JPEG")
    aws = object_created_event(ObjectRef(bucket, keys["aws"], event_time=now_iso()))
    minio = {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{keys['minio']}",
             "Records": [dict(object_created_event(ObjectRef(bucket, keys["minio"], event_time=now_iso()))["Records"][0], eventName="s3:ObjectCreated:Put")]}
    eventbridge = {"version": "0", "detail-type": "Object Created", "source": "aws.s3", "time": now_iso(),
                   "detail": {"bucket": {"name": bucket}, "object": {"key": "eb/n02085620-Chihuahua/%C3%A9.jpg", "size": len(body)}}}
    not_image = object_created_event(ObjectRef(bucket, "Images/notes.jpg", event_time=now_iso()))
    missing = object_created_event(ObjectRef(bucket, "Images/never-uploaded.jpg", event_time=now_iso()))
    deleted = json.loads(json.dumps(aws))
    deleted["Records"][0]["eventName"] = "ObjectRemoved:Delete"
    send_raw(settings, [b"\x00\x01 not json", {"unexpected": "shape"}, aws, minio, eventbridge, not_image, missing, deleted])

    secret = S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]  # given as a setting: it must reach S3, never logs or events
    worker = start_worker(settings, env={"VISIONSTREAM_STORAGE__SECRET_ACCESS_KEY": secret, "VISIONSTREAM_STORAGE__ACCESS_KEY_ID": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]})
    worker.wait_ready()
    good = {f"s3://{bucket}/{key}" for key in keys.values()}
    failed = {f"s3://{bucket}/Images/notes.jpg", f"s3://{bucket}/Images/never-uploaded.jpg"}
    events = collect_events(settings, good | failed)
    for uri in good:
        [event] = events[uri]
        assert event["schema"] == PREDICTION_SCHEMA and event["ground_truth"]["wnid"] == "n02085620", uri
    assert events[f"s3://{bucket}/Images/notes.jpg"][0]["stage"] == "decode"
    missing_event = events[f"s3://{bucket}/Images/never-uploaded.jpg"][0]
    assert missing_event["stage"] == "fetch" and "not found" in missing_event["reason"]
    assert missing_event["original"]["Records"][0]["s3"]["object"]["key"] == "Images/never-uploaded.jpg"
    malformed = [e for uri, found in events.items() if uri.startswith("message:") for e in found]
    assert sorted(e["stage"] for e in malformed) == ["parse", "parse"]
    assert {e["original"].get("unexpected") for e in malformed} == {None, "shape"}
    # the worker keeps going after bad input
    more = put_images(settings, tmp_path, 3, prefix="after/")
    assert more <= collect_events(settings, more).keys()
    assert secret not in json.dumps(events) and secret not in worker.log_path.read_text() and secret not in json.dumps(worker.health())
    counters = worker.health()["counters"]
    assert counters["malformed"] == 2 and counters["skipped"] == 1 and counters["image_errors"] == 2


def test_a_worker_killed_mid_stream_loses_nothing(settings, bucket, tmp_path, start_worker):
    settings = settings.with_overrides({"batch": {"size": 10, "max_in_flight": 1}})
    create_topics(settings)
    uris = put_images(settings, tmp_path, 90)
    first = start_worker(settings, "first")
    first.wait_ready()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.health()["counters"]["images_classified"] < 20:
        time.sleep(0.2)
    done_before_kill = first.health()["counters"]["images_classified"]
    first.kill()  # SIGKILL: no shutdown, nothing flushed
    assert 0 < done_before_kill < 90, "the kill must land mid-stream"
    second = start_worker(settings.with_overrides({"worker": {"data_dir": str(tmp_path / "second-data")}}), "second")
    second.wait_ready()
    events = collect_events(settings, uris, timeout_s=240)
    missing = uris - events.keys()
    assert not missing, f"{len(missing)} uploads have no prediction\n{second.log_tail()}"
    assert all(found[0]["schema"] == PREDICTION_SCHEMA for found in events.values() if found)


def test_two_workers_in_one_group_share_the_partitions(settings, bucket, tmp_path, start_worker):
    from streams.embedded.stack import free_port

    create_topics(settings)
    one = start_worker(settings, "one")
    two = start_worker(settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(tmp_path / "two-data")}}), "two")
    one.wait_ready()
    two.wait_ready()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for the group to settle: 2 topics x 4 partitions, split
        assigned = (one.health()["assigned_partitions"], two.health()["assigned_partitions"])
        if sum(assigned) == 2 * settings.topics.partitions and min(assigned) > 0:
            break
        time.sleep(0.5)
    assert sum(assigned) == 2 * settings.topics.partitions and min(assigned) > 0, assigned
    uris = put_images(settings, tmp_path, 40)
    events = collect_events(settings, uris)
    assert uris <= events.keys()
    processed = (one.health()["counters"]["objects_in"], two.health()["counters"]["objects_in"])
    assert sum(processed) >= 40 and min(processed) > 0, processed


@pytest.mark.parametrize(
    ("problem", "says"),
    [
        ("scheduler", "Dask cluster tcp://127.0.0.1:"),
        ("idempotence", "set kafka.enable_idempotence: false"),
        ("checkpoint", "cannot load weights"),
    ],
)
@pytest.mark.slow  # three worker processes, one with an embedded cluster: `make test-slow` (CI runs both)
def test_a_worker_that_cannot_start_exits_with_one_clear_line(settings, tmp_path, start_worker, problem, says):
    """An unreachable scheduler, an idempotent producer against a broker without one, a missing
    checkpoint: a non-zero exit, one `visionstream: error:` line that says what to change, and
    no traceback (Faust's and the Dask workers' echoes stay out of the default log)."""
    from streams.embedded.stack import free_port

    create_topics(settings)
    broken = settings.with_overrides({
        "scheduler": {"cluster": {**plain_scheduler(f"tcp://127.0.0.1:{free_port()}"), "connect_timeout_s": 2}},
        "idempotence": {"kafka": {"enable_idempotence": True}},
        "checkpoint": {"cluster": {"scheduler": None, "n_workers": 1}, "model": {"weights": str(tmp_path / "missing.pt")}},
    }[problem])
    if problem == "idempotence" and os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("a real Kafka has an idempotent producer")
    worker = start_worker(broken)
    assert worker.process.wait(180) != 0
    log = worker.log_path.read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("visionstream: error:")]
    assert len(errors) == 1 and says in errors[0], log[-3000:]
    assert "Traceback" not in log and "Event loop is closed" not in log, log[-3000:]


@pytest.mark.slow  # about a minute here: `make test-slow` (CI runs both)
def test_a_dask_worker_lost_mid_batch_loses_nothing(settings, bucket, tmp_path, start_worker):
    """The Dask worker process dies mid-batch; its nanny restarts it, the scheduler reruns the
    task there (the model plugin is sent to the new worker), and every upload still gets its event."""
    import os as os_module
    import signal

    from distributed import Client

    with embedded_cluster(settings.cluster.model_copy(update={"gpu": False})) as cluster:
        settings = settings.with_overrides({"cluster": reaching(cluster), "batch": {"size": 20}})
        create_topics(settings)
        uris = put_images(settings, tmp_path, 60)
        worker = start_worker(settings)
        worker.wait_ready()
        deadline = time.monotonic() + 120
        while worker.health()["counters"]["in_flight_batches"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.health()["counters"]["in_flight_batches"] > 0, "the kill must land while a batch is on the worker"
        with Client(cluster) as client:
            [pid] = client.run(os_module.getpid).values()
        os_module.kill(pid, signal.SIGKILL)
        events = collect_events(settings, uris, timeout_s=240)
        assert uris <= events.keys(), worker.log_tail()
        assert all(found[0]["schema"] == PREDICTION_SCHEMA for uri, found in events.items() if uri in uris)


@pytest.mark.slow  # about a minute here: `make test-slow` (CI runs both)
def test_a_join_and_a_graceful_leave_while_batches_run_duplicate_nothing(settings, bucket, tmp_path, start_worker):
    """Each group change revokes every member's partitions (an eager rebalance). A member first
    lets its batches in flight finish and commits them (streams.service.rebalance), so neither a
    joining worker nor one leaving on SIGTERM makes any image be predicted twice."""
    import threading

    from streams.embedded.stack import free_port

    settings = settings.with_overrides({"batch": {"size": 10, "linger_s": 0.3}, "worker": {"shutdown_grace_s": 60}})
    create_topics(settings)
    one = start_worker(settings, "one")
    one.wait_ready()
    uris: set[str] = set()

    def upload_rounds() -> None:
        for round_ in range(8):
            uris.update(put_images(settings, tmp_path, 30, prefix=f"round-{round_}/"))

    uploads = threading.Thread(target=upload_rounds)
    uploads.start()
    wait_until(lambda: one.health()["counters"]["images_classified"] >= 30, 120, "the first batches", one.log_tail)
    two = start_worker(settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(tmp_path / "two-data")}}), "two")
    two.wait_ready()
    wait_until(lambda: two.health()["counters"]["images_classified"] >= 10, 120, "the joined worker to classify", two.log_tail)
    one.stop()  # SIGTERM: a graceful leave, while two has batches running
    uploads.join()
    events = collect_events(settings, uris)
    assert uris <= events.keys(), two.log_tail()
    predicted = Counter(event["uri"] for event in drain_topic(settings, settings.topics.predictions) if event["uri"] in uris)
    assert len(predicted) == len(uris) == 240
    assert [uri for uri, count in predicted.items() if count > 1] == [], (one.log_tail(), two.log_tail())
