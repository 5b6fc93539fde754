"""Fault soak: uploads mixed with hostile messages while processes are SIGKILLed at random.

    python -m benchmarks.soak [--images 2000] [--kills 12] [--model resnet18] [--seed 1]
    python -m benchmarks.soak --churn 12 --stream-workers 3   # a consumer group that changes

The embedded stack (tansu broker, moto S3) with a standalone ``dask scheduler`` and ``dask
worker`` and ``--stream-workers`` ``visionstream worker`` processes in one consumer group. A
supervisor restarts whatever dies, as systemd or compose's ``restart:`` would. While
notifications (and malformed, hostile, missing and corrupt ones between them) are sent, the
stream workers, the Dask worker and the scheduler are SIGKILLed at random moments; with
``--churn N`` the group also changes N times: a stream worker joins, leaves (SIGTERM, as a
rolling deploy or a scale-in does) or dies (SIGKILL, restarted), some of them back to back
so that they land during a rebalance. At the end every output event is read back and
counted: distinct predictions, duplicates (each attributed to the last group change or
kill before it), dead letters by stage, every good upload without a prediction (lost),
which must be none, and whether the group stalled (a stream worker's ``/livez`` failing, or
lag left with nothing taken). Not part of CI: it runs for minutes.

Three cases a long-running deployment meets, each a flag:

    python -m benchmarks.soak --poison --cut-isolation 2   # a long isolation under restarts
    python -m benchmarks.soak --late-bucket 40             # a bucket added to the filter, then reconcile
    python -m benchmarks.soak --second-config 200          # two configurations sharing one cluster

``--cut-isolation N`` SIGKILLs a stream worker N times right after a step of an isolation it
runs (the worker-killing image's batch being split): the next owner resumes from the verdicts
kept on the scheduler, and the image is dead-lettered once, nothing else. ``--late-bucket N``
uploads N images to a second bucket while the stream workers' ``filter.buckets`` names only
the first (their notifications are skipped), then restarts them with both buckets and runs
``visionstream reconcile`` on the second: every one is predicted. ``--second-config N`` runs a
second stream deployment (its own consumer group, topics and model configuration) on the same
Dask cluster with N of the uploads: both predict all of theirs, and at the end the Dask worker
still holds both models (neither retired the other's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import boto3

from benchmarks.machine import cpu_name
from inference.records.results import is_dead_letter, is_prediction
from inference.settings import Settings
from streams.embedded.samples import generate_dataset
from inference.worker.decoding import KILL_SWITCH_ENV
from streams.embedded.stack import (
    EMBEDDED_BROKER_KAFKA,
    S3_TEST_CREDENTIALS,
    EmbeddedStack,
    free_port,
    start_dask_scheduler,
    start_dask_worker,
    start_stream_worker,
)
from streams.service.events import now_iso, parse_time
from streams.service.kafka import ensure_topics, start_consumer, start_producer
from streams.service.s3events import ObjectRef, object_created_event


# A stream worker retires idle models of its own line every minute, once idle for
# max(60 s, batch.timeout_s): past this, a model it wrongly took for its own would be gone.
SECOND_CONFIG_IDLE_S = 200.0


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def hostile_messages(bucket: str, foreign: str) -> list[bytes]:
    def note(key: str, bucket: str = bucket) -> bytes:
        return json.dumps(object_created_event(ObjectRef(bucket, key, event_time=now_iso()))).encode()

    record = object_created_event(ObjectRef(bucket, "Images/x.jpg", event_time=now_iso()))["Records"][0]
    return [
        b'{"Records": "\\udfff"}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"Records": [dict(record, eventTime=12)]}).encode(),
        json.dumps({"Records": [dict(record, s3=dict(record["s3"], object={"key": "Images/x.jpg", "size": "huge"}))]}).encode(),
        bytes(range(128, 256)) * 6000,
        note("private/doc::x.jpg"),
        note("Images/*.jpg"),
        note("Images/secret.jpg", foreign),
        os.urandom(512),
        json.dumps({"Records": [record] * 500}).encode(),
    ]


class Supervisor:
    """Keeps the scheduler, the Dask worker and the stream workers running; kills, stops and
    starts them on request. A stream worker that was asked to leave stays down until it joins."""

    def __init__(self, settings: Settings, work: Path, scheduler_port: int, stream_workers: int = 1, poison: str | None = None) -> None:
        self.settings, self.work, self.port = settings, work, scheduler_port
        # the Dask worker exits when it decodes an object whose URI holds ``poison`` (fault injection)
        self.env = os.environ | S3_TEST_CREDENTIALS | ({KILL_SWITCH_ENV: poison} if poison else {})
        self.scheduler = start_dask_scheduler(work / "logs", port=scheduler_port)
        self.dask_worker = start_dask_worker(self.address, work / "logs", env=self.env)
        # each stream worker: its own web port and data directory, one consumer group
        self.stream_settings = [
            settings.with_overrides({"worker": {"web_port": free_port(), "data_dir": str(work / f"worker-data-{index}")}})
            for index in range(stream_workers)
        ]
        self.streams: list[subprocess.Popen[bytes] | None] = [self._start_stream(index) for index in range(stream_workers)]
        self.wanted = [True] * stream_workers  # False: left on purpose, not restarted
        self.kills: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.changes: list[tuple[float, str]] = []  # (unix time, what): group changes and kills
        self.unhealthy: Counter[str] = Counter()  # /livez answers other than 200, per stream worker
        self.cuts_left = 0  # isolations to cut short: SIGKILL a stream worker right after an isolation step
        self.isolation_steps: dict[int, int] = {}  # per stream worker, as its /health last said

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _start_stream(self, index: int) -> subprocess.Popen[bytes]:
        return start_stream_worker(self.stream_settings[index], self.work / "logs", f"stream-worker-{index}")

    def _note(self, what: str) -> None:
        self.changes.append((time.time(), what))
        say(what)

    def kill(self, which: str, rng: random.Random) -> None:
        if which == "stream-worker":
            running = [index for index, process in enumerate(self.streams) if process is not None and process.poll() is None]
            if not running:
                return
            index = rng.choice(running)
            process = self.streams[index]
            name = f"stream-worker-{index}"
        else:
            process = {"scheduler": self.scheduler.process, "dask-worker": self.dask_worker.process}[which]
            name = which
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self.kills[which] += 1
            self._note(f"SIGKILL {name}")

    kinds: tuple[str, ...] = ("join", "leave", "die")

    def churn(self, rng: random.Random) -> None:
        """One change of the consumer group: a stream worker joins, leaves or dies."""
        up = [i for i, wanted in enumerate(self.wanted) if wanted]
        down = [i for i, wanted in enumerate(self.wanted) if not wanted]
        choices = (["leave", "die"] if len(up) > 1 else ["die"]) + (["join"] if down else [])
        choices = [kind for kind in choices if kind in self.kinds] or ["join" if down else "leave"]
        action = rng.choice(choices)
        if action == "join":
            index = rng.choice(down)
            self.wanted[index] = True
            self.streams[index] = self._start_stream(index)
            self._note(f"join stream-worker-{index}")
        elif action == "leave":
            index = rng.choice(up)
            self.wanted[index] = False
            process = self.streams[index]
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # graceful: drains, commits, leaves the group
            self._note(f"leave stream-worker-{index}")
        else:
            index = rng.choice(up)
            process = self.streams[index]
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self._note(f"die stream-worker-{index}")
        self.kills[action] += 1

    def tend(self) -> None:
        """Restart whatever is down (the Dask worker also goes when its scheduler does)."""
        if self.scheduler.process.poll() is not None:
            self.scheduler = start_dask_scheduler(self.work / "logs", port=self.port)
            self.restarts["scheduler"] += 1
        if self.dask_worker.process.poll() is not None:
            self.dask_worker = start_dask_worker(self.address, self.work / "logs", env=self.env)
            self.restarts["dask-worker"] += 1
        for index, process in enumerate(self.streams):
            if self.wanted[index] and (process is None or process.poll() is not None):
                self.streams[index] = self._start_stream(index)
                self.restarts["stream-worker"] += 1

    def probe(self) -> None:
        """Count /livez failures of the stream workers that are up: a stall the service reports."""
        for index, process in enumerate(self.streams):
            if process is None or process.poll() is not None:
                continue
            url = f"http://127.0.0.1:{self.stream_settings[index].worker.web_port}/livez"
            try:
                with urllib.request.urlopen(url, timeout=2):
                    pass
            except urllib.error.HTTPError as exc:
                self.unhealthy[f"stream-worker-{index}"] += 1
                say(f"stream-worker-{index} /livez {exc.code}: {exc.read()[:200]!r}")
            except OSError:
                pass  # starting or stopping

    def cut_isolations(self) -> None:
        """SIGKILL a stream worker whose /health counts a new isolation step (it is splitting a
        batch to find the worker-killer), while cuts are left: the next owner must resume."""
        for index, process in enumerate(self.streams):
            if not self.cuts_left or process is None or process.poll() is not None:
                continue
            url = f"http://127.0.0.1:{self.stream_settings[index].worker.web_port}/health"
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    steps = json.loads(answer.read())["counters"].get("isolation_steps", 0)
            except (OSError, ValueError, KeyError):
                continue
            if steps > self.isolation_steps.get(index, 0):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                self.isolation_steps.pop(index, None)  # a restarted worker counts from 0
                self.cuts_left -= 1
                self.kills["cut-isolation"] += 1
                self._note(f"cut isolation: SIGKILL stream-worker-{index} after isolation step {steps}")
            else:
                self.isolation_steps[index] = steps

    def restart_streams(self, settings: Settings) -> None:
        """A rolling restart onto new settings (a config change): each stream worker drains and
        stops (SIGTERM), then starts again with ``settings``."""
        for index, process in enumerate(self.streams):
            self.stream_settings[index] = settings.with_overrides({"worker": self.stream_settings[index].worker.model_dump()})
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
            if self.wanted[index]:
                self.streams[index] = self._start_stream(index)
        self._note("restart stream workers with new settings")

    def stop(self) -> None:
        for process in self.streams:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.streams:
            if process is None:
                continue
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.dask_worker.stop()
        self.scheduler.stop()


async def send(settings: Settings, messages: list[bytes], rate: float) -> None:
    producer = await start_producer(settings.kafka)
    try:
        for message in messages:
            await producer.send_and_wait(settings.topics.uploads, message)
            await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()


async def read_all(settings: Settings, idle_s: float = 5.0) -> list[dict[str, Any]]:
    topics = settings.topics
    consumer = await start_consumer(settings.kafka, topics.predictions, topics.dead_letter, from_beginning=True)
    events: list[dict[str, Any]] = []
    try:
        while batch := await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=5000):
            events.extend(json.loads(record.value) for records in batch.values() for record in records)
    finally:
        await consumer.stop()
    return events


def run_cli(settings: Settings, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``visionstream ARGS`` as an operator runs it: settings in a config file, secrets in its environment."""
    import yaml

    config = work / f"cli-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return subprocess.run([sys.executable, "-m", "streams", *args, "--config", str(config)], capture_output=True, text=True,
                          env=os.environ | settings.secrets_env(), timeout=600, check=False)


