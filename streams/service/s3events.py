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
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote_plus, unquote_plus

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from inference.records.objects import PinnedUri
from inference.settings import EventSettings, FilterSettings
from streams.errors import MalformedEvent

MAX_KEY_BYTES = 1024  # S3's own limit on an object key (UTF-8)
MAX_BUCKET_CHARS = 255  # S3 allows 63; S3-compatible stores allow more
MAX_FIELD_CHARS = 1024  # etags, version ids, event names, times
MAX_SIZE_BYTES = 5 * 1024**4 * 10  # larger than any object S3 stores (5 TiB)

# Why an announced object is not classified; the labels of the skipped-events metric.
SKIP_NOT_CREATED, SKIP_TEST_EVENT, SKIP_FILTERED, SKIP_BUCKET, SKIP_EMPTY = (
    "not_object_created", "test_event", "filtered", "bucket_not_allowed", "no_records",
)
# ObjectCreated events that MinIO sends (its `put` rule expands to every s3:ObjectCreated:*)
# for a change of metadata alone: the bytes are the ones already classified.
METADATA_ONLY_EVENTS = frozenset({
    "ObjectCreated:PutTagging", "ObjectCreated:DeleteTagging", "ObjectCreated:PutRetention", "ObjectCreated:PutLegalHold",
})
# S3 bucket names (legacy ones included: upper case, underscores); no '/' or ':' that would
# make ``s3://bucket/key`` name another bucket, or an access point ARN.
BUCKET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


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

    @property
    def target(self) -> PinnedUri:
        """The URI, pinned to the version this event announced: what the worker reads."""
        return PinnedUri(self.uri, self.version, self.etag)


@dataclass(frozen=True, slots=True)
class Skipped:
    what: str  # the object's URI, or the kind of event
    reason: str  # one of the SKIP_* labels
    detail: str
    bucket: str | None = None  # where the reason is the bucket


@dataclass(frozen=True, slots=True)
class Notification:
    objects: tuple[ObjectRef, ...] = ()
    skipped: tuple[Skipped, ...] = field(default=())


