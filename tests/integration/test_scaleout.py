"""`make test-scaleout` (not in CI: see README, Development). Several stream workers in one
consumer group, against the real broker and a real Dask cluster: workers join, leave (SIGTERM) and die (SIGKILL) while notifications arrive and
batches are in flight, some changes back to back so that they land during a rebalance.
Every good image must be predicted once the group settles; a stall, if one happens, must
end on its own or fail ``/livez``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest
from distributed import Client

from inference.client.embedded import embedded_cluster, reaching
from inference.records.results import DEAD_LETTER_SCHEMA, PREDICTION_SCHEMA
from inference.settings import ClusterSettings
from inference.worker.decoding import KILL_SWITCH_ENV
from streams.embedded.samples import generate_dataset
from streams.embedded.stack import S3_TEST_CREDENTIALS, free_port
from streams.service.events import now_iso
from streams.service.kafka import start_producer
from streams.service.s3events import ObjectRef, object_created_event
from streams.service.uploads import upload_paths

from .conftest import collect_events, create_topics, drain_topic
from .test_guarantees import status

POISON_AMONG = 600  # good images beside the one that kills its worker

def upload_silently(settings, tmp_path: Path, count: int) -> list[str]:
    """Objects in the bucket, no notification yet: the test sends those itself, over time."""
    root = tmp_path / "images"
    generate_dataset(root, count, seed=7)
    asyncio.run(upload_paths([str(root / "Images")], "", settings, notify=False))
    return sorted(f"Images/{p.relative_to(root / 'Images').as_posix()}" for p in (root / "Images").rglob("*") if p.is_file())


def announce(settings, keys: list[str], per_second: float) -> threading.Thread:
    """Send one notification per key at ``per_second``, in the background."""

    async def send() -> None:
        producer = await start_producer(settings.kafka)
        try:
            for key in keys:
                note = object_created_event(ObjectRef(settings.storage.bucket, key, event_time=now_iso()))
                await producer.send_and_wait(settings.topics.uploads, json.dumps(note).encode())
                await asyncio.sleep(1 / per_second)
        finally:
            await producer.stop()

    thread = threading.Thread(target=lambda: asyncio.run(send()), daemon=True)
    thread.start()
    return thread


@pytest.mark.scaleout
@pytest.mark.timeout(900)
def test_stream_workers_that_join_leave_and_die_lose_nothing(settings, bucket, tmp_path, start_worker):
    settings = settings.with_overrides({"batch": {"size": 10, "max_in_flight": 2}, "worker": {"stall_s": 20}})
    create_topics(settings)
    keys = upload_silently(settings, tmp_path, 180)
    uris = {f"s3://{bucket}/{key}" for key in keys}
    workers = [
        start_worker(settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(tmp_path / f"data-{i}")}}), f"w{i}")
        for i in range(2)
    ]
    workers[0].wait_ready()
    sending = announce(settings, keys, per_second=6)
    joined = start_worker(settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(tmp_path / "data-2")}}), "w2")
    workers.append(joined)

    def settle() -> None:
        """Until some running worker is ready: the group has formed again (a condition, no clock)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(w.process.poll() is None and (w.health() or {}).get("status") == "ready" for w in workers):
                return
            time.sleep(0.3)
        raise AssertionError("no stream worker became ready\n" + "\n".join(w.log_tail() for w in workers))

    # join (w2, above), leave, die and restart, a leave and a join back to back, a death during the rebalance
    settle()
    workers[1].stop()  # leave: SIGTERM, drains and commits
    settle()
    workers[0].kill()  # die: SIGKILL with batches in flight
    workers[0].start()
    settle()
    workers[2].stop()
    workers[1].start()  # back to back with the leave: lands in the same rebalance
    workers[0].kill()  # and a death while the group is rebalancing
    workers[0].start()
    settle()
    sending.join(timeout=120)
    assert not sending.is_alive()
    events = collect_events(settings, uris, timeout_s=240)
    missing = uris - events.keys()
    livez = {w.name: status(w.url.replace("/health", "/livez")) for w in workers if w.process.poll() is None}
    assert not missing, (
        f"{len(missing)} of {len(uris)} uploads have no prediction; /livez of the running workers: {livez}\n"
        + "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
    )
    assert all(found[0]["schema"] == PREDICTION_SCHEMA for found in events.values())
    predictions = Counter(e["uri"] for e in drain_topic(settings, settings.topics.predictions, idle_s=2.0))
    assert set(predictions) == uris  # nothing predicted that was not announced
    assert all(code == 200 for code in livez.values()), livez  # the group settled and every worker moves


