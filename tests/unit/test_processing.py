import asyncio
import time
import json
from contextlib import contextmanager
from typing import Any

import pytest

from inference.errors import WorkerLost
from inference.records.results import Failure, ImageResult, ModelInfo, Prediction
from inference.settings import BatchSettings, FilterSettings, TopicSettings
from streams.errors import BatchRetryExhausted
from streams.service.events import MAX_EVENT_BYTES
from streams.service.processing import AckTracker, BatchHandler, InputMessage
from streams.service.isolation import NoLedger
from streams.service.s3events import ObjectRef, object_created_event

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


def handler(recorder: Recorder, cluster: Any = None, **batch) -> BatchHandler:
    settings = BatchSettings(**({"size": 60, "retry_timeout_s": 5, "retry_backoff_s": 0.01} | batch))
    return BatchHandler(recorder.classify, recorder.publish, settings, TOPICS, FilterSettings(), **({"cluster": cluster} if cluster else {}))


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


HOSTILE = [
    b'{"Records": [{"eventName": "\\udfff"}]}',
    b"[" * 100_000,
    json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "eventTime": 12, "s3": {"bucket": {"name": "b"}, "object": {"key": "a.jpg"}}}]}).encode(),
    json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "a.jpg", "size": 1e400}}}]}).encode(),
    b"\xfe" * 760_000,
    json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": f"missing/{i}.jpg"}}} for i in range(5000)]}).encode(),
]


def test_hostile_messages_each_become_one_bounded_dead_letter_and_the_good_ones_are_classified():
    recorder = Recorder()
    messages = [InputMessage(payload, "image-uploads", 0, offset) for offset, payload in enumerate(HOSTILE)]
    messages.insert(3, upload("Images/good.jpg", 99))
    h = handler(recorder)
    asyncio.run(h.handle(messages))
    dead = [(key, event) for topic, key, event in recorder.published if topic == TOPICS.dead_letter]
    assert len(dead) == len(HOSTILE) and all(event["stage"] == "parse" for _, event in dead)
    assert [event["uri"] for topic, _, event in recorder.published if topic == TOPICS.predictions] == ["s3://b/Images/good.jpg"]
    assert all(len(json.dumps(event)) < MAX_EVENT_BYTES for _, event in dead)
    assert all(event["original_size_bytes"] == len(HOSTILE[i]) for i, (_, event) in enumerate(dead))


def test_a_dead_letter_never_multiplies_a_huge_message():
    keys = [f"Images/bad{i}.jpg" for i in range(100)]
    message = json.dumps({"Records": [object_created_event(ObjectRef("b", key))["Records"][0] for key in keys], "padding": "x" * 200_000}).encode()
    recorder = Recorder()
    asyncio.run(handler(recorder).handle([InputMessage(message, "image-uploads", 0, 0)]))
    dead = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert len(dead) == 100 and all(event["stage"] == "decode" and event["original_truncated"] for event in dead)
    assert sum(len(json.dumps(event)) for event in dead) < 100 * 40_000  # each carries at most the 16 KiB cap, not 200 KB


class Flaky(Recorder):
    """A cluster whose forward pass fails twice (CUDA out of memory), then works."""

    def __init__(self, error: Exception, times: int) -> None:
        super().__init__()
        self.error, self.times = error, times

    async def classify(self, uris, priority):
        if self.times:
            self.times -= 1
            raise self.error
        return await super().classify(uris, priority)


def test_a_failed_forward_pass_is_retried_never_dead_lettered():
    recorder = Flaky(RuntimeError("CUDA out of memory"), times=2)
    h = handler(recorder)
    asyncio.run(h.handle([upload(f"Images/{i}.jpg", i) for i in range(60)]))
    assert h.counters.batch_retries == 2 and h.counters.image_errors == 0
    assert {topic for topic, _, _ in recorder.published} == {TOPICS.predictions} and len(recorder.published) == 60


class Hanging(Recorder):
    def __init__(self, hangs: int) -> None:
        super().__init__()
        self.hangs = hangs
        self.cancelled = 0

    async def classify(self, uris, priority):
        if self.hangs:
            self.hangs -= 1
            try:
                await asyncio.Event().wait()  # a hung fetch, decode or GPU call
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().classify(uris, priority)


