"""What the stream worker counts: Prometheus metrics (``/metrics``) and the ``/health`` snapshot.

One object, updated at one place per fact, read two ways: the Prometheus text format, from a
registry of its own (never the process-global one, so two services in one process do not
collide), and the plain counters of ``/health``. Durations are in seconds (Prometheus base
units); buckets span a GPU's milliseconds and a CPU's minutes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from inference.records.evaluation import percentile
from inference.records.results import ModelInfo, Timings
from streams.service.canary import Tally

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50, 60, 90, 120, 250, 500, 1000)
STAGES = ("fetch", "decode", "queue", "inference")
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# The Prometheus text format; aiohttp takes the charset apart from the type (and the body is ASCII).
CONTENT_TYPE = CONTENT_TYPE_LATEST.split("; charset")[0]

METRIC_NAMES = (
    "visionstream_events_consumed_total",
    "visionstream_images_predicted_total",
    "visionstream_dead_letters_total",
    "visionstream_events_skipped_total",
    "visionstream_events_fenced_total",
    "visionstream_batches_total",
    "visionstream_batch_size_images",
    "visionstream_batch_retries_total",
    "visionstream_batch_duration_seconds",
    "visionstream_end_to_end_latency_seconds",
    "visionstream_backfill_latency_seconds",
    "visionstream_stage_duration_seconds",
    "visionstream_in_flight_batches",
    "visionstream_consumer_lag_messages",
    "visionstream_last_batch_completed_timestamp_seconds",
    "visionstream_model_info",
    "visionstream_model_labelled_images_total",
    "visionstream_model_matched_images_total",
    "visionstream_workers_without_model",
    "visionstream_stalled_partitions",
    "visionstream_orphaned_partitions",
    "visionstream_model_swaps_total",
    "visionstream_model_confidence",
    "visionstream_model_low_margin_images_total",
)


@dataclass
class StreamMetrics:
    """Counters of one stream worker."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    events_in: int = 0
    objects_in: int = 0
    skipped: int = 0
    fenced: int = 0
    malformed: int = 0
    batches: int = 0
    images_classified: int = 0
    image_errors: int = 0
    batch_retries: int = 0
    in_flight_batches: int = 0
    last_batch_completed: float = field(default_factory=time.monotonic)  # monotonic; start-up counts as progress
    last_isolation_step: float = 0.0  # monotonic: an isolated part of a batch finished (progress, not a batch)
    isolation_steps: int = 0  # parts of batches under isolation classified or convicted
    versions: dict[str, Tally] = field(default_factory=dict)  # per model version, for a canary's verdict
    busy_since: float | None = None  # monotonic: when batches went from none in flight to some
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))  # live uploads
    backfill_latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def __post_init__(self) -> None:
        r = self.registry
        self._events = Counter("visionstream_events_consumed", "Input messages consumed", ["topic"], registry=r)
        self._predicted = Counter("visionstream_images_predicted", "Prediction events published", registry=r)
        self._dead = Counter("visionstream_dead_letters", "Dead-letter events published, by failed stage", ["stage"], registry=r)
        self._fenced = Counter("visionstream_events_fenced", "Input messages taken under an assignment since revoked, left to be consumed again", registry=r)
        self._skipped = Counter("visionstream_events_skipped", "Announced objects not classified, by reason", ["reason"], registry=r)
        self._batches = Counter("visionstream_batches", "Batches classified on the cluster", registry=r)
        self._batch_size = Histogram("visionstream_batch_size_images", "Images per batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self._retries = Counter("visionstream_batch_retries", "Batch attempts retried after a transient failure", registry=r)
        self._batch_seconds = Histogram("visionstream_batch_duration_seconds", "A batch from submission to its results, retries included", buckets=SECONDS_BUCKETS, registry=r)
        self._latency = Histogram("visionstream_end_to_end_latency_seconds", "Upload event time to published prediction (live uploads)", buckets=SECONDS_BUCKETS, registry=r)
        self._backfill_latency = Histogram("visionstream_backfill_latency_seconds", "Backfill announcement to published prediction (replayed objects)", buckets=SECONDS_BUCKETS, registry=r)
        self._stage = Histogram("visionstream_stage_duration_seconds", "Time per batch in each worker stage", ["stage"], buckets=SECONDS_BUCKETS, registry=r)
        self._in_flight = Gauge("visionstream_in_flight_batches", "Batches on the cluster now", registry=r)
        self._lag = Gauge("visionstream_consumer_lag_messages", "High watermark minus committed offset, per input partition (where the broker reports a high watermark)", ["topic", "partition"], registry=r)
        self._last_done = Gauge("visionstream_last_batch_completed_timestamp_seconds", "Unix time the last batch was published and acknowledged", registry=r)
        self._without_model = Gauge("visionstream_workers_without_model", "Dask workers whose model failed to load, avoided by batches until it loads", registry=r)
        self._orphaned = Gauge("visionstream_orphaned_partitions", "Input partitions with events waiting that no member of the group took for worker.stall_s, after this member asked for a rebalance", registry=r)
        self._stalled = Gauge("visionstream_stalled_partitions", "Assigned input partitions with events waiting and none taken for worker.stall_s, after a recovery was tried", registry=r)
        self._model = Info("visionstream_model", "The model the cluster runs", registry=r)
        self._labelled = Counter("visionstream_model_labelled_images", "Predictions of images whose key carries a ground truth, by model version", ["version"], registry=r)
        self._matched = Counter("visionstream_model_matched_images", "Predictions that matched their ground truth, by model version", ["version"], registry=r)
        self._confidence = Histogram("visionstream_model_confidence", "Top-1 score of each prediction, by model version (drift: a distribution that moves)", ["version"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self._low_margin = Counter("visionstream_model_low_margin_images", "Predictions whose top two scores are within review.margin, by model version", ["version"], registry=r)
        self._swaps = Counter("visionstream_model_swaps", "`visionstream model set` commands this worker applied: swapped, or failed (the model in use kept)", ["outcome"], registry=r)
        for outcome in ("swapped", "failed"):
            self._swaps.labels(outcome=outcome)  # both series from the start, at 0
        self._model_labels: dict[str, str] = {}

    # -- facts, one call site each -------------------------------------------------------

    def event_consumed(self, topic: str) -> None:
        self.events_in += 1
        self._events.labels(topic=topic).inc()

    def events_fenced(self, count: int) -> None:
        self.fenced += count
        self._fenced.inc(count)

    def objects_announced(self, count: int) -> None:
        self.objects_in += count

    def object_skipped(self, reason: str) -> None:
        self.skipped += 1
        self._skipped.labels(reason=reason).inc()

    def message_malformed(self) -> None:
        self.malformed += 1
        self._dead.labels(stage="parse").inc()

    def image_failed(self, stage: str) -> None:
        self.image_errors += 1
        self._dead.labels(stage=stage).inc()

    def image_predicted(
        self, latency_ms: float | None, backfill: bool = False, version: str | None = None, match: bool | None = None,
        confidence: float | None = None, low_margin: bool = False,
    ) -> None:
        """Live and replayed images are timed apart: a replay's latency says nothing of uploads'.
        A labelled image (``match`` not None) counts toward its model version's top-1; its top-1
        ``confidence`` and a ``low_margin`` toward the version's drift series."""
        self.images_classified += 1
        self._predicted.inc()
        tally = self.versions.get(version or "unknown", Tally())
        self.versions[version or "unknown"] = Tally(
            tally.predicted + 1, tally.labelled + (match is not None), tally.matched + bool(match),
            tally.confidence_sum + (confidence or 0.0), tally.latency_sum_ms + (latency_ms or 0.0), tally.latency_count + (latency_ms is not None),
        )
        if confidence is not None:
            self._confidence.labels(version=version or "unknown").observe(confidence)
        if low_margin:
            self._low_margin.labels(version=version or "unknown").inc()
        if match is not None:
            self._labelled.labels(version=version or "unknown").inc()
            if match:
                self._matched.labels(version=version or "unknown").inc()
        if latency_ms is not None:
            (self.backfill_latencies_ms if backfill else self.latencies_ms).append(latency_ms)
            (self._backfill_latency if backfill else self._latency).observe(max(0.0, latency_ms / 1000))

    def batch_retried(self) -> None:
        self.batch_retries += 1
        self._retries.inc()

    def batch_started(self) -> None:
        if self.in_flight_batches == 0:
            self.busy_since = time.monotonic()
        self.in_flight_batches += 1
        self._in_flight.inc()

    def batch_ended(self) -> None:
        self.in_flight_batches -= 1
        self._in_flight.dec()
        if self.in_flight_batches == 0:
            self.busy_since = None

    def batch_classified(self, size: int, duration_s: float, timings: Timings | None) -> None:
        self.batches += 1
        self._batches.inc()
        self._batch_size.observe(size)
        self._batch_seconds.observe(duration_s)
        if timings is not None:
            for stage in STAGES:
                self._stage.labels(stage=stage).observe(getattr(timings, f"{stage}_ms") / 1000)

    def isolation_step(self) -> None:
        """A part of a batch under isolation was classified or convicted: progress, though no
        batch completes (the others wait for the isolation), so liveness does not fail on it."""
        self.last_isolation_step = time.monotonic()
        self.isolation_steps += 1

    def batch_completed(self) -> None:
        """Published and acknowledged: the worker made progress."""
        self.last_batch_completed = time.monotonic()
        self._last_done.set(time.time())

    def consumer_lag(self, topic: str, partition: int, lag: int | None) -> None:
        if lag is not None:
            self._lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))
            return
        try:
            self._lag.remove(topic, str(partition))
        except KeyError:
            pass

    def stalled_partitions(self, count: int) -> None:
        self._stalled.set(count)

    def orphaned_partitions(self, count: int) -> None:
        self._orphaned.set(count)

    def workers_without_model(self, count: int) -> None:
        self._without_model.set(count)

    def model(self, info: ModelInfo) -> None:
        """The model the batches report (its resolved precision and device)."""
        labels = {"name": info.name, "weights": info.weights, "precision": info.precision, "device": info.device, "version": info.version or "unknown"}
        if labels != self._model_labels:
            self._model_labels = labels
            self._model.info(labels)

    def model_swap(self, outcome: str) -> None:
        """A `model set` command applied: ``swapped`` or ``failed``."""
        self._swaps.labels(outcome=outcome).inc()

    # -- reading -------------------------------------------------------------------------

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self.last_batch_completed

    def seconds_stalled(self) -> float:
        """How long batches have been in flight without one completing; 0 when idle."""
        if self.busy_since is None:
            return 0.0
        return time.monotonic() - max(self.busy_since, self.last_batch_completed, self.last_isolation_step)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        return {
            "events_in": self.events_in,
            "objects_in": self.objects_in,
            "skipped": self.skipped,
            "fenced": self.fenced,
            "malformed": self.malformed,
            "batches": self.batches,
            "images_classified": self.images_classified,
            "image_errors": self.image_errors,
            "batch_retries": self.batch_retries,
            "isolation_steps": self.isolation_steps,
            "in_flight_batches": self.in_flight_batches,
            "seconds_since_progress": round(self.seconds_since_progress(), 1),
            "latency_ms": _percentiles(self.latencies_ms),  # live uploads: upload to publish
            "backfill_latency_ms": _percentiles(self.backfill_latencies_ms),  # replays: announcement to publish
        }


def _percentiles(samples: Iterable[float]) -> dict[str, float | int | None]:
    ordered = sorted(samples)
    return {
        "p50": percentile(ordered, 0.50),
        "p95": percentile(ordered, 0.95),
        "p99": percentile(ordered, 0.99),
        "samples": len(ordered),
    }
