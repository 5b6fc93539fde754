"""The ``visionstream`` commands: classify, worker, upload, tail, backfill, reconcile, evaluate, lag, stack, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from inference.records.report import plural
from inference.settings import Settings
from streams.cli.console import describe, progress_bar, render
from streams.service.logs import escape

Command = Callable[[str, Callable[[argparse.Namespace, Settings], int | None], str], argparse.ArgumentParser]


def register(command: Command) -> None:
    from streams.cli import model

    classify = command("classify", run_classify, "classify files, folders, globs or s3:// prefixes; one JSON line per image")
    classify.add_argument("sources", nargs="+", metavar="SOURCE")
    classify.add_argument("--output", "-o", default="-", metavar="FILE", help="JSON lines to this file ('-' = stdout)")
    _add_model_options(classify)

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
    tail.add_argument("--from-beginning", action="store_true",
                      help="from the topic's start (default: only events that arrive from now on; on the embedded broker, whose end "
                           "offsets are unreliable, older ones may appear too)")
    tail.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    tail.add_argument("--idle", type=float, metavar="SECONDS", help="stop after this long without an event")
    tail.add_argument("--json", action="store_true", help="print the raw JSON events")
    tail.add_argument("--dead-letters", action="store_true", help="tail the dead-letter topic instead")

    backfill = command("backfill", run_backfill, "replay a bucket prefix: one ObjectCreated event per image object, to the backfill topic")
    backfill.add_argument("uri", metavar="s3://BUCKET/PREFIX")
    backfill.add_argument("--rate", type=float, metavar="N", help="at most N events per second")
    backfill.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    backfill.add_argument("--start-after", metavar="KEY", help="resume after this key (as printed by an interrupted run)")
    backfill.add_argument("--dry-run", action="store_true", help="count only; publish nothing")
    backfill.add_argument("--topic", metavar="TOPIC", help="default: topics.backfill")

    reconcile = command("reconcile", run_reconcile, "announce the image objects of a prefix that no event covers (lost notifications), to the backfill topic")
    reconcile.add_argument("uri", metavar="s3://BUCKET/PREFIX")
    reconcile.add_argument("--dry-run", action="store_true",
                           help="print the URIs it would announce, one per line, each with why after a tab; publish nothing")
    reconcile.add_argument("--retry-transient", action=argparse.BooleanOptionalAction, default=True,
                           help="announce again objects whose last records are dead letters of a passing cause (a slow or "
                                "refusing store, a decode past its deadline), at most 3 times each (default: on)")
    reconcile.add_argument("--min-age", type=float, default=60.0, metavar="SECONDS",
                           help="leave objects younger than this alone: their notifications may still be on the way (default: 60)")
    reconcile.add_argument("--modified-after", type=_utc_time, metavar="TIME",
                           help="only objects written after this ISO 8601 time (older ones' predictions may have passed the topics' retention)")
    reconcile.add_argument("--idle", type=_positive, default=5.0, metavar="SECONDS",
                           help="where the broker gives no end offsets: stop reading after this long without a record (default: 5)")
    reconcile.add_argument("--topic", metavar="TOPIC", help="default: topics.backfill")

    model.register(command)

    evaluate = command("evaluate", run_evaluate, "accuracy report from the predictions topic or a classify JSONL file")
    evaluate.add_argument("--input", metavar="FILE", help="JSON lines from `visionstream classify` instead of the topic")
    evaluate.add_argument("--from-beginning", action="store_true",
                          help="read the topic from its start (default: only events that arrive from now on; the embedded broker's "
                               "unreliable end offsets may replay older ones there: narrow with --prefix)")
    evaluate.add_argument("--idle", type=float, default=10.0, metavar="SECONDS", help="stop after this long without a new event (default: 10)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    evaluate.add_argument("--prefix", default="", metavar="PREFIX", help="only URIs starting with this (e.g. s3://bucket/dogs/)")
    evaluate.add_argument("--output", default="report", metavar="DIR", help="report folder (default: ./report)")

    lag = command("lag", run_lag, "the consumer group's lag on the input topics, and the replicas a lag autoscaler would run")
    lag.add_argument("--group", dest="kafka__consumer_group", metavar="GROUP", help="default: kafka.consumer_group")
    lag.add_argument("--threshold", type=int, metavar="N",
                     help="lag per replica, as a KEDA Kafka scaler's lagThreshold (default: batch.size x max(2, batch.max_in_flight))")
    lag.add_argument("--json", action="store_true", help="one JSON object")

    stack = command("stack", run_stack, "run the embedded Kafka broker and S3 server on 127.0.0.1 for the other commands, until Ctrl-C")
    stack.add_argument("--config-out", default="visionstream-stack.yaml", metavar="FILE",
                       help="where to write the config file the other commands use (default: ./visionstream-stack.yaml)")
    stack.add_argument("--bucket", dest="storage__bucket", metavar="BUCKET", help="the bucket to create (default: storage.bucket, images)")
    stack.set_defaults(reads_config_env=False)  # the file it names is the one this writes

    demo = command("demo", run_demo, "run everything on loopback: broker, S3, Dask, the stream worker; upload, classify, report")
    demo.add_argument("--images", metavar="DIR", help="a folder of images (Stanford Dogs layout gives accuracy); default: a generated sample")
    demo.add_argument("--count", type=int, default=120, metavar="N", help="images to generate when --images is not given")
    demo.add_argument("--weights", dest="model__weights", metavar="SPEC", help="model weights (default: DEFAULT if cached, else none)")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="give up waiting for predictions after this long")


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.agents import StreamService
    from streams.service.kafka import ensure_topics
    from streams.service.process import GracefulWorker, fatal_echoes_filtered

    from streams.service.kafka import all_topics

    review = [settings.topics.review] if settings.review.enabled else []
    asyncio.run(ensure_topics(settings.kafka, settings.topics, all_topics(settings.topics) + review))
    service = StreamService(settings)
    # keep our log format (configure_logging) instead of Faust's own
    worker = GracefulWorker(service, loglevel=args.log_level.lower(), quiet=True, override_logging=False)
    status = 0
    with fatal_echoes_filtered(lambda: service.fatal or worker.crash_reason, enabled=args.log_level != "DEBUG"):
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    fatal = service.fatal or worker.crash_reason
    if isinstance(fatal, Exception):
        raise fatal  # one line, from main
    if fatal is not None:
        raise RuntimeError(f"the worker stopped: {type(fatal).__name__} {fatal}".strip())
    return status


def run_upload(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.uploads import upload_paths

    from streams.service.s3events import key_problem

    prefix = args.prefix
    if (problem := key_problem(prefix + "x")) is not None:  # the stream worker would refuse every event
        return _usage_error(f"--prefix {prefix!r}: {problem}")
    if prefix and not prefix.endswith("/"):  # "dogs" would make keys dogsn02085620-Chihuahua/...
        prefix += "/"
        print(f"visionstream: warning: --prefix {args.prefix!r} does not end with '/': keys go under {prefix!r}", file=sys.stderr)
    count = asyncio.run(
        upload_paths(args.paths, prefix, settings, notify=args.notify, make_bucket=args.create_bucket)
    )
    print(f"uploaded {plural(count, 'object')} to s3://{settings.storage.bucket}/{escape(prefix)}", file=sys.stderr)
    return 0


def run_tail(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.kafka import start_consumer

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
                        print(render(record.value, raw=args.json), flush=True)
                        seen += 1
                        if args.limit is not None and seen >= args.limit:
                            return
        finally:
            await consumer.stop()

    asyncio.run(tail())
    return 0


def run_lag(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.lag import default_threshold, read_lag

    threshold = args.threshold or default_threshold(settings.batch)
    if threshold < 1:
        return _usage_error("--threshold: 1 or more")
    group = settings.kafka.consumer_group
    lag = asyncio.run(read_lag(settings.kafka, group, [settings.topics.uploads, settings.topics.backfill]))
    if args.json:
        print(json.dumps(lag.as_dict(threshold)))
        return 0
    print(f"{'topic':<32} {'partition':>9} {'committed':>12} {'end':>12} {'lag':>10}")
    for p in lag.partitions:
        committed = "-" if p.committed is None else str(p.committed)
        print(f"{escape(p.topic):<32} {p.partition:>9} {committed:>12} {p.end:>12} {p.lag:>10}")
    print(f"group {escape(group)}: total lag {lag.total}; at {threshold} per replica a lag scaler runs {lag.replicas(threshold)} replica(s)")
    return 0


def run_stack(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from streams.embedded.serve import serve

    def say(text: str) -> None:
        print(f"visionstream stack: {text}", file=sys.stderr, flush=True)

    return serve(settings, Path(args.config_out).resolve(), say)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.embedded.demo import run_demo as demo

    def show(event: dict[str, Any]) -> None:
        print(describe(event), flush=True)

    return demo(settings, images=args.images, count=args.count, timeout_s=args.timeout,
                weights_given=args.model__weights is not None, show=show)


def run_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.backfill import BackfillPlan, BackfillProgress
    from streams.service.backfill import run_backfill as backfill

    try:
        plan = BackfillPlan.parse(args.uri, args.topic or settings.topics.backfill, rate_per_s=args.rate,
                                  limit=args.limit, start_after=args.start_after, dry_run=args.dry_run)
    except ValueError as exc:
        return _usage_error(str(exc))
    progress = progress_bar("backfill", total=args.limit, unit="ev")
    latest = BackfillProgress()  # where the backfill stands: what an interruption resumes from

    def tick(current: BackfillProgress) -> None:
        nonlocal latest
        latest = current
        progress.n = current.published
        progress.set_postfix(skipped=current.skipped, refresh=False)
        if current.published % 200 == 0:
            progress.refresh()

    try:
        done = asyncio.run(backfill(plan, settings, tick))
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted after {latest.published} events; last key published: {latest.last_key!r}", file=sys.stderr)
        if latest.last_key is not None:
            print(escape(f"resume with: visionstream {' '.join(_without_start_after(sys.argv[1:]))} --start-after {shlex.quote(latest.last_key)}"), file=sys.stderr)
        return 130
    progress.n = done.published
    progress.close()
    if done.published == 0 and not args.start_after:  # a typo in the prefix, not an empty backfill
        found = f"no image objects ({plural(done.skipped, 'other object')} skipped: other suffixes, or outside filter.prefix)" if done.skipped else "no objects"
        print(f"visionstream: error: backfill: {found} under {escape(args.uri)} (suffixes: {', '.join(settings.filter.suffixes)}); "
              "check the bucket and prefix", file=sys.stderr)
        return 1
    verb = "would publish" if args.dry_run else "published"
    print(f"backfill: {verb} {plural(done.published, 'event')} from {escape(args.uri)} ({plural(done.skipped, 'non-image object')} skipped, "
          f"{done.rate:.0f} events/s); last key {escape(repr(done.last_key))}", file=sys.stderr)
    return 0


def _usage_error(message: str) -> int:
    """A command's arguments cannot be used: one line, exit status 2 (as argparse's own)."""
    print(f"visionstream: error: {message}", file=sys.stderr)
    return 2


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def _utc_time(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC (``events.parse_time``)."""
    from streams.service.events import parse_time

    moment = parse_time(text)
    if moment is None:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}")
    return moment


