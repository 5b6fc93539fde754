"""What the commands print on a terminal: progress bars and one safe line per event."""

from __future__ import annotations

import json
import sys
from typing import Any

from streams.service.logs import escape
from inference.records.results import is_dead_letter


def progress_bar(description: str, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(desc=description, file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


def describe(event: dict[str, Any]) -> str:
    """One readable line for a prediction or dead-letter event; control characters escaped,
    so nothing in a key or a reason can move the cursor or repaint the terminal."""
    return escape(_describe(event))


def render(value: bytes | None, raw: bool = False) -> str:
    """A record of the topic as one safe line: described, or raw JSON, or what it is if neither."""
    try:
        event = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return escape(f"(not a visionstream event: {(value or b'')[:200]!r})")
    if raw:
        return json.dumps(event, ensure_ascii=True)
    if not isinstance(event, dict):
        return escape(f"(not a visionstream event: {event!r:.200})")
    try:
        return describe(event)
    except (KeyError, TypeError, ValueError, AttributeError):
        return escape(f"(unreadable event: {json.dumps(event, ensure_ascii=True)[:200]})")


def _describe(event: dict[str, Any]) -> str:
    if is_dead_letter(event):
        return f"{event.get('uri') or '(message)'}  FAILED at {event.get('stage')}: {event.get('reason')}"
    prediction = event.get("prediction") or {}
    truth = event.get("ground_truth")
    verdict = {True: "match", False: "MISS"}.get(event.get("match"), "-")
    truth_text = f"truth {truth.get('label') or truth['wnid']}" if truth else "no truth"
    latency = f"{event['latency_ms']:.0f} ms" if event.get("latency_ms") is not None else ""
    return (
        f"{event.get('name', '?'):<28} {prediction.get('label', '?'):<28} {prediction.get('score', 0):6.1%}  "
        f"{truth_text:<32} {verdict:<5} {latency}"
    )
