"""Wire records: prediction and dead-letter events, as JSON. Pure.

Both carry a ``schema`` string; a consumer checks it before reading the rest. Fields are
only ever added within a version.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from inference.records.results import DEAD_LETTER_SCHEMA, PREDICTION_SCHEMA, ImageResult  # named there for readers on both sides
from streams.service.s3events import ObjectRef

BACKFILL_HEADER = "visionstream-backfill"

MAX_EVENT_BYTES = 900_000  # under the producers' default 1 MiB request limit, with room for headers
MAX_REASON_CHARS = 2_000
DEFAULT_ORIGINAL_BYTES = 16_384  # events.dead_letter_original_bytes


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 / RFC 3339 time (``Z`` or ``z`` for UTC; no zone means UTC); None if it is not one."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, TypeError, AttributeError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def latency_ms(event_time: str | None, fallback_ms: int | None, published: datetime) -> float | None:
    """Upload event to publish: from the S3 event time, else the Kafka message timestamp
    (which a producer sets freely: out-of-range values give no latency, never an error)."""
    start = parse_time(event_time)
    if start is None and fallback_ms is not None:
        try:
            start = datetime.fromtimestamp(fallback_ms / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            return None
    if start is None:
        return None
    try:
        return round((published - start).total_seconds() * 1000, 1)
    except OverflowError:
        return None


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
        # a replayed object was uploaded long ago: its latency counts from its announcement
        "latency_ms": latency_ms(None if ref.backfill else ref.event_time, message_timestamp_ms, published),
        "batch": {"id": batch_id, "size": batch_size},
        "backfill": ref.backfill,
        "timings": _plain(result.timings),
        "worker": result.worker,
    }


def dead_letter_event(
    stage: str,
    reason: str,
    original: bytes | None,
    source: dict[str, Any] | None = None,
    uri: str | None = None,
    original_max_bytes: int = DEFAULT_ORIGINAL_BYTES,
    etag: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """A failed message (stage ``parse``) or image (``fetch``, ``decode``, ``worker``).

    ``original`` is the input message cut to ``original_max_bytes``: the JSON object itself
    where it is whole and valid, else ``{"text": ...}`` or ``{"base64": ...}``;
    ``original_size_bytes`` and ``original_truncated`` say how much of it there was.
    """
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "stage": stage,
        "reason": reason[:MAX_REASON_CHARS],
        "uri": uri,
        "etag": etag,
        "version": version,
        "original": _original(original, original_max_bytes),
        "original_size_bytes": None if original is None else len(original),
        "original_truncated": original is not None and len(original) > original_max_bytes,
        "source": source,
        "failed_at": now_iso(),
    }


def encode(event: dict[str, Any]) -> bytes:
    """Strict, ASCII-only JSON: any character a producer sent arrives escaped, never raw;
    no NaN or Infinity (ValueError instead: strict parsers refuse them)."""
    return json.dumps(event, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def encode_dead_letter(event: dict[str, Any], max_bytes: int = MAX_EVENT_BYTES) -> bytes:
    """``encode``, with the original cut further (as text) until the event fits ``max_bytes``."""
    data = encode(event)
    while len(data) > max_bytes and event.get("original"):
        budget = max(0, len(encode(event["original"])) - (len(data) - max_bytes) - 64)
        event = event | {"original": _shrunk(event["original"], budget), "original_truncated": True}
        data = encode(event)
    return data


def _original(original: bytes | None, max_bytes: int) -> Any:
    if original is None:
        return None
    cut = original[:max_bytes]
    if len(cut) == len(original):
        try:
            document = json.loads(cut, parse_constant=_refuse)
            if isinstance(document, dict):
                encode(document)
                json.dumps(document, ensure_ascii=False).encode("utf-8")  # lone surrogates: as text below
                return without_identity(document)
        except (ValueError, RecursionError, UnicodeError):
            pass
    try:
        return {"text": cut.decode("utf-8")}
    except UnicodeDecodeError as exc:
        if len(cut) < len(original) and exc.start >= len(cut) - 3:  # a character cut in half at the cap
            return {"text": cut[: exc.start].decode("utf-8", errors="replace")}
        return {"base64": base64.b64encode(cut).decode("ascii")}


# What a notification says of who uploaded and from where, not needed to replay it: S3's and
# MinIO's userIdentity (an access key id), requestParameters (source address), responseElements
# (request ids, MinIO's endpoint), MinIO's source (client host, user agent), EventBridge's
# requester and source-ip-address. Dead letters are readable by whoever may read the dead-letter
# topic (compose's outside client user, for one): they carry none of another uploader's identity.
IDENTITY_FIELDS = frozenset({"userIdentity", "requestParameters", "responseElements", "requester", "source-ip-address", "request-id"})


def without_identity(document: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """``document`` without the uploader's identity (``IDENTITY_FIELDS``, and MinIO's ``source``
    object), wherever it sits in the records; the rest as it was. Pure."""
    if depth > 8:
        return document
    kept: dict[str, Any] = {}
    for name, value in document.items():
        if name in IDENTITY_FIELDS or (name == "source" and isinstance(value, dict) and {"host", "userAgent"} & value.keys()):
            continue
        if isinstance(value, dict):
            value = without_identity(value, depth + 1)
        elif isinstance(value, list):
            value = [without_identity(item, depth + 1) if isinstance(item, dict) else item for item in value]
        kept[name] = value
    return kept


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _shrunk(original: Any, budget: int) -> dict[str, str]:
    """The original as text or base64 within about ``budget`` bytes of JSON."""
    if isinstance(original, dict) and set(original) == {"base64"}:
        return {"base64": original["base64"][: max(0, budget) // 4 * 4]}
    text = original["text"] if isinstance(original, dict) and set(original) == {"text"} else json.dumps(original, ensure_ascii=True)
    return {"text": text[: max(0, budget) // 6]}  # an escaped character takes at most 6 bytes


def _plain(value: Any) -> Any:
    if value is None:
        return None
    return {name: getattr(value, name) for name in value.__slots__}