def resident_models(address: str) -> list[str]:
    """The visionstream model plugins on the Dask workers now."""
    from distributed import Client

    from inference.worker.plugin import PLUGIN_PREFIX

    with Client(address, timeout=30) as client:
        found = client.run(lambda dask_worker: sorted(name for name in dask_worker.plugins if name.startswith(PLUGIN_PREFIX)))
    return sorted({name for names in found.values() for name in names})


def predicted(settings: Settings, expected: set[str]) -> int:
    events = asyncio.run(read_all(settings, idle_s=1.0))
    return len({e["uri"] for e in events if e.get("uri") in expected})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs in all, spread over the stream workers, the Dask worker and the scheduler")
    parser.add_argument("--churn", type=int, default=0, help="consumer-group changes: a stream worker joins, leaves (SIGTERM) or dies (SIGKILL)")
    parser.add_argument("--stream-workers", type=int, default=1, help="stream worker processes in the group (up to this many run at once)")
    parser.add_argument("--churn-kinds", default="join,leave,die", help="which group changes churn makes (comma-separated)")
    parser.add_argument("--poison", action="store_true", help="upload one image that kills the Dask worker decoding it (fault injection)")
    parser.add_argument("--cut-isolation", type=int, default=0, metavar="N",
                        help="with --poison: SIGKILL a stream worker N times right after a step of the isolation it runs")
    parser.add_argument("--late-bucket", type=int, default=0, metavar="N",
                        help="N uploads to a bucket the filter adds only later, then found by reconcile")
    parser.add_argument("--second-config", type=int, default=0, metavar="N",
                        help="N uploads through a second stream deployment (another model configuration) on the same Dask cluster")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rate", type=float, default=40.0, help="notifications per second sent")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", default="benchmarks/results/soak.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="visionstream-soak-") as scratch, EmbeddedStack(log_dir=Path(scratch) / "logs") as stack:
        work = Path(scratch)
        suffix = uuid.uuid4().hex[:6]
        bucket, foreign, late = f"soak-{suffix}", f"soak-foreign-{suffix}", f"soak-late-{suffix}"
        scheduler_port = free_port()
        settings = Settings().with_overrides({
            "model": {"name": args.model, "weights": "none", "precision": "fp32"},
            "kafka": {"bootstrap_servers": stack.bootstrap_servers, "consumer_group": f"soak-{suffix}", **EMBEDDED_BROKER_KAFKA},
            "storage": {**stack.storage_settings(), "bucket": bucket},
            "cluster": {"scheduler": f"tcp://127.0.0.1:{scheduler_port}", "connect_timeout_s": 10},
            "batch": {"linger_s": 0.5, "timeout_s": 60},
            "worker": {"web_port": free_port(), "data_dir": str(work / "worker-data")},
        })
        if args.late_bucket:
            settings = settings.with_overrides({"filter": {"buckets": [bucket]}})  # the late bucket comes later
        s3 = boto3.client("s3", **settings.storage.boto3_kwargs())
        for name in (bucket, foreign, late):
            s3.create_bucket(Bucket=name)
        say(f"generating and uploading {args.images} images (+ corrupt ones) ...")
        paths = generate_dataset(work / "images", args.images, seed=args.seed, bad_files=20)
        good, corrupt = set(), set()
        for path in paths:
            key = path.relative_to(work / "images").as_posix()
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            (corrupt if "_bad" in path.name else good).add(f"s3://{bucket}/{key}")
        s3.put_object(Bucket=foreign, Key="Images/secret.jpg", Body=paths[0].read_bytes())
        poisoned: set[str] = set()
        if args.poison:  # a good JPEG; only the fault injection makes it deadly
            key = "Images/n02085620-Chihuahua/poison-pill.jpg"
            s3.put_object(Bucket=bucket, Key=key, Body=paths[0].read_bytes())
            poisoned.add(f"s3://{bucket}/{key}")
        missing = {f"s3://{bucket}/Images/never-uploaded-{i}.jpg" for i in range(20)}
        late_good: set[str] = set()
        late_events: list[bytes] = []  # as S3 sends them, with each object's ETag
        for path in paths[: args.late_bucket]:  # the same pictures in the late bucket (corrupt ones among them fail alike)
            key = path.relative_to(work / "images").as_posix()
            etag = s3.put_object(Bucket=late, Key=key, Body=path.read_bytes())["ETag"].strip('"')
            late_events.append(json.dumps(object_created_event(ObjectRef(late, key, etag=etag, event_time=now_iso()))).encode())
            if "_bad" not in path.name:
                late_good.add(f"s3://{late}/{key}")
        second_good = set(sorted(good)[: args.second_config])
        messages = [json.dumps(object_created_event(ObjectRef(bucket, uri.split("/", 3)[3], event_time=now_iso()))).encode() for uri in sorted(good | corrupt | missing | poisoned)]
        messages += late_events
        hostile = hostile_messages(bucket, foreign) * 3
        for message in hostile:
            messages.insert(rng.randrange(len(messages) + 1), message)
        asyncio.run(ensure_topics(settings.kafka, settings.topics))
        supervisor = Supervisor(settings, work, scheduler_port, max(1, args.stream_workers), "poison-pill" if args.poison else None)
        supervisor.kinds = tuple(kind.strip() for kind in args.churn_kinds.split(","))
        supervisor.cuts_left = args.cut_isolation if args.poison else 0
        second: tuple[Settings, subprocess.Popen[bytes]] | None = None
        if args.second_config:  # another deployment: its own group, topics and model configuration, the same cluster
            other = settings.with_overrides({
                "kafka": {"consumer_group": f"soak2-{suffix}"}, "model": {"top_k": 3},
                "topics": {name: f"{value}-2" for name, value in settings.topics.model_dump().items() if isinstance(value, str)},
                "worker": {"web_port": free_port(), "data_dir": str(work / "worker-data-second")},
            })
            asyncio.run(ensure_topics(other.kafka, other.topics))
            second = (other, start_stream_worker(other, work / "logs", "second-config"))
        started = time.monotonic()
        sending = threading.Thread(target=lambda: asyncio.run(send(settings, messages, args.rate)), daemon=True)
        sending.start()
        if second is not None:
            second_messages = [json.dumps(object_created_event(ObjectRef(bucket, uri.split("/", 3)[3], event_time=now_iso()))).encode() for uri in sorted(second_good)]
            threading.Thread(target=lambda: asyncio.run(send(second[0], second_messages, args.rate / 4)), daemon=True).start()
        late_reconciled = False
        kills_left, churn_left = args.kills, args.churn
        deadline = started + args.timeout
        next_kill = time.monotonic() + rng.uniform(5, 15)
        next_change = time.monotonic() + rng.uniform(5, 10)
        next_probe = time.monotonic()
        try:
            while time.monotonic() < deadline:
                supervisor.tend()
                now = time.monotonic()
                if kills_left and now >= next_kill:
                    supervisor.kill(rng.choice(["stream-worker", "stream-worker", "dask-worker", "scheduler"]), rng)
                    kills_left -= 1
                    next_kill = now + rng.uniform(5, 20)
                if churn_left and now >= next_change:
                    supervisor.churn(rng)
                    churn_left -= 1
                    # a third of the changes come back to back, landing during the rebalance
                    next_change = now + (rng.uniform(0.5, 2) if rng.random() < 1 / 3 else rng.uniform(4, 10))
                if now >= next_probe:
                    supervisor.probe()
                    next_probe = now + 5
                supervisor.cut_isolations()
                if second is not None and second[1].poll() is not None:
                    second = (second[0], start_stream_worker(second[0], work / "logs", "second-config"))
                if not kills_left and not churn_left and not sending.is_alive():
                    done = predicted(settings, good)
                    say(f"{done}/{len(good)} good uploads predicted")
                    if late_good and done == len(good) and not late_reconciled:
                        # the operator adds the bucket to the filter, rolls the workers, reconciles it
                        settings = settings.with_overrides({"filter": {"buckets": [bucket, late]}})
                        supervisor.restart_streams(settings)
                        reconciled = run_cli(settings, work, "reconcile", f"s3://{late}/", "--min-age", "0")
                        say(f"reconcile s3://{late}/: exit {reconciled.returncode}: {reconciled.stdout.strip()[-300:]} {reconciled.stderr.strip()[-300:]}")
                        late_reconciled = True
                    late_done = predicted(settings, late_good) if late_good else 0
                    second_done = predicted(second[0], second_good) if second is not None else 0
                    if late_good or second is not None:
                        say(f"late bucket: {late_done}/{len(late_good)}; second configuration: {second_done}/{len(second_good)}")
                    # two configurations: idle long enough for a retirement round to pass over the other's model
                    settled = second is None or time.monotonic() - started > SECOND_CONFIG_IDLE_S
                    if done == len(good) and late_done == len(late_good) and second_done == len(second_good) and settled:
                        break
                time.sleep(1.0)
            models = resident_models(supervisor.address) if second is not None else []
        finally:
            if second is not None and second[1].poll() is None:
                second[1].send_signal(signal.SIGTERM)
                second[1].wait(60)
            supervisor.stop()
        elapsed = time.monotonic() - started
        resumed = sum(path.read_text(errors="replace").count("resuming the isolation") for path in (work / "logs").glob("stream-worker-*.log"))
        events = asyncio.run(read_all(settings))
        second_events = asyncio.run(read_all(second[0])) if second is not None else []
    report = summarize(events, good, corrupt, missing, supervisor, elapsed, args)
    report["poison_dead_lettered_as_worker"] = sorted(poisoned & {e["uri"] for e in events if is_dead_letter(e) and e["stage"] == "worker"})
    report["worker_dead_letters"] = sorted({e["uri"] for e in events if is_dead_letter(e) and e["stage"] == "worker"})
    if args.late_bucket:
        report["late_bucket_predicted"] = f"{len(late_good & {e['uri'] for e in events if is_prediction(e)})}/{len(late_good)}"
        report["lost"] += len(late_good - {e["uri"] for e in events if is_prediction(e)})
    if second is not None:
        second_predicted = {e["uri"] for e in second_events if is_prediction(e)}
        report["second_config_predicted"] = f"{len(second_good & second_predicted)}/{len(second_good)}"
        report["lost"] += len(second_good - second_predicted)
        report["models_resident_at_end"] = models  # both configurations' plugins: neither retired the other
    if args.cut_isolation:
        report["isolations_cut"] = supervisor.kills.get("cut-isolation", 0)
        report["isolations_resumed"] = resumed  # from the verdicts kept on the scheduler (the stream workers' logs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 else 1


