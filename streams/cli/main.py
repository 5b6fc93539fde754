"""The ``visionstream`` entry point: parse arguments, load settings, run the command (``streams.cli.commands``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import dask.config

from inference.errors import InferenceError
from inference.settings import CONFIG_ENV, Settings, load_settings
from streams.cli import commands as commands_module
from streams.errors import StreamError
from streams.service.logs import configure_logging, escape

log = logging.getLogger("visionstream")

EXIT_OK, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 130


def main(argv: Sequence[str] | None = None) -> int:
    quiet_distributed_logging()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.log_level, args.worker__log_format or "text")
    try:
        settings = _load(args)
        configure_logging(args.log_level, settings.worker.log_format)
        status = int(args.run(args, settings) or EXIT_OK)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        _silence_stdout()
        return EXIT_OK
    except (InferenceError, StreamError) as exc:
        log.debug("fatal error", exc_info=exc)
        print(f"visionstream: error: {escape(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FATAL
    except Exception as exc:  # noqa: BLE001 - a library's error we did not name: still one line
        log.debug("unexpected fatal error", exc_info=exc)
        said = f": {escape(str(exc))}" if str(exc) else ""
        print(f"visionstream: error: {type(exc).__name__}{said} (--log-level DEBUG shows where)", file=sys.stderr)
        return EXIT_FATAL


def _load(args: argparse.Namespace) -> Settings:
    """Defaults, then the file ``VISIONSTREAM_CONFIG`` names (for the commands that read it),
    then ``--config`` on top of it, then the environment, then the options."""
    reads_env = getattr(args, "reads_config_env", True)
    named = os.environ.get(CONFIG_ENV) if reads_env else None
    if args.config and named:  # said, so that nobody wonders where a key they did not write came from
        log.info("settings: %s layered on %s (named by %s)", escape(args.config), escape(named), CONFIG_ENV)
    settings = load_settings(args.config, config_env=reads_env)
    return settings.with_overrides(_overrides(args), source="command-line options")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def quiet_distributed_logging() -> None:
    """Warnings only from ``distributed``, unless dask's own configuration (a YAML file,
    ``DASK_LOGGING__DISTRIBUTED``) names a level. distributed reads this when it is first
    imported, and a nanny hands it to the worker processes it starts."""
    if dask.config.get("logging.distributed", None) is None:
        dask.config.set({"logging.distributed": "warning"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionstream",
        description="Continuous image classification: S3 upload events -> Kafka -> a Dask cluster -> prediction events.",
    )
    parser.set_defaults(run=lambda args, settings: parser.print_help())
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace, Settings], int | None], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", metavar="FILE", help=f"YAML file of settings, layered on configs/default.yaml and on the file ${CONFIG_ENV} names")
        sub.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        sub.add_argument("--log-format", dest="worker__log_format", choices=["text", "json"], help="text (key=value) or json, one record per line (default: worker.log_format)")
        sub.set_defaults(run=run, parser=sub)
        return sub

    commands_module.register(command)
    parser.set_defaults(config=None, log_level="WARNING", worker__log_format=None)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options named ``section__key`` become nested settings overrides."""
    tree: dict[str, Any] = {}
    for name, value in vars(args).items():
        if "__" in name and value is not None:
            section, key = name.split("__", 1)
            tree.setdefault(section, {})[key] = value
    return tree
