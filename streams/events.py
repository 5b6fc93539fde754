"""Wire records: prediction and dead-letter events, as JSON. Pure.

Both carry a ``schema`` string; a consumer checks it before reading the rest. Fields are
only ever added within a version.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from inference.results import ImageResult
from streams.s3events import ObjectRef

PREDICTION_SCHEMA = "visionstream.prediction/v1"
DEAD_LETTER_SCHEMA = "visionstream.dead-letter/v1"
BACKFILL_HEADER = "visionstream-backfill"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def latency_ms(event_time: str | None, fallback_ms: int | None, published: datetime) -> float | None:
    """Upload event to publish: from the S3 event time, else the Kafka message timestamp."""
    start = parse_time(event_time)
    if start is None and fallback_ms is not None:
        start = datetime.fromtimestamp(fallback_ms / 1000, UTC)
    if start is None:
        return None
    return round((published - start).total_seconds() * 1000, 1)


def prediction_event(
    ref: ObjectRef,
    result: ImageResult,
    batch_id: str,
    batch_size: int,
    message_timestamp_ms: int | None = None,
) -> dict[str, Any]:
    published = datetime.now(UTC)
    return {
        "schema": PREDICTION_SCHEMA,
        "uri": ref.uri,
        "bucket": ref.bucket,
        "key": ref.key,
        "etag": ref.etag,
        "version": ref.version,
        "name": result.name,
        "prediction": _plain(result.prediction),
        "top_k": [_plain(p) for p in result.top_k],
        "ground_truth": _plain(result.ground_truth),
        "match": result.match,
        "model": _plain(result.model),
        "event_time": ref.event_time,
        "predicted_at": published.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "latency_ms": latency_ms(ref.event_time, message_timestamp_ms, published),
        "batch": {"id": batch_id, "size": batch_size},
        "backfill": ref.backfill,
        "timings": _plain(result.timings),
        "worker": result.worker,
    }


def dead_letter_event(
    stage: str,
    reason: str,
    original: bytes | dict[str, Any] | None,
    source: dict[str, Any] | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """A failed message (stage ``parse``) or image (``fetch``, ``decode``, ``inference``)."""
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "stage": stage,
        "reason": reason,
        "uri": uri,
        "original": _original(original),
        "source": source,
        "failed_at": now_iso(),
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _original(original: bytes | dict[str, Any] | None) -> Any:
    """The original input, as JSON where it was JSON, else as text or base64."""
    if original is None or isinstance(original, dict):
        return original
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(original).decode("ascii")}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}


def _plain(value: Any) -> Any:
    if value is None:
        return None
    return {name: getattr(value, name) for name in value.__slots__}
