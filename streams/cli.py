"""The ``visionstream`` commands; thin: parse arguments, load settings, call into the packages."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from inference.errors import InferenceError
from inference.settings import Settings, load_settings
from streams.errors import StreamError
from streams.logs import configure_logging

log = logging.getLogger("visionstream")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.worker__log_format or "text")
    try:
        settings = load_settings(args.config)
        settings = settings.with_overrides(_overrides(args))
        configure_logging(args.log_level, settings.worker.log_format)
        return int(args.run(args, settings) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InferenceError, StreamError) as exc:
        print(f"visionstream: error: {exc}", file=sys.stderr)
        return EXIT_FATAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionstream",
        description="Continuous image classification: S3 upload events -> Kafka -> a Dask cluster -> prediction events.",
    )
    parser.set_defaults(run=lambda args, settings: parser.print_help())
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace, Settings], int | None], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", metavar="FILE", help="YAML file overriding configs/default.yaml")
        sub.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        sub.add_argument("--log-format", dest="worker__log_format", choices=["text", "json"], help="text (key=value) or json, one record per line (default: worker.log_format)")
        sub.set_defaults(run=run)
        return sub

    classify = command("classify", run_classify, "classify files, folders, globs or s3:// prefixes; one JSON line per image")
    classify.add_argument("sources", nargs="+", metavar="SOURCE")
    classify.add_argument("--output", "-o", default="-", metavar="FILE", help="JSON lines to this file ('-' = stdout)")
    _add_model_options(classify)

    from streams import commands as stream_commands

    stream_commands.register(command)
    parser.set_defaults(config=None, log_level="WARNING", worker__log_format=None)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, dest="batch__size", metavar="N")
    parser.add_argument("--model", dest="model__name", metavar="NAME", help="torchvision model name (resnet50)")
    parser.add_argument("--weights", dest="model__weights", metavar="SPEC", help="DEFAULT | IMAGENET1K_V2 | IMAGENET1K_V1 | FILE | s3://... | none")
    parser.add_argument("--precision", dest="model__precision", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", dest="model__device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--scheduler", dest="cluster__scheduler", metavar="ADDRESS", help="Dask scheduler (tcp://host:8786); default: embedded cluster")
    parser.add_argument("--workers", type=int, dest="cluster__n_workers", metavar="N", help="workers of the embedded cluster")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options named ``section__key`` become nested settings overrides."""
    tree: dict[str, Any] = {}
    for name, value in vars(args).items():
        if "__" in name and value is not None:
            section, key = name.split("__", 1)
            tree.setdefault(section, {})[key] = value
    return tree


def run_classify(args: argparse.Namespace, settings: Settings) -> int:
    from inference.cluster import InferenceCluster
    from inference.job import classify_all
    from inference.sources import iter_sources

    uris = iter_sources(args.sources, settings.storage)
    first = next(uris, None)  # fail fast on a source that names nothing
    if first is None:
        return EXIT_OK

    def all_uris():
        yield first
        yield from uris

    output: TextIO = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    progress = progress_bar("classify", unit="img")

    def write(result: Any) -> None:
        output.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        progress.update(1)

    async def run() -> Any:
        cluster = InferenceCluster.from_settings(settings)
        async with cluster:
            in_flight = max(settings.batch.max_in_flight, sum((await cluster.threads()).values()) + 1)
            return await classify_all(cluster, all_uris(), settings.batch.size, in_flight, write)

    try:
        tally = asyncio.run(run())
    finally:
        progress.close()
        if output is not sys.stdout:
            output.close()
        else:
            output.flush()
    print(f"visionstream classify: {tally.summary()}", file=sys.stderr)
    return EXIT_OK


def progress_bar(description: str, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(desc=description, file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)
