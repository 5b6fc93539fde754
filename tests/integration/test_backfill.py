"""Backfill against the test S3 server and broker, and a live upload during a backfill."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import boto3

from streams.embedded.samples import generate_dataset
from streams.service.backfill import BackfillPlan, run_backfill
from streams.service.events import BACKFILL_HEADER, now_iso
from streams.service.kafka import start_consumer
from streams.service.uploads import upload_paths

from .conftest import collect_events, create_topics, visionstream


def fill_bucket(settings, images: int, others: int, body: bytes = b"\xff\xd8 tiny") -> list[str]:
    s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
    keys = [f"bf/Images/n02085620-Chihuahua/n02085620_{i:05d}.jpg" for i in range(images)]
    for key in keys:
        s3.put_object(Bucket=settings.storage.bucket, Key=key, Body=body)
    for i in range(others):
        s3.put_object(Bucket=settings.storage.bucket, Key=f"bf/Images/notes-{i}.txt", Body=b"text")
    return sorted(keys)


def plan(settings, bucket: str, **options) -> BackfillPlan:
    return BackfillPlan.parse(f"s3://{bucket}/bf/", settings.topics.backfill, **options)


def published_at_least(settings, count: int, timeout_s: float) -> bool:
    """Wait until ``count`` events are on the backfill topic (a condition, not a clock)."""

    async def run() -> bool:
        consumer = await start_consumer(settings.kafka, settings.topics.backfill, from_beginning=True)
        seen, deadline = 0, time.monotonic() + timeout_s
        try:
            while seen < count and time.monotonic() < deadline:
                seen += sum(len(records) for records in (await consumer.getmany(timeout_ms=200)).values())
        finally:
            await consumer.stop()
        return seen >= count

    return asyncio.run(run())


def backfill_events(settings, expected: int, idle_s: float = 3.0) -> list[tuple[dict, dict]]:
    async def run() -> list[tuple[dict, dict]]:
        consumer = await start_consumer(settings.kafka, settings.topics.backfill, from_beginning=True)
        found: list[tuple[dict, dict]] = []
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
                if not batch and len(found) >= expected:
                    return found
                if not batch and not found:
                    continue
                if not batch:
                    return found
                for records in batch.values():
                    found += [(json.loads(r.value), dict(r.headers)) for r in records]
        finally:
            await consumer.stop()

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_every_image_object_gets_exactly_one_backfill_event(settings, bucket):
    keys = fill_bucket(settings, 300, 20)
    create_topics(settings)
    dry = visionstream("backfill", f"s3://{bucket}/bf/", "--dry-run", env=_env(settings), timeout_s=120)
    assert dry.returncode == 0 and "would publish 300 events" in dry.stderr and "20 non-image objects skipped" in dry.stderr
    state = asyncio.run(run_backfill(plan(settings, bucket), settings))
    assert (state.published, state.skipped, state.last_key) == (300, 20, keys[-1])
    events = backfill_events(settings, 300)
    published = [e["Records"][0]["s3"]["object"]["key"].replace("%2F", "/") for e, _ in events]
    assert sorted(published) == keys  # each once
    assert all(e["Records"][0]["visionstream"] == {"backfill": True} for e, _ in events)
    assert all(headers[BACKFILL_HEADER] == b"1" for _, headers in events)


def test_start_after_resumes_exactly_after_the_key_and_rate_holds(settings, bucket):
    keys = fill_bucket(settings, 120, 0)
    create_topics(settings)
    resumed = asyncio.run(run_backfill(plan(settings, bucket, start_after=keys[79]), settings))
    assert resumed.published == 40
    events = backfill_events(settings, 40)
    assert sorted(e["Records"][0]["s3"]["object"]["key"] for e, _ in events) == keys[80:]
    started = time.monotonic()
    limited = asyncio.run(run_backfill(plan(settings, bucket, rate_per_s=50, limit=40, dry_run=True), settings))
    elapsed = time.monotonic() - started
    assert limited.published == 40
    assert elapsed >= 39 / 50  # never faster than the cap
    assert elapsed < 39 / 50 + 5  # and not stalled


def test_a_live_upload_during_a_large_backfill_is_classified_before_the_backfill_finishes(settings, bucket, tmp_path: Path, start_worker):
    settings = settings.with_overrides({"batch": {"size": 10, "max_in_flight": 2}, "worker": {"backfill_share": 0.5}})
    [image] = generate_dataset(tmp_path / "one", 1)
    keys = fill_bucket(settings, 200, 0, body=image.read_bytes())
    create_topics(settings)
    worker = start_worker(settings)
    worker.wait_ready()
    asyncio.run(run_backfill(plan(settings, bucket), settings))
    deadline = time.monotonic() + 60
    while worker.health()["counters"]["images_classified"] < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    live_root = tmp_path / "live"
    generate_dataset(live_root, 1, seed=99)
    uploaded_at = now_iso()  # the clock the worker stamps predicted_at with (this machine's, in UTC)
    asyncio.run(upload_paths([str(live_root / "Images")], "live/", settings, notify=True))
    live_uri = next(f"s3://{bucket}/live/{p.relative_to(live_root).as_posix()}" for p in (live_root / "Images").rglob("*.jpg"))
    backfill_uris = {f"s3://{bucket}/{key}" for key in keys}
    events = collect_events(settings, backfill_uris | {live_uri}, timeout_s=240)
    assert backfill_uris | {live_uri} <= events.keys(), worker.log_tail()
    live_at = events[live_uri][0]["predicted_at"]
    backfill_at = [found[0]["predicted_at"] for uri, found in events.items() if uri in backfill_uris]
    # Counted in images, not seconds, so a slower machine slows both sides alike. While the live
    # upload waited, the backfill finishes the batch it has on the cluster and perhaps the next
    # (measured: 20 images, 160 after); queued behind the backlog, it would wait for nearly all.
    waited_behind = sum(1 for at in backfill_at if uploaded_at <= at <= live_at)
    still_to_go = sum(1 for at in backfill_at if at > live_at)
    assert waited_behind < still_to_go, f"the live upload waited behind {waited_behind} backfill images, with {still_to_go} after it"
    assert events[live_uri][0]["backfill"] is False
    assert all(found[0]["backfill"] is True for uri, found in events.items() if uri in backfill_uris)


def _env(settings) -> dict[str, str]:
    return {
        "VISIONSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "VISIONSTREAM_STORAGE__ENDPOINT_URL": settings.storage.endpoint_url,
        "VISIONSTREAM_STORAGE__REGION": "us-east-1",
        "VISIONSTREAM_TOPICS__BACKFILL": settings.topics.backfill,
        "VISIONSTREAM_KAFKA__ENABLE_IDEMPOTENCE": str(settings.kafka.enable_idempotence).lower(),
    }


def test_an_interrupted_backfill_prints_the_exact_resume_command_and_resuming_loses_nothing(settings, bucket):
    import shlex
    import signal
    import subprocess
    import sys

    from .conftest import REPO

    keys = fill_bucket(settings, 150, 0)
    create_topics(settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "streams", "backfill", f"s3://{bucket}/bf/", "--rate", "2"],
        cwd=REPO, env=os.environ | _env(settings), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        # a shell's background job starts with SIGINT ignored, and Python keeps it so: Ctrl-C as a terminal sends it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # 6 events at 2/s: three seconds of publishing, so a chunk was confirmed (every second), and
    # 144 events (72 s) still to go: the interruption lands mid-way, however slowly this reader
    # starts on a loaded machine (at 10/s, a fresh-clone run found the backfill done first)
    assert published_at_least(settings, 6, timeout_s=60), "the backfill published nothing"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    resume = next(line for line in stderr.splitlines() if line.startswith("resume with: visionstream "))
    args = shlex.split(resume.removeprefix("resume with: visionstream "))
    last = args[args.index("--start-after") + 1]
    assert last in keys and last != keys[-1]
    assert args[args.index("--rate") + 1] == "2"  # the command as it was given...
    del args[args.index("--rate") : args.index("--rate") + 2]  # ... resumed here at full speed
    done = visionstream(*args, env=_env(settings), timeout_s=120)
    assert done.returncode == 0, done.stderr
    published = [e["Records"][0]["s3"]["object"]["key"] for e, _ in backfill_events(settings, len(keys))]
    assert set(published) == set(keys)  # every key at least once; a few around the interruption may repeat
    assert len(published) - len(keys) < 60


def test_a_backfill_of_a_prefix_with_no_images_and_an_upload_prefix_without_its_slash_say_so(settings, bucket, tmp_path):
    fill_bucket(settings, images=0, others=2)
    env = _env(settings) | {"VISIONSTREAM_STORAGE__BUCKET": bucket}
    typo = visionstream("backfill", f"s3://{bucket}/nothing/", env=env, timeout_s=120)
    [line] = typo.stderr.splitlines()[-1:]
    assert typo.returncode == 1 and line.startswith(f"visionstream: error: backfill: no objects under s3://{bucket}/nothing/"), typo.stderr
    texts = visionstream("backfill", f"s3://{bucket}/bf/", env=env, timeout_s=120)
    assert texts.returncode == 1 and "no image objects (2 other objects skipped" in texts.stderr, texts.stderr

    generate_dataset(tmp_path / "set", 1)
    done = visionstream("upload", str(tmp_path / "set" / "Images"), "--prefix", "noslash", env=env, timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert "--prefix 'noslash' does not end with '/': keys go under 'noslash/'" in done.stderr
    assert "uploaded 1 object to" in done.stderr
    keys = [item["Key"] for item in boto3.client("s3", **settings.storage.boto3_kwargs()).list_objects_v2(Bucket=bucket, Prefix="noslash")["Contents"]]
    assert keys and all(key.startswith("noslash/Images/") for key in keys), keys
