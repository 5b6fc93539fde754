"""S3 / MinIO / EventBridge notifications -> the objects they announce. Pure.

Shapes read:
  - AWS S3 notifications:        {"Records": [{"eventName": "ObjectCreated:Put", "s3": {...}}]}
  - MinIO's Kafka target:        {"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [...]}
  - EventBridge "Object Created": {"detail-type": "Object Created", "detail": {"bucket": {...}, "object": {...}}}
  - any of these inside an SNS envelope: {"Type": "Notification", "Message": "<json>"}
S3's own test event (s3:TestEvent) and non-ObjectCreated events are skipped, not errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from inference.settings import FilterSettings
from streams.errors import MalformedEvent


@dataclass(frozen=True, slots=True)
class ObjectRef:
    bucket: str
    key: str  # already URL-decoded
    etag: str | None = None
    version: str | None = None
    size_bytes: int | None = None
    event_time: str | None = None  # ISO 8601, from the notification
    event_name: str = "ObjectCreated:Put"
    backfill: bool = False

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class Notification:
    objects: tuple[ObjectRef, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (what, why)


def parse_notification(payload: bytes | str | dict[str, Any], filter: FilterSettings) -> Notification:
    """The image objects a notification announces; raises MalformedEvent for unreadable input."""
    document = _as_document(payload)
    if document.get("Type") == "Notification" and isinstance(document.get("Message"), str):
        document = _as_document(document["Message"])
    if document.get("Event") == "s3:TestEvent":
        return Notification(skipped=(("s3:TestEvent", "test event"),))
    if "Records" in document:
        records = document["Records"]
        if not isinstance(records, list):
            raise MalformedEvent("'Records' is not a list")
        refs = [_from_record(record, index) for index, record in enumerate(records)]
    elif "detail" in document and "detail-type" in document:
        refs = [_from_eventbridge(document)]
    else:
        raise MalformedEvent("not an S3 event notification: no 'Records' and no EventBridge 'detail'")
    return _filtered(refs, filter)


def _as_document(payload: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(payload, dict):
        return payload
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedEvent(f"a JSON {type(document).__name__}, not an object")
    return document


def _from_record(record: Any, index: int) -> ObjectRef | tuple[str, str]:
    if not isinstance(record, dict):
        raise MalformedEvent(f"Records[{index}] is not an object")
    name = str(record.get("eventName", ""))
    s3 = record.get("s3")
    bucket = _dig(s3, "bucket", "name")
    key = _dig(s3, "object", "key")
    if not isinstance(bucket, str) or not isinstance(key, str) or not bucket or not key:
        raise MalformedEvent(f"Records[{index}] lacks s3.bucket.name or s3.object.key")
    decoded = unquote_plus(key)
    if not name.removeprefix("s3:").startswith("ObjectCreated"):
        return (f"s3://{bucket}/{decoded}", f"event {name or 'without a name'} is not ObjectCreated")
    obj = s3["object"]
    marker = record.get("visionstream") or {}
    return ObjectRef(
        bucket=bucket,
        key=decoded,
        etag=obj.get("eTag") or obj.get("etag"),
        version=obj.get("versionId"),
        size_bytes=_int_or_none(obj.get("size")),
        event_time=record.get("eventTime"),
        event_name=name.removeprefix("s3:"),
        backfill=bool(isinstance(marker, dict) and marker.get("backfill")),
    )


def _from_eventbridge(document: dict[str, Any]) -> ObjectRef | tuple[str, str]:
    detail = document["detail"]
    bucket = _dig(detail, "bucket", "name")
    key = _dig(detail, "object", "key")
    if not isinstance(bucket, str) or not isinstance(key, str) or not bucket or not key:
        raise MalformedEvent("EventBridge event lacks detail.bucket.name or detail.object.key")
    decoded = unquote_plus(key)
    if document.get("detail-type") != "Object Created":
        return (f"s3://{bucket}/{decoded}", f"event {document.get('detail-type')} is not Object Created")
    obj = detail["object"]
    return ObjectRef(
        bucket=bucket,
        key=decoded,
        etag=obj.get("etag"),
        version=obj.get("version-id"),
        size_bytes=_int_or_none(obj.get("size")),
        event_time=document.get("time"),
        event_name="ObjectCreated:" + str(detail.get("reason", "PutObject")),
    )


def _filtered(refs: list[ObjectRef | tuple[str, str]], filter: FilterSettings) -> Notification:
    objects: list[ObjectRef] = []
    skipped: list[tuple[str, str]] = []
    for ref in refs:
        if isinstance(ref, tuple):
            skipped.append(ref)
        elif not filter.accepts(ref.key):
            skipped.append((ref.uri, "outside the prefix/suffix filter"))
        else:
            objects.append(ref)
    return Notification(objects=tuple(objects), skipped=tuple(skipped))


def _dig(node: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def object_created_event(ref: ObjectRef, source: str = "visionstream") -> dict[str, Any]:
    """The AWS S3 notification a bucket would send for ``ref`` (key URL-encoded, as S3 does)."""
    record: dict[str, Any] = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": ref.event_time,
        "eventName": ref.event_name,
        "requestParameters": {"sourceIPAddress": source},
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": ref.bucket, "arn": f"arn:aws:s3:::{ref.bucket}"},
            "object": {"key": quote_plus(ref.key, safe="/"), "size": ref.size_bytes, "eTag": ref.etag},
        },
    }
    if ref.version:
        record["s3"]["object"]["versionId"] = ref.version
    if ref.backfill:
        record["visionstream"] = {"backfill": True}
    return {"Records": [record]}
