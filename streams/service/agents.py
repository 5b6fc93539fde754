"""The classify agents: take a batch of upload events, hand it to the cluster, publish, then ack.

Two agents share the cluster: ``classify_uploads`` for live uploads and ``classify_backfill``
for replayed ones. Backfill holds at most ``worker.backfill_share`` of the batches in flight
and its tasks run at a lower Dask priority, so a live upload never waits behind a backfill.

Faust's ``Stream.take`` acks its buffer even when processing raised; we use ``noack_take``
and ack each event ourselves, only after its batch's events are published, and per
partition only in offset order (``AckTracker``): a batch that finishes before an earlier
one on the same partition waits for it, so a commit never covers an unfinished event.
A batch that cannot be processed (the cluster unreachable past ``batch.retry_timeout_s``,
the broker refusing our events) crashes the worker, which exits non-zero for its
supervisor to restart: the unacknowledged events are then consumed again.

On SIGTERM (``drain``) the worker stops taking events, lets in-flight batches finish and
publish for up to ``worker.shutdown_grace_s``, commits, and exits 0. Before a rebalance
takes its partitions it does the same, and keeps its partitions meanwhile
(``streams.service.rebalance``): a group change costs no duplicates when batches finish in time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from faust.types import TP, StreamT

from inference.client.cluster import InferenceCluster
from inference.errors import InferenceError
from inference.settings import Settings
from streams.service.app import create_app
from streams.service.capacity import BACKFILL_PRIORITY, LIVE_PRIORITY, BatchSlots
from streams.service.housekeeping import add_timers
from streams.service.intake import BatchIntake
from streams.service.kafka import TopicTail, start_producer
from streams.service.liveness import LivenessWatch
from streams.service.metrics import StreamMetrics
from streams.service.models import ModelControl, ModelFollower, member_name
from streams.service.processing import BatchHandler
from streams.service.rebalance import commit_before_revoke
from streams.service.routes import add_routes
from streams.service.s3events import allowed_filter

log = logging.getLogger(__name__)

STOP_STEP_S = 10.0  # the longest the final commit, or the producer's stop, may take


class StreamService:
    """The stream worker: a Faust app, its agents, the cluster client, the producer and the metrics.

    It composes the pieces and wires them to Faust: ``intake`` takes, admits and acknowledges
    batches (``handler`` runs each), ``slots`` bound the batches in flight, ``liveness`` judges
    ``/livez``; the timers are ``streams.service.housekeeping``, the HTTP routes
    ``streams.service.routes``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.counters = StreamMetrics()
        # its line: a later configuration of this deployment (the same consumer group) supersedes it
        self.cluster = InferenceCluster.from_settings(settings, lineage=f"stream:{settings.kafka.consumer_group}")
        topics = settings.topics
        self.inputs = (topics.uploads, topics.backfill)
        self.uploads = self.app.topic(topics.uploads, partitions=topics.partitions)
        self.backfill = self.app.topic(topics.backfill, partitions=topics.partitions)
        handler = BatchHandler(
            classify=self.cluster.classify,
            publish=self.publish,
            batch=settings.batch,
            topics=topics,
            filter=allowed_filter(settings.filter, settings.storage.bucket),
            events=settings.events,
            review=settings.review,
            counters=self.counters,
            cluster=self.cluster,
        )
        self.slots = BatchSlots(settings)
        self.liveness = LivenessWatch(settings, self.counters, self.inputs)
        self.intake = BatchIntake(settings.batch, handler, self.slots, self.liveness, self.counters, self.fail)
        follower = ModelFollower(
            settings.model, self.cluster.swap, self._publish_model_event, member_name(), self.counters.model_swap,
            canary=self.cluster, tallies=lambda: self.counters.versions,
        )
        self.models = ModelControl(follower, TopicTail(settings.kafka, topics.models), settings.model)
        self.producer: AIOKafkaProducer | None = None
        self.fatal: BaseException | None = None  # what stops this worker, once: the command's error line
        self._started: asyncio.Task[None] | None = None
        self.assigned: set[TP] = set()
        self._register()

    def _register(self) -> None:
        app = self.app
        app.agent(self.uploads, name="classify_uploads")(self._live_agent)
        app.agent(self.backfill, name="classify_backfill")(self._backfill_agent)
        add_routes(app, self)
        add_timers(
            app, self.settings, self.cluster, self.slots, self.liveness, self.counters,
            started=lambda: self.started, draining=lambda: self.intake.draining,
            assigned=lambda: self.assigned, excused=self.waits_for_a_slot, follow_models=self.models.follow,
        )

        @app.on_partitions_assigned.connect
        async def on_assigned(app: Any, assigned: set[TP], **kwargs: Any) -> None:
            commit_before_revoke(self.app.consumer, self.finish_in_flight)  # once; the consumer exists by now
            self.intake.revoking = False
            self.assigned = {tp for tp in assigned if tp.topic in self.inputs}
            self.intake.acks.assigned(self.app.consumer_generation_id)  # Faust sets it before this signal
            self.liveness.assigned(self.assigned)

        @app.on_partitions_revoked.connect
        async def on_revoked(app: Any, revoked: set[TP], **kwargs: Any) -> None:
            self.intake.acks.revoked(revoked)  # what was taken so far is consumed again by the new owner
            self.liveness.assigned(set())  # nothing to watch until the next assignment

    async def _live_agent(self, stream: StreamT[bytes]) -> None:
        await self.ensure_started()
        await self.intake.run(stream, LIVE_PRIORITY)

    async def _backfill_agent(self, stream: StreamT[bytes]) -> None:
        await self.ensure_started()
        await self.intake.run(stream, BACKFILL_PRIORITY)

    def waits_for_a_slot(self, tp: TP) -> bool:
        """Whether the agent of ``tp``'s topic waits for a batch slot: its partitions are not stalled."""
        priority = BACKFILL_PRIORITY if tp.topic == self.settings.topics.backfill else LIVE_PRIORITY
        return self.slots.waiting.get(priority, False)

    async def fail(self, exc: BaseException, what: str) -> None:
        """Stop the worker for ``exc``, said once (both agents, every batch may fail alike)."""
        if self.fatal is None:
            self.fatal = exc
            log.critical("%s: %s", what, exc)
        await self.app.crash(exc)

    async def ensure_started(self) -> None:
        """Connect to (or start) the Dask cluster and start the producer, once, for both agents."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._started)
        except Exception as exc:
            await self.fail(exc, "cannot start")
            raise

    async def _start(self) -> None:
        self.producer = await start_producer(self.settings.kafka)
        model = await self.models.starting_model()  # a `model set` in force outlives restarts
        if model == self.settings.model:
            await self.cluster.start()
        else:
            self.cluster.use_model(model)
            try:
                await self.cluster.start()
            except InferenceError as exc:  # a command no worker had tried, whose weights do not load
                log.error("the model `model set` chose (%s, weights %r) did not load (%s); starting with the configured model", model.name, model.weights, exc)
                self.cluster.use_model(self.settings.model)
                await self.cluster.start()
        self.slots.open()
        self.slots.grow(sum((await self.cluster.threads()).values()))

    async def _publish_model_event(self, event: dict[str, Any], key: bytes | None = None) -> None:
        key = key or f"{event['id']}/{event.get('member')}".encode()
        await self.publish(self.settings.topics.models, key, json.dumps(event).encode())

    async def publish(self, topic: str, key: bytes, value: bytes) -> Any:
        """Send, and return only once the broker has the event (or raise after kafka.delivery_timeout_s)."""
        assert self.producer is not None, "publish before start"
        return await asyncio.wait_for(
            self.producer.send_and_wait(topic, value, key=key), timeout=self.settings.kafka.delivery_timeout_s
        )

    async def finish_in_flight(self) -> int:
        """Before a revoke: start no batch, and wait up to ``worker.shutdown_grace_s`` for those
        in flight to publish and acknowledge. Those that did not finish are cancelled: their
        events are fenced off and consumed again by the partitions' next owner, so carrying on
        would only hold the isolation lock and the cluster-wide lease against the new
        generation's batches, and could stop this worker for partitions it no longer holds.
        Returns how many were cancelled."""
        self.intake.revoking = True
        if self.intake.draining:
            return 0
        pending = await self.intake.finish(self.settings.worker.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_STEP_S)  # cancelled: their locks and leases released
        return len(pending)

    async def drain(self) -> None:
        """Stop taking events, let in-flight batches finish and publish, commit what they acked."""
        self.intake.draining = True
        grace_s = self.settings.worker.shutdown_grace_s
        log.info("stopping: %d batch(es) in flight, waiting up to %.0f s for them", len(self.intake.tasks), grace_s)
        pending = await self.intake.finish(grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d batch(es) did not finish within worker.shutdown_grace_s; their events will be consumed again", len(pending))
        await _step(lambda: self.app.consumer.commit(), "final commit failed")  # the next owner starts from the last commit
        if self.producer is not None:
            await _step(self.producer.stop, "producer did not stop cleanly")  # everything acked was confirmed already
            self.producer = None
        await _step(self.models.stop, "model topic reader did not stop cleanly", level=logging.DEBUG)
        # leave the scheduler cleanly: it forgets this client and its event subscription
        await _step(self.cluster.close, "Dask client did not close cleanly", level=logging.DEBUG)

    @property
    def started(self) -> bool:
        started = self._started
        return started is not None and started.done() and not started.cancelled() and started.exception() is None

    def live(self) -> tuple[bool, str]:
        """``/livez``'s verdict (``LivenessWatch.verdict``)."""
        return self.liveness.verdict()

    def readiness(self) -> tuple[bool, str]:
        if self.intake.draining:
            return False, "stopping"
        if not self.started:
            return False, "cluster not connected"
        if self.cluster.client is None or self.cluster.client.status != "running":
            return False, "cluster unreachable"
        if not self.assigned:
            return False, "no input partition assigned"
        trouble = self.cluster.model_trouble()
        if trouble is not None:
            return False, trouble
        return self.liveness.verdict()

    def health(self) -> dict[str, Any]:
        ready, why = self.readiness()
        return {
            "status": "ready" if ready else "starting" if not self.started else "unready",
            "reason": why,
            "cluster": self.cluster.address,
            "assigned_partitions": len(self.assigned),
            "stalled_partitions": [stall.describe() for stall in self.liveness.stalls],
            "orphaned_partitions": [orphan.describe() for orphan in self.liveness.orphans],
            "counters": self.counters.snapshot(),
        }


async def _step(stopping: Callable[[], Awaitable[Any]], failed: str, level: int = logging.WARNING) -> None:
    """One step of stopping, for at most ``STOP_STEP_S``; a failure is logged, and stopping goes on."""
    try:
        await asyncio.wait_for(stopping(), timeout=STOP_STEP_S)
    except Exception as exc:  # noqa: BLE001 - stopping anyway
        log.log(level, "%s: %s", failed, exc)
