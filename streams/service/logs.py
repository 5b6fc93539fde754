"""Log records as one line each: ``key=value`` text or JSON objects (``--log-format``).

Whatever a message carries (an object key from the outside world, an exception text), a
record stays one line: control characters are escaped in text, and JSON escapes them
itself. Fields given with ``extra={"batch": ..., "topic": ...}`` are emitted as their own
keys, so a batch can be followed from consume to ack.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

NOISY = ("distributed", "aiokafka", "faust", "mode", "botocore", "s3fs", "urllib3", "asyncio")
FIELDS = ("batch", "topic", "partition", "offsets", "images", "predictions", "dead_letters", "duration_ms")
# C0 and C1 controls (0x9b is a one-byte CSI to many terminals), the bidirectional overrides
# and isolates (U+202E shows a key backwards), and the line and paragraph separators.
_INVISIBLE = [*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A), 0xFEFF]
_CONTROL = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _INVISIBLE} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def escape(text: str) -> str:
    """Control and invisible formatting characters as visible escapes: a key with a newline
    cannot forge a log line, one with ANSI or C1 escapes cannot repaint a terminal, one with
    a bidirectional override cannot show itself reversed."""
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = escape(super().format(record))  # a traceback too stays on its line, its newlines shown as \n
        extras = " ".join(f"{name}={escape(str(getattr(record, name)))}" for name in FIELDS if hasattr(record, name))
        return f"{line} {extras}" if extras else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


class ConnectAttempts(logging.Filter):
    """aiokafka logs each failed attempt to reach a bootstrap server at ERROR. Where it gives up
    visionstream raises BrokerUnavailable naming the broker, which the command prints as its one
    line: those attempts are shown at DEBUG only, not as a second line before it. A member that
    cannot reach a broker later (``Unable connect to node with id N``) is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logging.getLogger().level <= logging.DEBUG or not str(record.msg).startswith('Unable connect to "')


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))
    for name in ("aiokafka", "aiokafka.conn"):
        attempts = logging.getLogger(name)
        if not any(isinstance(existing, ConnectAttempts) for existing in attempts.filters):
            attempts.addFilter(ConnectAttempts())