def run_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from streams.service.reconcile import ReconcilePlan
    from streams.service.s3events import allowed_filter
    from streams.service.reconcile import run_reconcile as reconcile

    try:
        plan = ReconcilePlan.parse(args.uri, args.topic or settings.topics.backfill, dry_run=args.dry_run,
                                   min_age_s=args.min_age, modified_after=args.modified_after, idle_s=args.idle,
                                   retry_transient=args.retry_transient)
    except ValueError as exc:
        return _usage_error(str(exc))
    buckets = allowed_filter(settings.filter, settings.storage.bucket).buckets
    if "*" not in buckets and plan.bucket not in buckets:
        return _usage_error(f"bucket {plan.bucket!r} is not in filter.buckets ({', '.join(buckets)}; "
                            "empty means storage.bucket): the worker would skip what reconcile announces")
    progress = progress_bar("reconcile: reading the topics", unit="ev")

    def read(count: int) -> None:
        progress.n = count
        progress.refresh()

    def missing(ref: Any, why: str) -> None:
        if args.dry_run:
            print(f"{escape(ref.uri)}\t{why}", flush=True)

    try:
        done = asyncio.run(reconcile(plan, settings, on_missing=missing, on_read=read))
    finally:
        progress.close()
    verb = "would announce" if args.dry_run else "announced"
    skipped = f"; left alone: {done.too_new} younger than {args.min_age:g} s" + (
        f", {done.out_of_range} not modified after {args.modified_after.isoformat()}" if args.modified_after else "") + (
        f", {done.refused} whose keys no event may name" if done.refused else "")
    print(f"reconcile: {done.listed} image objects under {args.uri}, {done.accounted} accounted for "
          f"(topics name {done.versions_known} object versions, {done.index_bytes / 1e6:.1f} MB); "
          f"{verb} {done.announced} to {plan.topic} ({done.never_announced} never announced, {done.unprocessed} announced "
          f"without a result, {done.transient} after a transient dead letter){skipped}", file=sys.stderr)
    return 0