def _printable(text: str) -> str:
    """Text that can travel: valid UTF-8 (no lone surrogates) and no control characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("not valid Unicode (lone surrogate)") from exc
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in text):
        raise ValueError("contains control characters")
    return text


def _iso_time(text: str) -> str:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError("not an ISO 8601 time") from exc
    return text


Text = Annotated[str, Field(max_length=MAX_FIELD_CHARS), AfterValidator(_printable)]
Time = Annotated[str, Field(max_length=64), AfterValidator(_printable), AfterValidator(_iso_time)]
Size = Annotated[StrictInt, Field(ge=0, le=MAX_SIZE_BYTES)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _Bucket(_Model):
    name: Annotated[str, Field(min_length=1, max_length=MAX_BUCKET_CHARS, pattern=BUCKET_PATTERN)]


class _S3Object(_Model):
    key: Annotated[str, Field(min_length=1, max_length=3 * MAX_KEY_BYTES)]  # URL-encoded; checked once decoded
    size: Size | None = None
    etag: Text | None = Field(None, alias="eTag")
    etag_lower: Text | None = Field(None, alias="etag")
    version: Text | None = Field(None, alias="versionId")


class _S3Entity(_Model):
    bucket: _Bucket
    object: _S3Object


class _Marker(_Model):
    backfill: bool = False


class _Record(_Model):
    event_name: Text = Field("", alias="eventName")
    event_time: Time | None = Field(None, alias="eventTime")
    s3: _S3Entity
    visionstream: _Marker | None = None


class _EventBridgeObject(_Model):
    key: Annotated[str, Field(min_length=1, max_length=3 * MAX_KEY_BYTES)]
    size: Size | None = None
    etag: Text | None = None
    version: Text | None = Field(None, alias="version-id")


class _EventBridgeDetail(_Model):
    bucket: _Bucket
    object: _EventBridgeObject
    reason: Text = "PutObject"


class _EventBridge(_Model):
    detail_type: Text = Field(alias="detail-type")
    time: Time | None = None
    detail: _EventBridgeDetail


def parse_notification(payload: bytes | str | dict[str, Any], filter: FilterSettings, limits: EventSettings | None = None) -> Notification:
    """The image objects a notification announces; raises MalformedEvent, and only that, for bad input.

    Bounded: at most ``limits.max_message_bytes`` are read and ``limits.max_records`` records
    accepted; keys longer than S3's 1,024 bytes, control characters, ``::``, numbers and times
    of the wrong type make the whole message malformed.
    """
    limits = limits or EventSettings()
    try:
        return _parse(payload, filter, limits)
    except MalformedEvent:
        raise
    except ValidationError as exc:
        raise MalformedEvent(_describe(exc)) from exc
    except RecursionError as exc:
        raise MalformedEvent("JSON nested too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a producer sends, this message alone is dead-lettered
        raise MalformedEvent(f"unreadable notification: {type(exc).__name__}: {exc}"[:500]) from exc


def _parse(payload: bytes | str | dict[str, Any], filter: FilterSettings, limits: EventSettings) -> Notification:
    document = _as_document(payload, limits)
    if document.get("Type") == "Notification" and isinstance(document.get("Message"), str):
        document = _as_document(document["Message"], limits)
    if document.get("Event") == "s3:TestEvent":
        return Notification(skipped=(Skipped("s3:TestEvent", SKIP_TEST_EVENT, "S3 test event"),))
    if "Records" in document:
        records = document["Records"]
        if not isinstance(records, list):
            raise MalformedEvent("'Records' is not a list")
        if not records:
            return Notification(skipped=(Skipped("Records: []", SKIP_EMPTY, "a notification without records"),))
        if len(records) > limits.max_records:
            raise MalformedEvent(f"{len(records)} records in one message; the limit is {limits.max_records} (events.max_records)")
        refs = [_from_record(record, index) for index, record in enumerate(records)]
    elif "detail" in document and "detail-type" in document:
        refs = [_from_eventbridge(document)]
    else:
        raise MalformedEvent("not an S3 event notification: no 'Records' and no EventBridge 'detail'")
    return _filtered(refs, filter)


def _as_document(payload: bytes | str | dict[str, Any], limits: EventSettings) -> dict[str, Any]:
    if isinstance(payload, dict):
        return payload
    if len(payload) > limits.max_message_bytes:
        raise MalformedEvent(f"message of {len(payload)} bytes; the limit is {limits.max_message_bytes} (events.max_message_bytes)")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}"[:500]) from exc
    if not isinstance(document, dict):
        raise MalformedEvent(f"a JSON {type(document).__name__}, not an object")
    return document


def _from_record(record: Any, index: int) -> ObjectRef | Skipped:
    if not isinstance(record, dict):
        raise MalformedEvent(f"Records[{index}] is not an object")
    if not isinstance(record.get("s3"), dict) or not isinstance(record["s3"].get("bucket"), dict) or not isinstance(record["s3"].get("object"), dict):
        raise MalformedEvent(f"Records[{index}] lacks s3.bucket.name or s3.object.key")
    try:
        parsed = _Record.model_validate(record)
    except ValidationError as exc:
        raise MalformedEvent(f"Records[{index}]: {_describe(exc)}") from exc
    bucket, key = parsed.s3.bucket.name, _decoded_key(parsed.s3.object.key, f"Records[{index}]")
    name = parsed.event_name.removeprefix("s3:")
    if not name.startswith("ObjectCreated"):
        return Skipped(f"s3://{bucket}/{key}", SKIP_NOT_CREATED, f"event {name or 'without a name'} is not ObjectCreated")
    if name in METADATA_ONLY_EVENTS:
        return Skipped(f"s3://{bucket}/{key}", SKIP_NOT_CREATED, f"event {name} changes the object's metadata, not its bytes")
    obj = parsed.s3.object
    return ObjectRef(
        bucket=bucket,
        key=key,
        etag=obj.etag or obj.etag_lower,
        version=obj.version,
        size_bytes=obj.size,
        event_time=parsed.event_time,
        event_name=name,
        backfill=bool(parsed.visionstream and parsed.visionstream.backfill),
    )


def _from_eventbridge(document: dict[str, Any]) -> ObjectRef | Skipped:
    try:
        parsed = _EventBridge.model_validate(document)
    except ValidationError as exc:
        raise MalformedEvent(f"EventBridge event: {_describe(exc)}") from exc
    bucket, key = parsed.detail.bucket.name, _decoded_key(parsed.detail.object.key, "detail.object")
    if parsed.detail_type != "Object Created":
        return Skipped(f"s3://{bucket}/{key}", SKIP_NOT_CREATED, f"event {parsed.detail_type} is not Object Created")
    obj = parsed.detail.object
    return ObjectRef(
        bucket=bucket,
        key=key,
        etag=obj.etag,
        version=obj.version,
        size_bytes=obj.size,
        event_time=parsed.time,
        event_name="ObjectCreated:" + parsed.detail.reason,
    )


def _decoded_key(encoded: str, where: str) -> str:
    """S3 URL-encodes keys in notifications; the decoded key must be one S3 could store."""
    try:
        key = unquote_plus(encoded, errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedEvent(f"{where}: object key is not URL-encoded UTF-8") from exc
    problem = key_problem(key)
    if problem is not None:
        raise MalformedEvent(f"{where}: {problem}")
    return key


def key_problem(key: str) -> str | None:
    """Why an event naming ``key`` is refused (control characters, ``::``, a ``.`` or ``..``
    segment, too long); None if it is not."""
    try:
        _printable(key)
    except ValueError as exc:
        return f"object key {exc}"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"object key longer than S3's {MAX_KEY_BYTES} bytes"
    if "::" in key:
        return "object key contains '::'"
    if any(segment in (".", "..") for segment in key.split("/")):
        # S3 stores it as written, but a client or a proxy that normalises paths reads another
        # object (images/../private/x.jpg is private/x.jpg), outside the prefix the filter allowed
        return "object key has a '.' or '..' segment"
    return None


def allowed_filter(filter: FilterSettings, default_bucket: str) -> FilterSettings:
    """``filter`` with its bucket allowlist resolved: empty means ``default_bucket`` (storage.bucket) only."""
    if filter.buckets:
        return filter
    return filter.model_copy(update={"buckets": (default_bucket,)})


def _filtered(refs: list[ObjectRef | Skipped], filter: FilterSettings) -> Notification:
    objects: list[ObjectRef] = []
    skipped: list[Skipped] = []
    for ref in refs:
        if isinstance(ref, Skipped):
            skipped.append(ref)
        elif filter.buckets and "*" not in filter.buckets and ref.bucket not in filter.buckets:
            skipped.append(Skipped(ref.uri, SKIP_BUCKET, f"bucket {ref.bucket!r} is not in filter.buckets", ref.bucket))
        elif not filter.accepts(ref.key):
            skipped.append(Skipped(ref.uri, SKIP_FILTERED, "outside the prefix/suffix filter"))
        else:
            objects.append(ref)
    return Notification(objects=tuple(objects), skipped=tuple(skipped))


def _describe(exc: ValidationError) -> str:
    """Where and what, never the offending value (it may be huge or hostile)."""
    problems = [f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {error['msg']}" for error in exc.errors(include_input=False, include_url=False)[:3]]
    return "; ".join(problems)[:500]


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