@pytest.mark.scaleout
@pytest.mark.timeout(900)
def test_an_image_that_kills_its_worker_is_the_only_dead_letter_with_two_stream_workers(settings, bucket, tmp_path, start_worker):
    """Two stream workers share two Dask workers. One image kills whichever worker decodes it
    (fault injection); meanwhile an operator SIGKILLs a Dask worker that runs innocent batches.
    Only the poison image is dead-lettered (``worker``), after dying alone twice; every other
    image is predicted; neither stream worker crashes."""
    env = os.environ | S3_TEST_CREDENTIALS | {KILL_SWITCH_ENV: "poison"}
    cluster = embedded_cluster(ClusterSettings(gpu=False, n_workers=2, threads_per_worker=1), env=env)
    try:
        settings = settings.with_overrides({
            "cluster": reaching(cluster),
            "batch": {"size": 10, "max_in_flight": 2, "timeout_s": 60, "retry_timeout_s": 240},
        })
        create_topics(settings)
        keys = upload_silently(settings, tmp_path, POISON_AMONG)
        body = boto3.client("s3", **settings.storage.boto3_kwargs()).get_object(Bucket=bucket, Key=keys[0])["Body"].read()
        poison_key = "Images/n02085620-Chihuahua/poison.jpg"  # a good JPEG: only the fault injection kills
        boto3.client("s3", **settings.storage.boto3_kwargs()).put_object(Bucket=bucket, Key=poison_key, Body=body)
        keys.insert(len(keys) // 3, poison_key)
        workers = [
            start_worker(settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(tmp_path / f"data-{i}")}}), f"s{i}")
            for i in range(2)
        ]
        pids = [w.wait_ready() and w.process.pid for w in workers]
        sending = announce(settings, keys, per_second=40)
        with Client(cluster, timeout=30) as client:
            deadline = time.monotonic() + 180
            while sum((w.health() or {"counters": {"images_classified": 0}})["counters"]["images_classified"] for w in workers) < 40:
                assert time.monotonic() < deadline, "no progress before the unrelated kill"
                time.sleep(0.3)
            victim, pid = next(iter(client.run(os.getpid).items()))
            os.kill(pid, signal.SIGKILL)  # an operator's kill: nothing to do with any image
        sending.join(timeout=120)
        uris = {f"s3://{bucket}/{key}" for key in keys}
        poison = f"s3://{bucket}/{poison_key}"
        events = collect_events(settings, uris, timeout_s=420)
        logs = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
        assert uris <= events.keys(), f"{len(uris - events.keys())} without an event\n{logs}"
        worker_letters = {uri for uri, found in events.items() for e in found if e.get("stage") == "worker"}
        assert worker_letters == {poison}, (worker_letters, logs)
        assert {e["schema"] for e in events[poison]} == {DEAD_LETTER_SCHEMA}
        innocent = uris - {poison}
        assert all(any(e["schema"] == PREDICTION_SCHEMA for e in events[uri]) for uri in innocent)
        assert [w.process.poll() for w in workers] == [None, None] and [w.process.pid for w in workers] == pids  # no crash
    finally:
        try:
            cluster.close(timeout=30)
        except TimeoutError:  # a worker process slow to exit (its nanny restarted it moments ago): not this test's subject
            pass