def _without_start_after(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--start-after":
            skip = True
        elif not arg.startswith("--start-after="):
            out.append(shlex.quote(arg))
    return out


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from inference.records.evaluation import latest_per_uri, summarize
    from inference.records.report import headline, write_report

    if args.input:
        records = _read_jsonl(args.input)
        source = args.input
    else:
        records = asyncio.run(_read_topic(settings, args.from_beginning, args.idle, args.limit))
        source = f"kafka topics {settings.topics.predictions}, {settings.topics.dead_letter}"
    outcomes = [o for uri, o in latest_per_uri(records).items() if uri.startswith(args.prefix)]
    if not outcomes:  # an empty report would replace the last good one
        matching = f" under --prefix {args.prefix!r}" if args.prefix else ""
        print(f"visionstream: error: evaluate: no records{matching} in {escape(source)} ({plural(len(records), 'record')} read); "
              f"{escape(str(args.output))} left as it was", file=sys.stderr)
        return 1
    summary = summarize(outcomes)
    written = write_report(summary, args.output, source + (f" (prefix {args.prefix})" if args.prefix else ""))
    print(headline(summary))
    print(f"report: {written[0]}", file=sys.stderr)
    return 0


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a `classify` JSON lines file; SourceError naming the file (and the line) otherwise."""
    from inference.errors import SourceError

    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise SourceError(f"{path}, line {number}: not JSON ({exc})") from exc
                if not isinstance(record, dict):
                    raise SourceError(f"{path}, line {number}: a JSON {type(record).__name__}, not a record")
                if not isinstance(record.get("uri"), str) or not ({"prediction", "error", "schema"} & record.keys()):
                    raise SourceError(f"{path}, line {number}: not a `visionstream classify` record (no uri, prediction or error)")
                records.append(record)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text (a `visionstream classify` JSON lines file?)") from exc
    return records


async def _read_topic(settings: Settings, from_beginning: bool, idle_s: float, limit: int | None) -> list[dict[str, Any]]:
    """The predictions and dead letters, as records (``kafka.read_topics``); values that are not JSON skipped."""
    from streams.service.kafka import read_topics

    records: list[dict[str, Any]] = []
    progress = progress_bar("evaluate: reading", unit="ev")

    def take(topic: str, fetched: list[Any]) -> None:
        for value in (record.value for record in fetched):
            try:
                records.append(json.loads(value or b""))
            except (ValueError, UnicodeDecodeError):
                continue  # not ours; the topic is shared with no one, but be safe

    def on_read(count: int) -> None:
        progress.n = len(records)
        progress.refresh()

    topics = [settings.topics.predictions, settings.topics.dead_letter]
    try:
        await read_topics(settings.kafka, topics, idle_s, take, on_read, from_beginning=from_beginning, limit=limit)
    finally:
        progress.close()
    return records[:limit] if limit is not None else records


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, dest="batch__size", metavar="N")
    parser.add_argument("--model", dest="model__name", metavar="NAME", help="torchvision model name (resnet50)")
    parser.add_argument("--weights", dest="model__weights", metavar="SPEC", help="DEFAULT | IMAGENET1K_V2 | IMAGENET1K_V1 | FILE | s3://... | none")
    parser.add_argument("--precision", dest="model__precision", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", dest="model__device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--scheduler", dest="cluster__scheduler", metavar="ADDRESS", help="Dask scheduler (tcp://host:8786); default: embedded cluster")
    parser.add_argument("--workers", type=int, dest="cluster__n_workers", metavar="N", help="workers of the embedded cluster")


def run_classify(args: argparse.Namespace, settings: Settings) -> int:
    from inference.client.cluster import InferenceCluster
    from inference.client.job import batches_in_flight, classify_all
    from inference.client.sources import iter_sources

    uris = iter_sources(args.sources, settings.storage, settings.filter.suffixes)
    first = next(uris, None)  # fail fast on a source that names nothing
    if first is None:
        return 0

    def all_uris():
        yield first
        yield from uris

    output: TextIO = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    progress = progress_bar("classify", unit="img")

    def write(result: Any) -> None:
        # ASCII-only JSON, as the events are: a key's C1 or bidi controls reach no terminal raw
        output.write(json.dumps(result.to_dict(), ensure_ascii=True) + "\n")
        progress.update(1)

    async def run() -> Any:
        cluster = InferenceCluster.from_settings(settings)
        async with cluster:
            in_flight = batches_in_flight(settings.batch.max_in_flight, sum((await cluster.threads()).values()))
            return await classify_all(cluster, all_uris(), settings.batch.size, in_flight, write)

    try:
        tally = asyncio.run(run())
    finally:
        progress.close()
        failing = sys.exc_info()[1] is not None
        try:
            if output is not sys.stdout:
                output.close()
            else:
                output.flush()
        except BrokenPipeError:
            if not failing:
                raise  # main ends quietly; a failure already under way is the one to report

    print(f"visionstream classify: {tally.summary()}", file=sys.stderr)
    return 0
