"""The stream-side commands: worker, upload, tail, demo (registered into streams.cli)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from inference.settings import Settings

Command = Callable[[str, Callable[[argparse.Namespace, Settings], int | None], str], argparse.ArgumentParser]


def register(command: Command) -> None:
    worker = command("worker", run_worker, "run a stream worker: S3 events in, prediction events out")
    worker.add_argument("--web-port", type=int, dest="worker__web_port", metavar="PORT", help="health endpoint port")
    worker.add_argument("--scheduler", dest="cluster__scheduler", metavar="ADDRESS", help="Dask scheduler (tcp://host:8786)")

    upload = command("upload", run_upload, "put images into the bucket; --notify also publishes their S3 events")
    upload.add_argument("paths", nargs="+", metavar="FILE|DIR")
    upload.add_argument("--bucket", dest="storage__bucket", metavar="BUCKET")
    upload.add_argument("--prefix", default="", metavar="PREFIX", help="key prefix; a folder keeps its own name under it")
    upload.add_argument("--notify", action="store_true", help="publish the ObjectCreated event to the uploads topic (for S3 servers that cannot notify Kafka)")
    upload.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")

    tail = command("tail", run_tail, "print prediction events as they arrive")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    tail.add_argument("--idle", type=float, metavar="SECONDS", help="stop after this long without an event")
    tail.add_argument("--json", action="store_true", help="print the raw JSON events")
    tail.add_argument("--dead-letters", action="store_true", help="tail the dead-letter topic instead")

    demo = command("demo", run_demo, "run everything on loopback: broker, S3, Dask, the stream worker; upload, classify, report")
    demo.add_argument("--images", metavar="DIR", help="a folder of images (Stanford Dogs layout gives accuracy); default: a generated sample")
    demo.add_argument("--count", type=int, default=120, metavar="N", help="images to generate when --images is not given")
    demo.add_argument("--weights", dest="model__weights", metavar="SPEC", help="model weights (default: DEFAULT if cached, else none)")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="give up waiting for predictions after this long")


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    import faust

    from streams.agents import StreamService
    from streams.kafka import ensure_topics

    asyncio.run(ensure_topics(settings.kafka, settings.topics))
    service = StreamService(settings)
    worker = faust.Worker(service.app, loglevel=args.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0


def run_upload(args: argparse.Namespace, settings: Settings) -> int:
    from streams.uploads import upload_paths

    count = asyncio.run(
        upload_paths(args.paths, args.prefix, settings, notify=args.notify, make_bucket=args.create_bucket)
    )
    print(f"uploaded {count} objects to s3://{settings.storage.bucket}/{args.prefix}", file=sys.stderr)
    return 0


def run_tail(args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka import start_consumer

    topic = settings.topics.dead_letter if args.dead_letters else settings.topics.predictions

    async def tail() -> None:
        consumer = await start_consumer(settings.kafka, topic, from_beginning=args.from_beginning)
        seen = 0
        try:
            while args.limit is None or seen < args.limit:
                batch = await consumer.getmany(timeout_ms=1000 if args.idle is None else int(args.idle * 1000))
                if not batch and args.idle is not None:
                    return
                for records in batch.values():
                    for record in records:
                        print(record.value.decode() if args.json else describe(json.loads(record.value)), flush=True)
                        seen += 1
                        if args.limit is not None and seen >= args.limit:
                            return
        finally:
            await consumer.stop()

    asyncio.run(tail())
    return 0


def describe(event: dict[str, Any]) -> str:
    """One readable line for a prediction or dead-letter event."""
    if event.get("schema", "").startswith("visionstream.dead-letter"):
        return f"{event.get('uri') or '(message)'}  FAILED at {event['stage']}: {event['reason']}"
    prediction = event.get("prediction") or {}
    truth = event.get("ground_truth")
    verdict = {True: "match", False: "MISS", None: "-"}[event.get("match")]
    truth_text = f"truth {truth.get('label') or truth['wnid']}" if truth else "no truth"
    latency = f"{event['latency_ms']:.0f} ms" if event.get("latency_ms") is not None else ""
    return (
        f"{event.get('name', '?'):<28} {prediction.get('label', '?'):<28} {prediction.get('score', 0):6.1%}  "
        f"{truth_text:<32} {verdict:<5} {latency}"
    )


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.demo import run_demo as demo

    return demo(settings, images=args.images, count=args.count, timeout_s=args.timeout, weights_given=args.model__weights is not None)
