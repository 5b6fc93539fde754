"""The stream worker's metrics: the published name list is what the registry exports, and the
counters move with the facts."""

from inference.records.results import ModelInfo, Timings
from streams.service.metrics import METRIC_NAMES, StreamMetrics


def test_the_published_names_are_exactly_what_the_registry_exports():
    exported = set()
    for family in StreamMetrics().registry.collect():
        exported.add(family.name + {"counter": "_total", "info": "_info"}.get(family.type, ""))
    assert set(METRIC_NAMES) == exported


def test_counters_follow_the_facts():
    metrics = StreamMetrics()
    metrics.event_consumed("uploads")
    metrics.object_skipped("bucket_not_allowed")
    metrics.message_malformed()
    metrics.image_failed("fetch")
    metrics.image_predicted(1500.0)
    metrics.image_predicted(None, version="sha256:aa", match=True)
    metrics.image_predicted(None, version="sha256:aa", match=False)
    metrics.image_predicted(None, version="sha256:bb", match=None)  # no ground truth: not labelled
    metrics.batch_started()
    metrics.batch_classified(2, 0.3, Timings(10, 20, 0, 5, 2))
    metrics.batch_ended()
    metrics.model(ModelInfo("resnet50", "none", "fp16", "cuda:0", "random:seed=0"))
    text = metrics.exposition().decode()
    for line in (
        'visionstream_events_consumed_total{topic="uploads"} 1.0',
        'visionstream_events_skipped_total{reason="bucket_not_allowed"} 1.0',
        'visionstream_dead_letters_total{stage="parse"} 1.0',
        'visionstream_dead_letters_total{stage="fetch"} 1.0',
        "visionstream_images_predicted_total 4.0",
        'visionstream_model_labelled_images_total{version="sha256:aa"} 2.0',
        'visionstream_model_matched_images_total{version="sha256:aa"} 1.0',
        "visionstream_batch_size_images_sum 2.0",
        "visionstream_in_flight_batches 0.0",
        'visionstream_end_to_end_latency_seconds_bucket{le="2.5"} 1.0',
        'visionstream_model_info{device="cuda:0",name="resnet50",precision="fp16",version="random:seed=0",weights="none"} 1.0',
    ):
        assert line in text, line
    assert 'version="sha256:bb"' not in text
    assert metrics.snapshot()["images_classified"] == 4 and metrics.seconds_stalled() == 0.0


def test_replayed_images_are_timed_apart_from_live_uploads():
    from streams.service.metrics import StreamMetrics

    metrics = StreamMetrics()
    metrics.image_predicted(800.0)
    metrics.image_predicted(478_000.0, backfill=True)  # an object uploaded long before its replay
    snapshot = metrics.snapshot()
    assert snapshot["latency_ms"]["p99"] == 800.0 and snapshot["latency_ms"]["samples"] == 1
    assert snapshot["backfill_latency_ms"]["samples"] == 1
    text = metrics.exposition().decode()
    assert 'visionstream_end_to_end_latency_seconds_count 1.0' in text
    assert 'visionstream_backfill_latency_seconds_count 1.0' in text
