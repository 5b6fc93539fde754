"""``visionstream stack``: the embedded broker and S3 server, kept running for the other commands.

Starts both on 127.0.0.1 (free ports), creates the bucket, and writes a config file that points
every other command at them, with the settings that suit them (the broker's short group
timeouts, no idempotent producer; the S3 server's local credentials; random weights where no
pretrained ones are cached, since nothing is downloaded). ``VISIONSTREAM_CONFIG`` names that
file for the commands run after it. Runs until SIGINT or SIGTERM, then stops both servers and
removes the file (its ports die with them).
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from inference.settings import WeightsSpec
from inference.settings import Settings, StorageSettings
from streams.embedded.demo import pretrained_cached
from streams.embedded.stack import EMBEDDED_BROKER_KAFKA, EmbeddedStack
from streams.errors import EmbeddedStackError
from streams.service.uploads import create_bucket

Say = Callable[[str], None]


def stack_config(settings: Settings, stack: EmbeddedStack) -> dict[str, Any]:
    """The settings that reach ``stack``: what the config file holds."""
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": stack.bootstrap_servers, **EMBEDDED_BROKER_KAFKA},
        "storage": {**stack.storage_settings(), "bucket": settings.storage.bucket},
    }
    if WeightsSpec.parse(settings.model.weights).kind == "torchvision" and not pretrained_cached(settings):
        config["model"] = {"weights": "none"}
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Only its owner may read it (it holds the local S3 server's credentials: fixed, local-only
    values, but a config file is where real ones go too): written to a new file of mode 0600,
    then renamed over ``path``, so neither an existing file's mode nor a link there counts."""
    header = (
        f"# written by `visionstream stack` (pid {os.getpid()}) at {datetime.now(UTC).isoformat(timespec='seconds')};\n"
        "# valid while it runs: its ports close when it stops, and it removes this file then\n"
    )
    fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(header + yaml.safe_dump(config, sort_keys=False))
        os.replace(fresh, path)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise


def serve(settings: Settings, config_path: Path, say: Say, log_dir: Path | None = None, stop: threading.Event | None = None) -> int:
    """Run the stack until ``stop`` is set (by SIGINT/SIGTERM once it runs, when not given)."""
    if not config_path.parent.is_dir():
        raise EmbeddedStackError(f"cannot write the config file {config_path}: no folder {config_path.parent}")
    say("starting a Kafka-protocol broker and an S3 server on 127.0.0.1 ...")
    with EmbeddedStack(log_dir=log_dir) as stack:  # Ctrl-C while they start: KeyboardInterrupt stops them
        config = stack_config(settings, stack)
        storage = StorageSettings(**config["storage"])
        create_bucket(storage, storage.bucket)
        write_config(config_path, config)
        stop = stop or _stop_on_signals()
        try:
            weights = " (model.weights: none: no pretrained weights in the torch cache, labels are meaningless)" if "model" in config else ""
            say(f"Kafka {stack.bootstrap_servers}, S3 {storage.endpoint_url}, bucket {storage.bucket!r}{weights}")
            say(f"config written to {config_path}; in another shell:\n\n    export VISIONSTREAM_CONFIG={shlex.quote(str(config_path))}\n"
                "    visionstream worker\n\nCtrl-C stops the stack.")
            while not stop.wait(0.5):  # short waits: a signal's handler runs between them
                pass
        finally:
            config_path.unlink(missing_ok=True)
    say("stack stopped")
    return 0


def _stop_on_signals() -> threading.Event:
    """The first SIGINT or SIGTERM asks for a clean stop; a second one stops at once
    (KeyboardInterrupt: the servers are still stopped by PID on the way out)."""
    stop = threading.Event()

    def first(number: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, first)
    return stop
