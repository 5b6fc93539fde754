import asyncio
import json

import pytest

from inference.results import Failure, ImageResult, ModelInfo, Prediction
from inference.settings import BatchSettings, FilterSettings, TopicSettings
from streams.processing import BatchHandler, BatchRetryExhausted, InputMessage
from streams.s3events import ObjectRef, object_created_event

MODEL = ModelInfo("resnet18", "none", "fp32", "cpu")
TOPICS = TopicSettings()


def upload(key: str, offset: int = 0) -> InputMessage:
    event = object_created_event(ObjectRef("b", key, event_time="2026-11-23T10:00:00Z"))
    return InputMessage(json.dumps(event).encode(), "image-uploads", 0, offset, 1_700_000_000_000)


def fake_result(uri: str) -> ImageResult:
    if "bad" in uri:
        return ImageResult(uri, uri.rsplit("/", 1)[-1], None, (), None, None, Failure("decode", "not a recognised image format"), MODEL)
    best = Prediction(151, "n02085620", "Chihuahua", 0.5)
    return ImageResult(uri, uri.rsplit("/", 1)[-1], best, (best,), None, None, None, MODEL)


class Recorder:
    """The seams: a classify that records batch sizes, a publish that appends."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.published: list[tuple[str, bytes, dict]] = []
        self.failures = failures

    async def classify(self, uris: list[str], priority: int) -> list[ImageResult]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("scheduler unreachable")
        self.batches.append(uris)
        return [fake_result(uri) for uri in uris]

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.published.append((topic, key, json.loads(value)))


def handler(recorder: Recorder, **batch) -> BatchHandler:
    settings = BatchSettings(**({"size": 60, "retry_timeout_s": 5, "retry_backoff_s": 0.01} | batch))
    return BatchHandler(recorder.classify, recorder.publish, settings, TOPICS, FilterSettings())


def test_every_image_gets_one_prediction_in_batches_of_at_most_the_batch_size():
    recorder = Recorder()
    messages = [upload(f"Images/n02085620-Chihuahua/{i}.jpg", i) for i in range(150)]
    asyncio.run(handler(recorder, size=60).handle(messages))
    assert [len(b) for b in recorder.batches] == [60, 60, 30]
    predictions = [p for p in recorder.published if p[0] == TOPICS.predictions]
    assert len({p[1] for p in predictions}) == 150
    assert {p[2]["batch"]["size"] for p in predictions} == {60, 30}


def test_malformed_messages_and_bad_images_go_to_the_dead_letter_topic_and_the_rest_is_classified():
    recorder = Recorder()
    messages = [upload("Images/good.jpg"), InputMessage(b"{not json", "image-uploads", 1, 7), upload("Images/bad.jpg", 1)]
    h = handler(recorder)
    asyncio.run(h.handle(messages))
    by_topic = {}
    for topic, key, event in recorder.published:
        by_topic.setdefault(topic, []).append(event)
    assert [e["uri"] for e in by_topic[TOPICS.predictions]] == ["s3://b/Images/good.jpg"]
    stages = sorted((e["stage"], e["uri"]) for e in by_topic[TOPICS.dead_letter])
    assert stages == [("decode", "s3://b/Images/bad.jpg"), ("parse", None)]
    parse_failure = next(e for e in by_topic[TOPICS.dead_letter] if e["stage"] == "parse")
    assert parse_failure["source"] == {"topic": "image-uploads", "partition": 1, "offset": 7}
    assert parse_failure["original"] == {"text": "{not json"}
    assert h.counters.malformed == 1 and h.counters.image_errors == 1 and h.counters.images_classified == 1


def test_a_failing_cluster_is_retried_until_it_answers():
    recorder = Recorder(failures=3)
    h = handler(recorder)
    asyncio.run(h.handle([upload("Images/a.jpg")]))
    assert h.counters.batch_retries == 3 and len(recorder.published) == 1


def test_when_retries_run_out_the_batch_raises_and_publishes_nothing():
    recorder = Recorder(failures=1000)
    with pytest.raises(BatchRetryExhausted, match="scheduler unreachable"):
        asyncio.run(handler(recorder, retry_timeout_s=0.05).handle([upload("Images/a.jpg")]))
    assert recorder.published == []


def test_publish_failure_propagates_so_the_input_is_not_acknowledged():
    recorder = Recorder()

    async def broken_publish(topic: str, key: bytes, value: bytes) -> None:
        raise ConnectionError("broker gone")

    h = BatchHandler(recorder.classify, broken_publish, BatchSettings(), TOPICS, FilterSettings())
    with pytest.raises(ConnectionError):
        asyncio.run(h.handle([upload("Images/a.jpg")]))


def test_skipped_events_are_counted_and_publish_nothing():
    recorder = Recorder()
    h = BatchHandler(recorder.classify, recorder.publish, BatchSettings(), TOPICS, FilterSettings(suffixes=(".png",)))
    asyncio.run(h.handle([upload("Images/a.jpg")]))
    assert h.counters.skipped == 1 and recorder.published == [] and recorder.batches == []