def test_a_hung_batch_is_cancelled_at_its_deadline_and_retried():
    recorder = Hanging(hangs=1)
    h = handler(recorder, timeout_s=0.2)
    asyncio.run(h.handle([upload("Images/a.jpg")]))
    assert recorder.cancelled == 1 and h.counters.batch_retries == 1
    assert [topic for topic, _, _ in recorder.published] == [TOPICS.predictions]


class Killer(Recorder):
    """Any batch holding the poisoned image kills its workers until Dask gives up."""

    async def classify(self, uris, priority):
        if any("poison" in uri for uri in uris):
            self.batches.append(uris)
            raise WorkerLost("tcp://scheduler", "KilledWorker: attempted 4 times")
        return await super().classify(uris, priority)


def test_an_image_that_kills_workers_is_isolated_and_alone_dead_lettered():
    recorder = Killer()
    keys = [f"Images/{i}.jpg" for i in range(60)]
    keys[37] = "Images/poison.jpg"
    h = handler(recorder)
    asyncio.run(h.handle([upload(key, i) for i, key in enumerate(keys)]))
    dead = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert [(event["stage"], event["uri"]) for event in dead] == [("worker", "s3://b/Images/poison.jpg")]
    assert len([1 for topic, _, _ in recorder.published if topic == TOPICS.predictions]) == 59
    assert len([b for b in recorder.batches if any("poison" in u for u in b)]) <= 7  # log2(60) splits, not 60 tries


def test_ack_tracker_acknowledges_a_partition_only_up_to_its_first_unfinished_message():
    tracker = AckTracker(lambda message: message.partition, lambda message: message.offset)
    first = [InputMessage(b"", "t", 0, offset) for offset in range(0, 60)]  # a first batch at offset 0
    second = [InputMessage(b"", "t", 0, offset) for offset in range(60, 120)]
    other = [InputMessage(b"", "t", 1, offset) for offset in range(0, 5)]
    tracker.started(first + other)
    tracker.started(second)
    assert tracker.finished(second) == []  # out of order: waits for the first batch
    assert tracker.finished(other) == other  # another partition is independent
    assert tracker.finished(first) == first + second
    assert tracker.waiting() == 0


def test_ack_tracker_holds_back_across_a_gap_of_one():
    tracker = AckTracker(lambda message: message.partition, lambda message: message.offset)
    messages = [InputMessage(b"", "t", 0, offset) for offset in range(120, 181)]
    tracker.started(messages[:1])  # offset 120 alone in one batch
    tracker.started(messages[1:])  # 121..180 in the next
    assert tracker.finished(messages[1:]) == []
    assert tracker.finished(messages[:1]) == messages


def test_ack_tracker_forgets_revoked_partitions():
    tracker = AckTracker(lambda message: message.partition, lambda message: message.offset)
    messages = [InputMessage(b"", "t", 0, 0), InputMessage(b"", "t", 0, 1)]
    tracker.started(messages)
    tracker.forget({0})
    assert tracker.finished(messages) == [] and tracker.waiting() == 0


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


