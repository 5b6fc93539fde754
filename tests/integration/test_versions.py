"""Every object version gets its own record: version-pinned reads and `visionstream reconcile`,
on the real broker, S3 server, Dask cluster and `visionstream worker`."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import boto3
import pytest

from inference.records.results import SUPERSEDED
from streams.embedded.samples import generate_dataset
from streams.service.events import now_iso
from streams.service.s3events import ObjectRef, object_created_event
from streams.service.uploads import upload_paths

from .conftest import collect_events, create_topics, drain_topic, visionstream, write_config
from .test_stream import send_raw

KEY = "Images/n02085620-Chihuahua/twice.jpg"


def test_two_quick_uploads_to_one_key_get_the_records_of_their_own_bytes(settings, tmp_path, start_worker):
    """The first upload is not an image, the second is. Read unpinned, both events would be
    predictions of the second object's bytes."""
    plain, versioned = settings.storage.bucket, f"{settings.storage.bucket}-versioned"
    settings = settings.with_overrides({"filter": {"buckets": [plain, versioned]}})
    create_topics(settings)
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    [image] = generate_dataset(tmp_path / "one", 1)
    events = []
    for bucket in (plain, versioned):
        s3.create_bucket(Bucket=bucket)
        if bucket == versioned:
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        for body in (b"the first upload: not an image", image.read_bytes()):
            put = s3.put_object(Bucket=bucket, Key=KEY, Body=body)
            ref = ObjectRef(bucket, KEY, etag=put["ETag"].strip('"'), version=put.get("VersionId"), event_time=now_iso())
            events.append(object_created_event(ref))
    send_raw(settings, events)
    worker = start_worker(settings)
    worker.wait_ready()
    uris = {f"s3://{plain}/{KEY}", f"s3://{versioned}/{KEY}"}
    collect_events(settings, uris)
    records = {uri: [] for uri in uris}
    for topic in (settings.topics.predictions, settings.topics.dead_letter):
        for record in drain_topic(settings, topic):
            records[record["uri"]].append(record)
    first, second = (event["Records"][0]["s3"]["object"] for event in events[:2])
    by_etag = {record["etag"]: record for record in records[f"s3://{plain}/{KEY}"]}
    assert len(records[f"s3://{plain}/{KEY}"]) == 2, worker.log_tail()
    assert by_etag[first["eTag"]]["stage"] == "fetch" and by_etag[first["eTag"]]["reason"] == SUPERSEDED
    assert by_etag[second["eTag"]]["schema"].startswith("visionstream.prediction")
    v1, v2 = (event["Records"][0]["s3"]["object"]["versionId"] for event in events[2:])
    by_version = {record["version"]: record for record in records[f"s3://{versioned}/{KEY}"]}
    assert len(records[f"s3://{versioned}/{KEY}"]) == 2
    assert by_version[v1]["stage"] == "decode"  # its own bytes, read though overwritten
    assert by_version[v2]["schema"].startswith("visionstream.prediction")


@pytest.mark.slow  # about a minute: 300 objects through the stream: `make test-slow` (CI runs both)
def test_reconcile_announces_exactly_the_objects_whose_notifications_were_lost(settings, bucket, tmp_path, start_worker):
    create_topics(settings)
    root = tmp_path / "dataset"
    generate_dataset(root, 300, seed=7)
    asyncio.run(upload_paths([str(root / "Images")], "dogs/", settings, notify=False))
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    listed = [entry for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="dogs/Images/") for entry in page.get("Contents", [])]
    assert len(listed) == 300
    s3.put_object(Bucket=bucket, Key="dogs/odd::name.jpg", Body=b"no event may name this key")  # never announced
    lost = set(random.Random(37).sample(range(300), 37))
    send_raw(settings, [
        object_created_event(ObjectRef(bucket, entry["Key"], etag=entry["ETag"].strip('"'), event_time=now_iso()))
        for index, entry in enumerate(listed) if index not in lost
    ])
    missing = {f"s3://{bucket}/{listed[index]['Key']}" for index in lost}
    worker = start_worker(settings)
    worker.wait_ready()
    announced = {f"s3://{bucket}/{entry['Key']}" for entry in listed} - missing
    assert announced <= collect_events(settings, announced).keys(), worker.log_tail()
    config = write_config(settings, tmp_path / "visionstream.yaml")

    def reconcile(*options: str) -> tuple[list[str], str]:
        done = visionstream("reconcile", f"s3://{bucket}/dogs/", "--min-age", "0", "--idle", "3", "--config", str(config), *options)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines(), done.stderr

    found, _ = reconcile("--dry-run")  # URI <tab> why
    assert sorted(line.split("\t")[0] for line in found) == sorted(missing)
    assert {line.split("\t")[1] for line in found} == {"never announced"}
    _, summary = reconcile()
    assert "announced 37 to" in summary and "(37 never announced, 0 announced without a result" in summary and "301 image objects" in summary and "1 whose keys no event may name" in summary, summary
    again, summary = reconcile("--dry-run")  # announced, not yet classified: nothing to announce
    assert again == [] and "would announce 0" in summary, summary
    everything = announced | missing
    assert everything <= collect_events(settings, everything).keys(), worker.log_tail()
    predictions = Counter(event["uri"] for event in drain_topic(settings, settings.topics.predictions))
    assert set(predictions) == everything and set(predictions.values()) == {1}
    assert drain_topic(settings, settings.topics.dead_letter) == []
