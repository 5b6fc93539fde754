import json
from datetime import UTC, datetime

from inference.records.results import GroundTruth, ImageResult, ModelInfo, Prediction, Timings
from streams.service.events import DEAD_LETTER_SCHEMA, PREDICTION_SCHEMA, dead_letter_event, encode, latency_ms, prediction_event
from streams.service.s3events import ObjectRef

MODEL = ModelInfo("resnet50", "IMAGENET1K_V2", "fp16", "cuda:0")


def test_prediction_event_carries_every_documented_field():
    chihuahua = Prediction(151, "n02085620", "Chihuahua", 0.91)
    result = ImageResult("s3://b/k.jpg", "k.jpg", chihuahua, (chihuahua,), GroundTruth("n02085620", "Chihuahua"), True, None, MODEL, Timings(batch_size=60))
    ref = ObjectRef("b", "k.jpg", etag="e", version="v", event_time="2026-11-23T10:00:00Z")
    event = json.loads(encode(prediction_event(ref, result, "batch1", 60)))
    assert event["schema"] == PREDICTION_SCHEMA
    for field in ("uri", "bucket", "key", "etag", "version", "name", "prediction", "top_k", "ground_truth", "match", "model", "event_time", "predicted_at", "latency_ms", "batch"):
        assert field in event, field
    assert event["prediction"] == {"class_index": 151, "wnid": "n02085620", "label": "Chihuahua", "score": 0.91}
    assert event["batch"] == {"id": "batch1", "size": 60}
    assert event["latency_ms"] > 0


def test_latency_from_event_time_else_message_timestamp():
    published = datetime(2026, 11, 23, 10, 0, 1, tzinfo=UTC)
    assert latency_ms("2026-11-23T10:00:00Z", None, published) == 1000.0
    assert latency_ms(None, int(datetime(2026, 11, 23, 10, 0, 0, 500000, tzinfo=UTC).timestamp() * 1000), published) == 500.0
    assert latency_ms("garbage", None, published) is None
    assert latency_ms(" 2026-11-23T10:00:00z", None, published) == latency_ms("2026-11-23T10:00:00", None, published) == 1000.0  # RFC 3339's z; no zone is UTC


def test_dead_letter_keeps_the_original_in_readable_form():
    as_json = dead_letter_event("parse", "not an S3 event", b'{"a": 1}', {"topic": "t", "partition": 0, "offset": 5})
    assert as_json["schema"] == DEAD_LETTER_SCHEMA and as_json["original"] == {"a": 1}
    assert dead_letter_event("parse", "x", b"plain text")["original"] == {"text": "plain text"}
    assert dead_letter_event("parse", "x", b"\xff\x00")["original"] == {"base64": "/wA="}


def test_events_are_recognised_by_their_schema_name_of_any_version():
    from inference.records.results import is_dead_letter, is_prediction

    assert is_prediction({"schema": PREDICTION_SCHEMA}) and not is_dead_letter({"schema": PREDICTION_SCHEMA})
    assert is_dead_letter({"schema": DEAD_LETTER_SCHEMA}) and not is_prediction({"schema": DEAD_LETTER_SCHEMA})
    assert is_prediction({"schema": PREDICTION_SCHEMA.replace("/v1", "/v2")})  # a later version is still a prediction
    assert not any(check(record) for check in (is_prediction, is_dead_letter) for record in ({}, {"schema": None}, {"schema": "other/v1"}))


def test_a_replayed_objects_latency_counts_from_its_announcement_not_its_upload():
    import time

    chihuahua = Prediction(151, "n02085620", "Chihuahua", 0.91)
    result = ImageResult("s3://b/k.jpg", "k.jpg", chihuahua, (chihuahua,), None, None, None, MODEL, Timings(batch_size=1))
    announced_ms = int(time.time() * 1000) - 2000
    old = ObjectRef("b", "k.jpg", event_time="2020-01-01T00:00:00Z", backfill=True)
    event = prediction_event(old, result, "b1", 1, announced_ms)
    assert 2000 <= event["latency_ms"] < 60_000
    live = prediction_event(ObjectRef("b", "k.jpg", event_time="2020-01-01T00:00:00Z"), result, "b1", 1, announced_ms)
    assert live["latency_ms"] > 1e9  # a live event's own time counts


def test_a_dead_letter_carries_no_uploaders_identity_but_stays_replayable():
    """Whoever reads the dead-letter topic (compose's outside user may) learns no other uploader's
    access key, address or request ids; the original still parses to the same object."""
    from streams.service.s3events import parse_notification
    from inference.settings import FilterSettings

    aws = {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": "2026-11-23T21:32:09.123Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLEKEYID"}, "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {"x-amz-request-id": "R1", "x-amz-id-2": "I2"},
        "s3": {"bucket": {"name": "images"}, "object": {"key": "a/b.jpg", "size": 3, "eTag": "e1"}},
    }]}
    minio = {"EventName": "s3:ObjectCreated:Put", "Key": "images/a/b.jpg", "Records": [dict(aws["Records"][0], source={"host": "198.51.100.9", "port": "", "userAgent": "MinIO (linux)"})]}
    bridge = {"detail-type": "Object Created", "source": "aws.s3", "detail": {"bucket": {"name": "images"}, "object": {"key": "a/b.jpg", "etag": "e1"},
              "requester": "123456789012", "source-ip-address": "203.0.113.7", "request-id": "R1"}}
    for message in (aws, minio, bridge):
        event = dead_letter_event("decode", "bad image", json.dumps(message).encode())
        text = json.dumps(event)
        for leak in ("AIDAEXAMPLEKEYID", "203.0.113.7", "198.51.100.9", "MinIO (linux)", "123456789012", '"R1"'):
            assert leak not in text, (leak, text)
        assert event["original_size_bytes"] == len(json.dumps(message).encode())
        [ref] = parse_notification(json.dumps(event["original"]).encode(), FilterSettings(buckets=("*",))).objects
        assert (ref.bucket, ref.key) == ("images", "a/b.jpg")