def test_retries_back_off_exponentially_within_the_retry_timeout():
    """Pauses 0.01, 0.02, 0.04, 0.08, 0.16 s (0.31 s in all); the next, 0.32 s, would end past the
    0.5 s retry timeout, so the batch gives up after 5 retries instead of sleeping past it."""
    recorder = Recorder(failures=1000)
    h = handler(recorder, retry_timeout_s=0.5, retry_backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(BatchRetryExhausted):
        asyncio.run(h.handle([upload("Images/a.jpg")]))
    assert h.counters.batch_retries == 5 and 1000 - recorder.failures == 6
    assert 0.31 <= time.monotonic() - started < 0.5


def test_a_batch_cancelled_mid_attempt_is_not_retried():
    """Stopping cancels a batch while the cluster has it (a hung attempt): the cancellation goes
    straight out, it is not taken for a failed attempt and retried."""
    attempts = 0

    async def classify(uris: list[str], priority: int) -> list[ImageResult]:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise ConnectionError("scheduler unreachable")
        if attempts == 3:
            await asyncio.Event().wait()  # hangs until cancelled
        raise WorkerLost(uris[0], "a retry after the cancellation")  # ends the batch, never retried

    async def run() -> None:
        h = BatchHandler(classify, Recorder().publish, BatchSettings(retry_timeout_s=60, retry_backoff_s=0.01), TOPICS, FilterSettings())
        task = asyncio.create_task(h.handle([upload("Images/a.jpg")]))
        while attempts < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert attempts == 3


def test_exceptions_that_are_not_errors_are_never_retried():
    """A BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...) goes out at
    once: it is not a "failed batch" to retry until the retries run out."""

    class Stop(BaseException):
        pass

    attempts = 0

    async def classify(uris: list[str], priority: int) -> list[ImageResult]:
        nonlocal attempts
        attempts += 1
        raise Stop()

    async def run() -> None:
        h = BatchHandler(classify, Recorder().publish, BatchSettings(retry_timeout_s=60, retry_backoff_s=0.01), TOPICS, FilterSettings())
        try:
            await h.handle([upload("Images/a.jpg")])
        except Stop:
            assert h.counters.batch_retries == 0
            return
        raise AssertionError("Stop did not come out")

    asyncio.run(run())
    assert attempts == 1


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


def test_events_for_a_bucket_outside_the_allowlist_are_skipped_never_fetched():
    recorder = Recorder()
    h = BatchHandler(recorder.classify, recorder.publish, BatchSettings(), TOPICS, FilterSettings(buckets=("images",)))
    asyncio.run(h.handle([upload("Images/a.jpg")]))  # bucket "b"
    assert h.counters.skipped == 1 and recorder.batches == [] and recorder.published == []


def strict_json(value: bytes) -> dict:
    def refuse(constant: str):
        raise ValueError(constant)

    return json.loads(value, parse_constant=refuse)


def test_found_in_review_out_of_range_kafka_timestamps_nan_and_empty_notifications_never_stop_a_batch():
    recorder = Recorder()
    no_time = json.loads(json.dumps(object_created_event(ObjectRef("b", "Images/a.jpg"))))
    del no_time["Records"][0]["eventTime"]
    nan_original = b'{"Records": [{"eventName": "ObjectCreated:Put", "eventTime": NaN}]}'
    messages = [
        InputMessage(json.dumps(no_time).encode(), "image-uploads", 0, 0, 253402300800000),  # year 10000
        InputMessage(json.dumps(no_time).encode().replace(b"a.jpg", b"b.jpg"), "image-uploads", 0, 1, -(2**62)),
        InputMessage(nan_original, "image-uploads", 0, 2),
        InputMessage(b'{"Records": []}', "image-uploads", 0, 3),
    ]
    h = handler(recorder)
    asyncio.run(h.handle(messages))
    predictions = [event for topic, _, event in recorder.published if topic == TOPICS.predictions]
    assert sorted(e["uri"] for e in predictions) == ["s3://b/Images/a.jpg", "s3://b/Images/b.jpg"]
    assert all(e["latency_ms"] is None for e in predictions)
    [dead] = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert dead["stage"] == "parse" and "text" in dead["original"]  # NaN is not JSON: kept as text
    assert h.counters.skipped == 1  # the empty notification is counted, not silently consumed


def test_a_score_that_cannot_be_published_as_json_is_that_image_s_dead_letter():
    class NaNScores(Recorder):
        async def classify(self, uris, priority):
            results = await super().classify(uris, priority)
            best = Prediction(151, "n02085620", "Chihuahua", float("nan"))
            return [results[0].__class__(**{**{f: getattr(results[0], f) for f in results[0].__slots__}, "prediction": best, "top_k": (best,)}), *results[1:]]

    recorder = NaNScores()
    asyncio.run(handler(recorder).handle([upload("Images/a.jpg", 0), upload("Images/b.jpg", 1)]))
    by_topic = {topic: event for topic, _, event in recorder.published}
    assert by_topic[TOPICS.dead_letter]["stage"] == "inference" and by_topic[TOPICS.predictions]["uri"] == "s3://b/Images/b.jpg"
    for _, _, event in recorder.published:
        strict_json(json.dumps(event, allow_nan=False).encode())


def test_ack_tracker_tracks_a_message_seen_twice_once():
    tracker = AckTracker(lambda message: message.partition, lambda message: message.offset)
    first, again, second = InputMessage(b"", "t", 0, 1), InputMessage(b"", "t", 0, 1), InputMessage(b"", "t", 0, 2)
    tracker.started([first])
    tracker.started([again, second])
    assert tracker.finished([first]) == [first]
    assert tracker.finished([second]) == [second] and tracker.waiting() == 0


class Ledger(NoLedger):
    """The scheduler's record of deaths, as the handler sees it: per image set, alone or beside."""

    def __init__(self) -> None:
        from inference.client.deaths import DeathTally

        self.tallies: dict[tuple[str, ...], DeathTally] = {}
        self.isolations = 0

    def died(self, uris: list[str], alone: bool) -> None:
        from inference.client.deaths import DeathTally

        old = self.tallies.get(tuple(sorted(uris)), DeathTally(0, 0))
        self.tallies[tuple(sorted(uris))] = DeathTally(old.beside + (not alone), old.alone + alone)

    def tally_deaths(self, uris):
        from inference.client.deaths import DeathTally

        return self.tallies.get(tuple(sorted(uris)), DeathTally(0, 0))

    def isolation(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def held():
            self.isolations += 1
            yield

        return held()

    async def wait_while_isolating(self, deadline_s):
        return None

    async def others_processing(self, uris):
        return 0


def test_a_worker_killer_is_dead_lettered_only_after_dying_alone_twice():
    """Among 60, the poison image kills whatever worker runs it; the halves run alone, and the
    image alone is dead-lettered once the record shows two deaths with it alone on the worker."""
    ledger = Ledger()

    class Killing(Recorder):
        async def classify(self, uris, priority):
            if any("poison" in uri for uri in uris):
                self.batches.append(uris)
                ledger.died(uris, alone=True)
                raise WorkerLost("tcp://scheduler", "1 worker(s) died with the batch on them")
            return await super().classify(uris, priority)

    recorder = Killing()
    keys = [f"Images/{i}.jpg" for i in range(60)]
    keys[37] = "Images/poison.jpg"
    h = handler(recorder, cluster=ledger)
    asyncio.run(h.handle([upload(key, i) for i, key in enumerate(keys)]))
    dead = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert [(event["stage"], event["uri"]) for event in dead] == [("worker", "s3://b/Images/poison.jpg")]
    assert "2 time(s) alone" in dead[0]["reason"]
    assert len([1 for topic, _, _ in recorder.published if topic == TOPICS.predictions]) == 59
    assert [b for b in recorder.batches if b == ["s3://b/Images/poison.jpg"]] == [["s3://b/Images/poison.jpg"]] * 2
    assert ledger.isolations == 1
    assert h.counters.last_isolation_step > 0  # each half classified, each conviction: progress for /livez


def test_an_isolation_in_progress_keeps_liveness_from_failing(monkeypatch):
    """No batch completes while one is isolated (the others wait): each isolated step counts
    as progress, so /livez does not restart a member that is finding its worker-killer."""
    from streams.service.metrics import StreamMetrics

    counters = StreamMetrics()  # start-up counts as progress: now
    clock = [time.monotonic()]
    monkeypatch.setattr("streams.service.metrics.time.monotonic", lambda: clock[0])
    counters.batch_started()
    clock[0] += 400
    assert counters.seconds_stalled() == pytest.approx(400)
    counters.isolation_step()
    clock[0] += 10
    assert counters.seconds_stalled() == pytest.approx(10)


def test_a_death_that_no_image_explains_never_dead_letters_one():
    """An operator's kill lands while an innocent image runs, beside another stream worker's
    batch: it is tried alone again and predicted, never dead-lettered."""
    ledger = Ledger()

    class UnluckyOnce(Recorder):
        deaths = 0

        async def classify(self, uris, priority):
            if self.deaths < 2 and "s3://b/Images/innocent.jpg" in uris:
                self.deaths += 1
                ledger.died(uris, alone=False)  # other work was on the worker too
                raise WorkerLost("tcp://scheduler", "1 worker(s) died with the batch on them")
            return await super().classify(uris, priority)

    recorder = UnluckyOnce()
    h = handler(recorder, cluster=ledger)
    asyncio.run(h.handle([upload("Images/innocent.jpg")]))
    assert [topic for topic, _, _ in recorder.published] == [TOPICS.predictions]


class SlowImage(Recorder):
    """Any batch holding the slow image never finishes within the deadline; the rest are quick."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts_with_slow = 0

    async def classify(self, uris, priority):
        if any("slow" in uri for uri in uris):
            self.attempts_with_slow += 1
            await asyncio.sleep(3600)
        return await super().classify(uris, priority)


def test_a_batch_past_its_deadline_is_split_and_only_the_image_that_never_finishes_is_dead_lettered():
    recorder = SlowImage()
    keys = [f"Images/{i}.jpg" for i in range(20)]
    keys[13] = "Images/slow.jpg"
    h = handler(recorder, timeout_s=0.05, retry_timeout_s=30, retry_backoff_s=0.01)
    started = time.monotonic()
    asyncio.run(h.handle([upload(key, i) for i, key in enumerate(keys)]))
    dead = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert [(event["stage"], event["uri"]) for event in dead] == [("decode", "s3://b/Images/slow.jpg")]
    assert "did not finish within batch.timeout_s" in dead[0]["reason"]
    assert len([1 for topic, _, _ in recorder.published if topic == TOPICS.predictions]) == 19
    assert recorder.attempts_with_slow <= 8  # log2(20) splits and two tries alone, not a retry loop
    assert time.monotonic() - started < 10


def test_a_cluster_that_stalls_as_a_whole_convicts_no_image():
    """Every attempt hangs until the cluster comes back: the halves and the single images all time
    out, and none is blamed, since nothing else finished meanwhile; then everything is predicted."""

    class Stalled(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.hung = 0

        async def classify(self, uris, priority):
            if self.hung < 12:
                self.hung += 1
                await asyncio.sleep(3600)
            return await super().classify(uris, priority)

    recorder = Stalled()
    h = handler(recorder, timeout_s=0.05, retry_timeout_s=30, retry_backoff_s=0.01)
    asyncio.run(h.handle([upload(f"Images/{i}.jpg", i) for i in range(4)]))
    assert [topic for topic, _, _ in recorder.published] == [TOPICS.predictions] * 4
    assert h.counters.batch_retries >= 1


def test_objects_that_keep_failing_alike_are_tried_one_by_one_instead_of_crash_looping():
    """Deleted objects under a GetObject-only policy answer 403 like a missing KMS permission:
    retried as the store's fault for batch.retry_timeout_s, then each gets its own record."""
    from inference.errors import StoreWideFailure

    class Refusing(Recorder):
        async def classify(self, uris, priority):
            if len(uris) > 1:
                raise StoreWideFailure("s3", f"every object of a batch of {len(uris)} failed the same way: access denied")
            self.batches.append(uris)
            return [ImageResult(uris[0], "x.jpg", None, (), None, None, Failure("fetch", "access denied"), MODEL)]

    recorder = Refusing()
    h = handler(recorder, retry_timeout_s=0.2, retry_backoff_s=0.01)
    asyncio.run(h.handle([upload("Images/gone-1.jpg", 0), upload("Images/gone-2.jpg", 1)]))
    dead = [event for topic, _, event in recorder.published if topic == TOPICS.dead_letter]
    assert sorted((e["stage"], e["uri"]) for e in dead) == [("fetch", "s3://b/Images/gone-1.jpg"), ("fetch", "s3://b/Images/gone-2.jpg")]
    assert h.counters.batch_retries >= 1  # it was retried as the store's fault first


def test_a_probe_asks_the_images_own_store():
    """An image that times out alone is convicted only once a probe of the same store answered:
    a probe of memory alone passed while the store hung."""
    from streams.service.isolation import CANARY_URI, probe_uri

    assert probe_uri("s3://images/dogs/a.jpg") == "s3://images/visionstream-probe/nothing-here.jpg"
    assert probe_uri("s3a://other/x/y.png") == "s3a://other/visionstream-probe/nothing-here.jpg"
    assert probe_uri("/data/dogs/a.jpg") == probe_uri("memory://x/a.jpg") == CANARY_URI


class Queue(Ledger):
    """A cluster where no worker starts our batch; ``busy``: other batches keep starting."""

    def __init__(self, busy: bool) -> None:
        super().__init__()
        self.busy = busy

    @contextmanager
    def starts(self, uris):
        yield asyncio.Event()  # no worker ever says it started this one

    def last_batch_start(self):
        return time.monotonic() if self.busy else 0.0


class Queued(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[list[str]] = []

    async def classify(self, uris, priority):
        self.submitted.append(uris)
        await asyncio.Event().wait()  # waits in the queue until cancelled


def test_a_batch_queued_behind_work_that_no_worker_starts_is_retried_as_the_clusters_trouble_never_isolated():
    """Other batches keep starting, ours waits (a backfill behind live traffic) far past
    batch.timeout_s: no timeout, since its deadline has not begun. Past batch.queue_timeout_s it
    is a transient failure: submitted again whole, never split as if its images hung a worker."""
    ledger, recorder = Queue(busy=True), Queued()
    h = handler(recorder, ledger, timeout_s=0.01, queue_timeout_s=0.1, retry_timeout_s=0.25, retry_backoff_s=0.01)
    with pytest.raises(BatchRetryExhausted, match=r"no Dask worker started the batch within batch.queue_timeout_s \(0.1 s\)"):
        asyncio.run(h.handle([upload("Images/a.jpg"), upload("Images/b.jpg", 1)]))
    assert len(recorder.submitted) >= 2 and all(len(uris) == 2 for uris in recorder.submitted)  # whole, again: never halved
    assert ledger.isolations == 0 and recorder.published == []


def test_a_batch_not_started_while_nothing_starts_anywhere_times_out_as_a_hang():
    """No batch starts anywhere (a hung worker holds ours): that is no queue, and the deadline
    runs from submission; the batch is split as usual to find what hangs."""
    ledger, recorder = Queue(busy=False), Queued()
    h = handler(recorder, ledger, timeout_s=0.05, queue_timeout_s=60, retry_timeout_s=0.3, retry_backoff_s=0.01)
    with pytest.raises(BatchRetryExhausted):
        asyncio.run(h.handle([upload("Images/a.jpg"), upload("Images/b.jpg", 1)]))
    assert ledger.isolations >= 1 and [len(uris) for uris in recorder.submitted[:2]] == [2, 1]  # timed out, then halved


class KeptLedger(Ledger):
    """A ledger whose isolations keep their verdicts, as on the scheduler (``VerdictBook`` over
    a dict that answers as the scheduler's metadata does)."""

    def __init__(self, metadata) -> None:
        super().__init__()
        from inference.client.verdicts import VerdictBook

        self.book = VerdictBook(metadata)

    @property
    def verdicts(self):
        return self.book


def killing_recorder(ledger: Ledger, stop_after: int | None = None):
    """Batches with the poison image kill their worker; ``stop_after``: the stream worker itself
    stops (cancelled) once that many batches were submitted."""

    class Killing(Recorder):
        async def classify(self, uris, priority):
            if stop_after is not None and len(self.submitted) >= stop_after:
                raise asyncio.CancelledError  # the member goes away mid-isolation
            self.submitted.append(uris)
            if any("poison" in uri for uri in uris):
                ledger.died(uris, alone=len(uris) == 1)
                raise WorkerLost("tcp://scheduler", "1 worker(s) died with the batch on them")
            return await super().classify(uris, priority)

    recorder = Killing()
    recorder.submitted = []
    return recorder


def test_an_isolation_cut_short_resumes_from_its_verdicts_on_the_next_owner():
    """The member isolating a batch stops mid-way (a restart, a revoke): the next owner, reading
    the verdicts kept on the scheduler, classifies the images already cleared together and
    splits only the rest; the worker-killer is dead-lettered, every other image predicted."""
    from .test_verdicts import Metadata

    metadata = Metadata()
    keys = [f"Images/{i}.jpg" for i in range(16)]
    keys[13] = "Images/poison.jpg"
    messages = [upload(key, i) for i, key in enumerate(keys)]
    first_ledger = KeptLedger(metadata)
    first = killing_recorder(first_ledger, stop_after=4)  # whole, first half (cleared), second half, its first quarter
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(handler(first, first_ledger).handle(messages))
    assert first.published == [] and [len(uris) for uris in first.submitted] == [16, 8, 8, 4]

    second_ledger = KeptLedger(metadata)  # the next owner: a new process, the same scheduler
    second_ledger.tallies = first_ledger.tallies
    second = killing_recorder(second_ledger)
    asyncio.run(handler(second, second_ledger).handle(messages))
    sizes = [len(uris) for uris in second.submitted]
    assert sizes[:3] == [16, 12, 2]  # the whole batch again; the 12 cleared before, together; then halves of the 4 left
    assert 8 not in sizes  # no step of the first isolation repeated
    dead = [event for topic, _, event in second.published if topic == TOPICS.dead_letter]
    assert [event["uri"] for event in dead] == ["s3://b/Images/poison.jpg"]
    assert len([1 for topic, _, _ in second.published if topic == TOPICS.predictions]) == 15
    assert metadata.data["visionstream-isolation"] == {}  # published: forgotten


def test_an_isolation_cut_short_again_and_again_gives_up_on_the_images_not_cleared():
    """After MAX_CUT_SHORT isolations of the same images begun and never finished, the next
    owner dead-letters those not cleared (saying why) instead of starting a fourth, and
    classifies the cleared ones together."""
    from inference.client.verdicts import CLEARED, Verdict
    from streams.service.isolation import MAX_CUT_SHORT

    from .test_verdicts import Metadata

    metadata = Metadata()
    ledger = KeptLedger(metadata)
    keys = [f"Images/{i}.jpg" for i in range(6)]
    keys[4] = "Images/poison.jpg"
    uris = [f"s3://b/{key}" for key in keys]

    async def earlier_owners() -> None:
        await ledger.verdicts.begun(uris, [Verdict(MAX_CUT_SHORT - 1)] * len(uris))
        await ledger.verdicts.decided(uris[:3], Verdict(outcome=CLEARED))

    asyncio.run(earlier_owners())
    recorder = killing_recorder(ledger)
    asyncio.run(handler(recorder, ledger).handle([upload(key, i) for i, key in enumerate(keys)]))
    assert recorder.submitted == [uris, uris[:3]]  # the whole batch, then the cleared ones: no split of the rest
    dead = {event["uri"]: event for topic, _, event in recorder.published if topic == TOPICS.dead_letter}
    assert sorted(dead) == sorted(uris[3:])
    assert all(event["stage"] == "worker" and f"cut short {MAX_CUT_SHORT} times" in event["reason"] for event in dead.values())
    assert len([1 for topic, _, _ in recorder.published if topic == TOPICS.predictions]) == 3


def test_low_margin_predictions_are_counted_per_version_and_routed_to_review_only_when_asked():
    """Two scores within review.margin: the model could as well have said the other class.
    Counted per model version either way (drift); published to topics.review too with
    review.enabled, and acknowledged only once both are there."""
    from inference.settings import ReviewSettings

    versioned = ModelInfo("resnet18", "none", "fp32", "cpu", version="sha256:abc")

    class Scored(Recorder):
        async def classify(self, uris, priority):
            self.batches.append(uris)
            results = []
            for uri in uris:
                second = 0.45 if "close" in uri else 0.05
                top = (Prediction(151, "n02085620", "Chihuahua", 0.5), Prediction(152, "n02085782", "Japanese spaniel", second))
                results.append(ImageResult(uri, uri.rsplit("/", 1)[-1], top[0], top, None, None, None, versioned))
            return results

    messages = [upload("Images/close-1.jpg", 0), upload("Images/clear.jpg", 1), upload("Images/close-2.jpg", 2)]
    for enabled in (False, True):
        recorder = Scored()
        settings = BatchSettings(retry_timeout_s=5, retry_backoff_s=0.01)
        h = BatchHandler(recorder.classify, recorder.publish, settings, TOPICS, FilterSettings(), review=ReviewSettings(enabled=enabled, margin=0.1))
        asyncio.run(h.handle(messages))
        reviewed = sorted(event["uri"] for topic, _, event in recorder.published if topic == TOPICS.review)
        assert reviewed == (["s3://b/Images/close-1.jpg", "s3://b/Images/close-2.jpg"] if enabled else [])
        assert len([1 for topic, _, _ in recorder.published if topic == TOPICS.predictions]) == 3
        exposition = h.counters.exposition().decode()
        assert 'visionstream_model_low_margin_images_total{version="sha256:abc"} 2.0' in exposition
        assert 'visionstream_model_confidence_count{version="sha256:abc"} 3.0' in exposition
        assert 'visionstream_model_confidence_bucket{le="0.5",version="sha256:abc"} 3.0' in exposition