def summarize(events: list[dict[str, Any]], good: set[str], corrupt: set[str], missing: set[str], supervisor: Supervisor, elapsed_s: float, args: argparse.Namespace) -> dict[str, Any]:
    predictions = Counter(e["uri"] for e in events if is_prediction(e))
    dead = [e for e in events if is_dead_letter(e)]
    lost = sorted(good - predictions.keys())
    return {
        "images": len(good),
        "stream_workers": args.stream_workers,
        "kills": dict(supervisor.kills),
        "restarts": dict(supervisor.restarts),
        "distinct_predictions": len(predictions.keys() & good),
        "duplicate_predictions": sum(count - 1 for count in predictions.values()),
        "duplicates_after": duplicates_by_change(events, supervisor.changes),
        "livez_failures": dict(supervisor.unhealthy),
        "dead_letters_by_stage": dict(Counter(e["stage"] for e in dead)),
        "distinct_dead_lettered_images": len({e["uri"] for e in dead if e.get("uri")}),
        "corrupt_uploads_dead_lettered": len(corrupt & {e["uri"] for e in dead if e.get("uri")}),
        "missing_objects_dead_lettered": len(missing & {e["uri"] for e in dead if e.get("uri")}),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "elapsed_s": round(elapsed_s, 1),
        "model": args.model,
        "machine": _machine(),
    }


def duplicates_by_change(events: list[dict[str, Any]], changes: list[tuple[float, str]]) -> dict[str, int]:
    """Each repeated prediction of a URI counted against the kind of the last group change or
    kill before it was published ("leave", "die", "join", "SIGKILL dask-worker", ...). Pure."""
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    for event in sorted((e for e in events if is_prediction(e)), key=lambda e: e.get("predicted_at") or ""):
        if event["uri"] not in seen:
            seen.add(event["uri"])
            continue
        published = parse_time(event.get("predicted_at"))
        at = published.timestamp() if published else float("inf")
        before = [what for when, what in changes if when <= at]
        counts[_kind(before[-1]) if before else "none"] += 1
    return dict(counts)


def _kind(change: str) -> str:
    """"leave stream-worker-2" -> "leave"; "SIGKILL dask-worker" stays as it is."""
    return change.split(" ", 1)[0] if not change.startswith("SIGKILL") else change.rstrip("-0123456789")


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
