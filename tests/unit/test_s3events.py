import json

import pytest

from inference.settings import FilterSettings
from streams.errors import MalformedEvent
from streams.service.s3events import SKIP_BUCKET, SKIP_FILTERED, SKIP_NOT_CREATED, SKIP_TEST_EVENT, ObjectRef, object_created_event, parse_notification

ALL = FilterSettings()

AWS = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-11-23T10:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": "dogs", "arn": "arn:aws:s3:::dogs"},
                "object": {"key": "Images/n02085620-Chihuahua/my+dog+%C3%A9t%C3%A9.jpg", "size": 1024, "eTag": "abc", "versionId": "v1", "sequencer": "0A"},
            },
        }
    ]
}

MINIO = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "dogs/Images/x.jpg",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "eventTime": "2026-11-23T10:00:01.000Z",
            "eventName": "s3:ObjectCreated:Put",
            "s3": {"bucket": {"name": "dogs"}, "object": {"key": "Images%2Fx.jpg", "size": 10, "eTag": "e1"}},
        }
    ],
}

EVENTBRIDGE = {
    "version": "0",
    "id": "17793124-05d4-b198-2fde-7ededc63b103",
    "detail-type": "Object Created",
    "source": "aws.s3",
    "time": "2026-11-23T10:00:02Z",
    "region": "us-east-1",
    "detail": {
        "version": "0",
        "bucket": {"name": "dogs"},
        "object": {"key": "Images/with space.png", "size": 5, "etag": "e2", "version-id": "v9"},
        "reason": "PutObject",
    },
}


def test_aws_notification_with_url_encoded_unicode_key():
    [ref] = parse_notification(json.dumps(AWS).encode(), ALL).objects
    assert ref == ObjectRef(
        bucket="dogs", key="Images/n02085620-Chihuahua/my dog été.jpg", etag="abc", version="v1",
        size_bytes=1024, event_time="2026-11-23T10:00:00.000Z", event_name="ObjectCreated:Put",
    )
    assert ref.uri == "s3://dogs/Images/n02085620-Chihuahua/my dog été.jpg"


def test_minio_payload():
    [ref] = parse_notification(json.dumps(MINIO), ALL).objects
    assert (ref.bucket, ref.key, ref.etag, ref.event_name) == ("dogs", "Images/x.jpg", "e1", "ObjectCreated:Put")


def test_eventbridge_object_created():
    [ref] = parse_notification(json.dumps(EVENTBRIDGE), ALL).objects
    assert (ref.bucket, ref.key, ref.version, ref.event_time) == ("dogs", "Images/with space.png", "v9", "2026-11-23T10:00:02Z")


def test_sns_envelope_is_unwrapped():
    envelope = {"Type": "Notification", "Message": json.dumps(AWS)}
    assert len(parse_notification(json.dumps(envelope), ALL).objects) == 1


def test_a_record_may_carry_several_objects():
    doubled = {"Records": AWS["Records"] * 2 + MINIO["Records"]}
    assert len(parse_notification(json.dumps(doubled), ALL).objects) == 3


def test_other_event_types_and_test_events_are_skipped_not_errors():
    removed = json.loads(json.dumps(AWS))
    removed["Records"][0]["eventName"] = "ObjectRemoved:Delete"
    parsed = parse_notification(json.dumps(removed), ALL)
    assert parsed.objects == () and "not ObjectCreated" in parsed.skipped[0].detail and parsed.skipped[0].reason == SKIP_NOT_CREATED
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "dogs"}
    [skipped] = parse_notification(json.dumps(test_event), ALL).skipped
    assert (skipped.what, skipped.reason) == ("s3:TestEvent", SKIP_TEST_EVENT)
    deleted = dict(EVENTBRIDGE, **{"detail-type": "Object Deleted"})
    assert parse_notification(json.dumps(deleted), ALL).objects == ()


def test_prefix_and_suffix_filter_skips_and_counts():
    only_png = FilterSettings(prefix="Images/", suffixes=(".png",))
    parsed = parse_notification(json.dumps(AWS), only_png)
    assert parsed.objects == () and parsed.skipped[0].reason == SKIP_FILTERED


def test_buckets_outside_the_allowlist_are_skipped_never_returned():
    parsed = parse_notification(json.dumps(AWS), FilterSettings(buckets=("images",)))
    assert parsed.objects == () and parsed.skipped[0].reason == SKIP_BUCKET and "dogs" in parsed.skipped[0].detail
    assert len(parse_notification(json.dumps(AWS), FilterSettings(buckets=("images", "dogs"))).objects) == 1
    assert len(parse_notification(json.dumps(AWS), FilterSettings(buckets=("*",))).objects) == 1


def _with_key(key: str) -> bytes:
    doc = json.loads(json.dumps(AWS))
    doc["Records"][0]["s3"]["object"]["key"] = key
    return json.dumps(doc).encode()


