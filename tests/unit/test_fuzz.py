"""Whatever bytes a producer sends, the per-message path ends in events, never in an exception.

From raw bytes through parsing, filtering, batching and a classifier seam to the encoded
events that would be published: random bytes, random JSON, and mutations of real S3,
MinIO and EventBridge notifications. Each published value must be ASCII JSON within the
producer's limit, and every message must be accounted for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.records.results import Failure, ImageResult, ModelInfo, Prediction
from inference.settings import BatchSettings, EventSettings, FilterSettings, TopicSettings
from streams.service.events import MAX_EVENT_BYTES
from streams.service.processing import BatchHandler, InputMessage

from .test_s3events import AWS, EVENTBRIDGE, MINIO

MODEL = ModelInfo("resnet18", "none", "fp32", "cpu")
TOPICS = TopicSettings()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
awkward_text = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=40)  # surrogates, controls
replacements = json_values | awkward_text | st.just("**/*.jpg") | st.just("a::b.jpg") | st.integers(min_value=-(10**30), max_value=10**30)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_notifications(draw: st.DrawFn) -> bytes:
    document = json.loads(json.dumps(draw(st.sampled_from([AWS, MINIO, EVENTBRIDGE]))))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(document)))
        if not path:
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()):
            parent[path[-1]] = draw(replacements)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", errors="surrogatepass")


messages = st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()) | mutated_notifications()


class Seams:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def classify(self, uris: list[str], priority: int) -> list[ImageResult]:
        results = []
        for index, uri in enumerate(uris):
            if index % 3 == 2:
                results.append(ImageResult(uri, "x", None, (), None, None, Failure("fetch", "object not found"), MODEL))
            else:
                best = Prediction(1, "n01440764", "tench", 0.9)
                results.append(ImageResult(uri, "x", best, (best,), None, None, None, MODEL))
        return results

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.published.append((topic, value))


def run(payloads: list[bytes]) -> Seams:
    seams = Seams()
    handler = BatchHandler(
        seams.classify, seams.publish, BatchSettings(size=7), TOPICS,
        FilterSettings(buckets=("dogs", "b")), EventSettings(max_records=20, dead_letter_original_bytes=1024),
    )
    asyncio.run(handler.handle([InputMessage(p, "image-uploads", 0, i) for i, p in enumerate(payloads)]))
    assert handler.counters.events_in == len(payloads)
    dead = sum(1 for topic, _ in seams.published if topic == TOPICS.dead_letter)
    assert dead >= handler.counters.malformed  # every malformed message has its dead letter
    for topic, value in seams.published:
        assert topic in (TOPICS.predictions, TOPICS.dead_letter)
        assert len(value) <= MAX_EVENT_BYTES
        value.decode("ascii")
        json.loads(value)
    return seams


@FUZZ
@given(st.lists(messages, min_size=1, max_size=6))
def test_no_input_raises_and_every_event_is_ascii_json_within_the_limit(payloads: list[bytes]):
    run(payloads)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_become_one_parse_dead_letter_carrying_them(payload: bytes):
    seams = run([payload])
    [(topic, value)] = seams.published  # random bytes are never a notification
    event = json.loads(value)
    assert topic == TOPICS.dead_letter and event["stage"] == "parse" and event["original_size_bytes"] == len(payload)


@FUZZ
@given(mutated_notifications())
def test_a_mutated_notification_is_classified_skipped_or_dead_lettered_alone(payload: bytes):
    good = json.dumps(AWS).encode()
    seams = run([payload, good])
    uris = [json.loads(v).get("uri") for t, v in seams.published if t == TOPICS.predictions]
    assert "s3://dogs/Images/n02085620-Chihuahua/my dog été.jpg" in uris  # the good message is never taken down
