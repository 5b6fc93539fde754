"""Log lines and `tail` output stay one line each, whatever a key or a reason contains."""

import json
import logging

from streams.cli.console import render
from streams.service.logs import JsonFormatter, TextFormatter, escape
from inference.records.results import DEAD_LETTER_SCHEMA


def record(message: str, **extra) -> logging.LogRecord:
    entry = logging.LogRecord("streams.service.processing", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(extra)
    return entry


def test_a_key_with_a_newline_cannot_forge_a_text_log_line():
    line = TextFormatter().format(record("skipped 'a\nlevel=ERROR logger=forged x'", batch="b1", offsets="t/0:5-9"))
    assert "\n" not in line and "\\n" in line
    assert line.endswith("batch=b1 offsets=t/0:5-9")


def test_json_log_lines_are_one_object_each_with_the_batch_fields():
    line = JsonFormatter().format(record("batch classified", batch="b1", offsets="t/0:0-59", images=60, predictions=59, dead_letters=1))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "batch classified" and entry["level"] == "INFO" and entry["images"] == 60 and entry["batch"] == "b1"


def test_tail_escapes_terminal_control_sequences():
    event = {"schema": DEAD_LETTER_SCHEMA, "uri": "s3://b/\x1b[2J\x1b[31mred.jpg", "stage": "fetch", "reason": "x\ry"}
    line = render(json.dumps(event).encode())
    assert "\x1b" not in line and "\r" not in line and "\\x1b[2J" in line
    assert "\x1b" not in render(b"\x1b[2J not json") and "\x1b" not in render(json.dumps(["\x1b"]).encode())
    assert escape("ok") == "ok"


def test_c1_controls_bidi_overrides_and_line_separators_are_escaped_too():
    hostile = "a\x9b2Jb\u202egpj.exe\u2028level=ERROR\u2029c\u2066d\ufeff"
    line = TextFormatter().format(record(f"skipped {hostile!s}"))
    for character in ("\x9b", "\u202e", "\u2028", "\u2029", "\u2066", "\ufeff"):
        assert character not in line
    assert "\\x9b" in line and "\\u202e" in line and "\\u2028" in line
    assert escape("Chihuahua – naïve café") == "Chihuahua – naïve café"  # ordinary text stays as it is
    assert "\u202e" not in render(json.dumps({"schema": DEAD_LETTER_SCHEMA, "uri": "s3://b/\u202eexe.jpg", "stage": "x", "reason": "y"}).encode())
