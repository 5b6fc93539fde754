"""`visionstream demo`: the whole service on loopback, start to finish, then everything stopped.

A Kafka-protocol broker and an S3 server (streams.embedded.stack), an embedded Dask cluster,
and a stream worker in its own process, exactly as `visionstream worker` runs in production.
The demo uploads images with their S3 events, shows each prediction as it arrives, then a
summary. The embedded S3 server's credentials travel as settings (to the stream worker too) and
to the Dask workers through their own processes' environment, never through this process's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference.client.embedded import embedded_cluster, reaching
from inference.records.evaluation import percentile, accuracy
from inference.settings import WeightsSpec
from inference.records.results import is_prediction
from inference.settings import Settings
from streams.embedded.stack import EMBEDDED_BROKER_KAFKA, S3_TEST_CREDENTIALS, EmbeddedStack, free_port, start_stream_worker
from streams.errors import EmbeddedStackError
from streams.service.kafka import ensure_topics, start_consumer
from streams.service.uploads import create_bucket, local_files, upload_paths

Show = Callable[[dict[str, Any]], None]  # what to do with each event as it arrives (the CLI prints it)


def say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def run_demo(settings: Settings, images: str | None, count: int, timeout_s: float, weights_given: bool, show: Show | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="visionstream-demo-") as scratch:
        work = Path(scratch)
        say("starting a Kafka-protocol broker and an S3 server on 127.0.0.1 ...")
        with EmbeddedStack(log_dir=work / "logs") as stack:
            settings = demo_settings(settings, stack, work, weights_given)
            say(f"broker {stack.bootstrap_servers}, S3 {stack.s3_endpoint}; starting a Dask cluster ...")
            # the Dask workers get no credentials with their tasks: they find the embedded S3
            # server's in their own environment, set by their nannies (never in ours)
            cluster = embedded_cluster(settings.cluster, env=S3_TEST_CREDENTIALS)
            try:
                settings = settings.with_overrides({"cluster": reaching(cluster)})
                return _run(settings, work, images, count, timeout_s, show)
            finally:
                cluster.close()


def demo_settings(settings: Settings, stack: EmbeddedStack, work: Path, weights_given: bool) -> Settings:
    overrides: dict[str, Any] = {
        "kafka": {"bootstrap_servers": stack.bootstrap_servers, **EMBEDDED_BROKER_KAFKA},
        "storage": stack.storage_settings(),
        "worker": {"web_port": free_port(), "web_host": "127.0.0.1", "data_dir": str(work / "worker-data")},
        "batch": {"linger_s": min(settings.batch.linger_s, 1.0)},
    }
    if not weights_given and WeightsSpec.parse(settings.model.weights).kind == "torchvision" and not pretrained_cached(settings):
        say(
            "pretrained weights are not in the torch cache and this demo downloads nothing: using random "
            "initialisation (--weights none), so labels are meaningless. Pass --weights FILE, or cache the "
            "torchvision weights, for real predictions."
        )
        overrides["model"] = {"weights": "none"}
    return settings.with_overrides(overrides)


def pretrained_cached(settings: Settings) -> bool:
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(settings.model.name)
        spec = settings.model.weights.upper()
        url = (weights.DEFAULT if spec == "DEFAULT" else weights[spec]).url
    except (KeyError, ValueError):
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).exists()


def _run(settings: Settings, work: Path, images: str | None, count: int, timeout_s: float, show: Show | None) -> int:
    from streams.embedded.samples import generate_dataset

    asyncio.run(ensure_topics(settings.kafka, settings.topics))
    say("starting the stream worker (visionstream worker) ...")
    worker = start_stream_worker(settings, work / "logs", log_level="WARNING")
    log_path = work / "logs" / "worker.log"
    try:
        wait_ready(settings, worker, log_path, timeout_s=180)
        say(f"worker ready: http://{settings.worker.web_host}:{settings.worker.web_port}/health")
        if images is None:
            images = str(work / "sample")
            generate_dataset(images, count, bad_files=2)
            say(f"generated {count} Stanford-Dogs-layout images and 2 unreadable files")
            upload_from = [str(Path(images) / "Images")]
        else:
            upload_from = [images]
        expected = len(list(local_files(upload_from, "")))
        create_bucket(settings.storage, settings.storage.bucket)
        started = time.perf_counter()
        asyncio.run(upload_paths(upload_from, "", settings, notify=True))
        say(f"uploaded {expected} objects to s3://{settings.storage.bucket}/ with their S3 events; predictions:")
        events = asyncio.run(collect(settings, expected, timeout_s, show))
        elapsed = time.perf_counter() - started
    finally:
        stop(worker)
    print(summary(events, expected, elapsed), flush=True)
    return 0 if len(events) >= expected else 1


def wait_ready(settings: Settings, worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    url = f"http://{settings.worker.web_host}:{settings.worker.web_port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise EmbeddedStackError(f"the stream worker exited ({worker.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if json.load(response).get("status") == "ready":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise EmbeddedStackError(f"the stream worker was not ready within {timeout_s:.0f} s (log: {log_path})")


async def collect(settings: Settings, expected: int, timeout_s: float, show: Show | None = None) -> dict[str, dict[str, Any]]:
    """Latest event per URI from the predictions and dead-letter topics, each shown as it comes."""
    topics = settings.topics
    consumer = await start_consumer(settings.kafka, topics.predictions, topics.dead_letter, from_beginning=True)
    events: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(events) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = json.loads(record.value)
                    if event.get("uri"):
                        events[event["uri"]] = event
                    if show is not None:
                        show(event)
    finally:
        await consumer.stop()
    return events


def summary(events: dict[str, dict[str, Any]], expected: int, elapsed_s: float) -> str:
    predictions = [e for e in events.values() if is_prediction(e)]
    errors = len(events) - len(predictions)
    judged = [e for e in predictions if e.get("match") is not None]
    matches = sum(1 for e in judged if e["match"])
    latencies = sorted(e["latency_ms"] for e in predictions if e.get("latency_ms") is not None)

    def pct(q: float) -> str:
        value = percentile(latencies, q)
        return "n/a" if value is None else f"{value:.0f} ms"

    top1 = f"{accuracy(matches, len(judged)):.1%} ({matches}/{len(judged)})" if judged else "n/a"
    lines = [
        "",
        "visionstream demo summary",
        f"  images        {len(events)} of {expected} accounted for ({len(predictions)} predictions, {errors} dead-lettered)",
        f"  top-1         {top1}",
        f"  throughput    {len(events) / elapsed_s:.1f} images/s over {elapsed_s:.1f} s (upload to last event)",
        f"  latency       p50 {pct(0.5)}, p95 {pct(0.95)} (upload event to prediction event)",
    ]
    if len(events) < expected:
        lines.append(f"  MISSING       {expected - len(events)} images had no event before the timeout")
    return "\n".join(lines)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