def _with_object_field(name: str, value) -> bytes:
    doc = json.loads(json.dumps(AWS))
    doc["Records"][0]["s3"]["object"][name] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # the triggers found against a running worker, each once a crash loop
        (b'{"Records": "\\udfff"}', "not a list"),
        (json.dumps({"Records": [{"eventName": "\udfff", "s3": {}}]}).encode(), "lacks"),
        (_with_key("Images/\udfff.jpg"), "surrogate|unicode"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not JSON"),
        (_with_object_field("size", 1e400), "size"),
        (_with_object_field("size", "x" * 10), "size"),
        (_with_object_field("size", -1), "size"),
        (json.dumps(dict(AWS, Records=[dict(AWS["Records"][0], eventTime=12345)])).encode(), "eventTime"),
        (json.dumps(dict(AWS, Records=[dict(AWS["Records"][0], eventTime="yesterday")])).encode(), "eventTime"),
        (b"\xff" * 2_000_000, "limit is 1048576"),
        # keys S3 could not hold, or that would mean something else to a reader
        (_with_key("Images/" + "a" * 1100 + ".jpg"), "longer than S3's 1024 bytes"),
        (_with_key("Images/a%00b.jpg"), "control characters"),
        (_with_key("Images/line%0Abreak.jpg"), "control characters"),
        (_with_key("Images/%1B%5B31mred.jpg"), "control characters"),
        (_with_key("private/doc::x.jpg"), "'::'"),
        (_with_key("Images/../private/x.jpg"), "'..' segment"),
        (_with_key("./Images/x.jpg"), "'..' segment"),
        (_with_key("Images/%2E%2E/x.jpg"), "'..' segment"),
        (json.dumps({"Records": AWS["Records"] * 101}).encode(), "101 records in one message; the limit is 100"),
    ],
)
def test_hostile_notifications_are_malformed_never_a_crash(payload: bytes, reason: str):
    with pytest.raises(MalformedEvent, match=reason):
        parse_notification(payload, ALL)


def test_glob_characters_and_query_strings_stay_part_of_the_key():
    for key in ("**/*.jpg", "a?versionId=1.jpg", "[abc].jpg", "a/.hidden.jpg", "a/...jpg", "a/..b/c.jpg"):
        [ref] = parse_notification(_with_key(key.replace("?", "%3F")), ALL).objects
        assert ref.key == key


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"{truncated", "not JSON"),
        (b"[1, 2]", "a JSON list"),
        (b'{"hello": "world"}', "not an S3 event notification"),
        (b'{"Records": {"a": 1}}', "not a list"),
        (b'{"Records": [42]}', "not an object"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {}}}]}', "lacks s3.bucket.name"),
        (b'{"detail-type": "Object Created", "detail": {"bucket": {"name": "b"}}}', "detail.object"),
    ],
)
def test_malformed_messages_raise_with_a_reason(payload: bytes, reason: str):
    with pytest.raises(MalformedEvent, match=reason):
        parse_notification(payload, ALL)


def test_object_created_event_round_trips_keys_with_spaces_plus_and_unicode():
    ref = ObjectRef("b", "a dir/x+y ü.jpg", etag="e", size_bytes=3, event_time="2026-11-23T00:00:00Z", backfill=True)
    event = object_created_event(ref)
    assert event["Records"][0]["s3"]["object"]["key"] == "a+dir/x%2By+%C3%BC.jpg"
    [parsed] = parse_notification(json.dumps(event), ALL).objects
    assert parsed == ref


def _with_bucket(name: str) -> bytes:
    doc = json.loads(json.dumps(AWS))
    doc["Records"][0]["s3"]["bucket"]["name"] = name
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "payload",
    [
        _with_bucket("dogs/secret"),  # would read s3://dogs/secret/... as bucket dogs
        _with_bucket("arn:aws-cn:s3:cn-north-1:123456789012:accesspoint:x"),
        _with_key("Images/%ffa.jpg"),  # not UTF-8 once decoded: never silently replaced
        _with_object_field("size", True),
        _with_object_field("size", "12"),
    ],
)
def test_found_in_review_odd_buckets_keys_and_sizes_are_malformed(payload: bytes):
    with pytest.raises(MalformedEvent):
        parse_notification(payload, FilterSettings(buckets=("*",)))


@pytest.mark.parametrize("name", ["s3:ObjectCreated:PutTagging", "ObjectCreated:DeleteTagging", "s3:ObjectCreated:PutRetention", "s3:ObjectCreated:PutLegalHold"])
def test_a_metadata_change_is_skipped_not_classified_again(name):
    """MinIO's `put` rule covers every s3:ObjectCreated:*, tagging included: same bytes, no new prediction."""
    tagged = json.loads(json.dumps(MINIO))
    tagged["Records"][0]["eventName"] = name
    parsed = parse_notification(json.dumps(tagged), ALL)
    assert parsed.objects == () and parsed.skipped[0].reason == SKIP_NOT_CREATED and "metadata" in parsed.skipped[0].detail
    for upload in ("s3:ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload", "s3:ObjectCreated:Copy", "s3:ObjectCreated:Post"):
        tagged["Records"][0]["eventName"] = upload
        assert len(parse_notification(json.dumps(tagged), ALL).objects) == 1
