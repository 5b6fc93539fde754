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
import logging
import math
import time
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.types import TP, EventT, StreamT

from inference.cluster import InferenceCluster
from inference.job import batches_in_flight
from inference.settings import Settings
from streams.service.app import create_app
from streams.service.kafka import start_producer
from streams.service.lag import read_lag
from streams.service.metrics import CONTENT_TYPE, StreamMetrics
from streams.service.processing import AckTracker, BatchHandler, InputMessage
from streams.service.orphans import Orphan, OrphanWatch, Verdict
from streams.service.progress import ProgressWatch, Stall
from streams.service.rebalance import commit_before_revoke
from streams.service.s3events import allowed_filter

log = logging.getLogger(__name__)

LIVE_PRIORITY, BACKFILL_PRIORITY = 10, 0
LAG_INTERVAL_S = 10.0
RETIRE_INTERVAL_S = 60.0
STOP_STEP_S = 10.0  # the longest the final commit, or the producer's stop, may take


class StreamService:
    """The stream worker: a Faust app, its agents, the cluster client, the producer and the metrics."""

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
        self.handler = BatchHandler(
            classify=self.cluster.classify,
            publish=self.publish,
            batch=settings.batch,
            topics=topics,
            filter=allowed_filter(settings.filter, settings.storage.bucket),
            events=settings.events,
            counters=self.counters,
            cluster=self.cluster,
        )
        self.slots: dict[int, asyncio.Semaphore] = {}  # per priority; sized once the cluster is known
        self.in_flight: dict[int, int] = {}  # what each semaphore allows
        self.acks: AckTracker[EventT] = AckTracker(
            lambda event: event.message.tp, lambda event: event.message.offset, lambda event: event.message.generation_id
        )
        self.producer: AIOKafkaProducer | None = None
        self.draining = False
        self.revoking = False  # from a revoke until the next assignment: no batch starts
        self.fatal: BaseException | None = None  # what stops this worker, once: the command's error line
        self._started: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        self.assigned: set[TP] = set()
        self.progress = ProgressWatch()
        self.stalls: list[Stall] = []  # input partitions still stalled after a recovery was tried
        self.orphan_watch = OrphanWatch(settings.worker.stall_s)
        self.orphans: list[Orphan] = []  # input partitions no member takes, still after a rejoin
        self.waiting_for_slot: dict[int, bool] = {LIVE_PRIORITY: False, BACKFILL_PRIORITY: False}
        self._register()

    def _register(self) -> None:
        app = self.app
        app.agent(self.uploads, name="classify_uploads")(self._live_agent)
        app.agent(self.backfill, name="classify_backfill")(self._backfill_agent)

        @app.page("/health")
        async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            return web.json(self.health())

        @app.page("/livez")
        async def livez(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            alive, why = self.live()
            return web.json({"status": "ok" if alive else "wedged", "reason": why}, status=200 if alive else 503)

        @app.page("/readyz")
        async def readyz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            ready, why = self.readiness()
            return web.json({"status": "ready" if ready else "unready", "reason": why}, status=200 if ready else 503)

        @app.page("/metrics")
        async def metrics(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            return web.bytes(self.counters.exposition(), content_type=CONTENT_TYPE)

        @app.on_partitions_assigned.connect
        async def on_assigned(app: Any, assigned: set[TP], **kwargs: Any) -> None:
            commit_before_revoke(self.app.consumer, self.finish_in_flight)  # once; the consumer exists by now
            self.revoking = False
            self.assigned = {tp for tp in assigned if tp.topic in self.inputs}
            self.acks.assigned(self.app.consumer_generation_id)  # Faust sets it before this signal
            self.progress.assigned(self.assigned, time.monotonic())
            self.stalls = []

        @app.on_partitions_revoked.connect
        async def on_revoked(app: Any, revoked: set[TP], **kwargs: Any) -> None:
            self.acks.revoked(revoked)  # what was taken so far is consumed again by the new owner
            self.progress.assigned((), time.monotonic())  # nothing to watch until the next assignment
            self.stalls = []

        @app.timer(LAG_INTERVAL_S)
        async def measure_lag() -> None:
            self._measure_lag()

        @app.timer(min(LAG_INTERVAL_S, self.settings.worker.stall_s / 3))
        async def watch_partitions() -> None:
            if self.started and not self.draining:
                try:
                    await self.watch_partitions()
                    await self.watch_group()
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("could not check the input partitions' progress: %s", exc)

        @app.timer(LAG_INTERVAL_S)
        async def follow_the_cluster() -> None:
            if self.started:
                try:
                    await self.grow_in_flight()
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("could not count the cluster's task threads: %s", exc)
                self.counters.workers_without_model(self.cluster.without_model())

        @app.timer(RETIRE_INTERVAL_S)
        async def retire_superseded_models() -> None:
            if self.started:
                try:
                    await self.cluster.retire_superseded(idle_s=max(RETIRE_INTERVAL_S, self.settings.batch.timeout_s))
                except Exception as exc:  # noqa: BLE001 - housekeeping; the next round tries again
                    log.warning("could not retire superseded model plugins: %s", exc)

    async def _live_agent(self, stream: StreamT[bytes]) -> None:
        await self.run_agent(stream, LIVE_PRIORITY)

    async def _backfill_agent(self, stream: StreamT[bytes]) -> None:
        await self.run_agent(stream, BACKFILL_PRIORITY)

    async def run_agent(self, stream: StreamT[bytes], priority: int) -> None:
        batch = self.settings.batch
        await self.ensure_started()
        slots = self.slots[priority]
        async for taken in stream.noack_take(batch.size, within=batch.linger_s):
            now = time.monotonic()
            for event in taken:
                self.progress.taken(event.message.tp, event.message.offset, now)
            if self.draining or self.revoking:
                continue  # left unacknowledged: consumed again after the restart or the rebalance
            self.waiting_for_slot[priority] = True
            try:
                await slots.acquire()  # backpressure: lag stays in Kafka, memory stays flat
            finally:
                self.waiting_for_slot[priority] = False
            if self.draining or self.revoking:
                slots.release()
                continue
            events = self.admit(taken)
            if not events:
                slots.release()
                continue
            task = asyncio.create_task(self._process(stream, events, slots, priority))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def admit(self, taken: list[EventT]) -> list[EventT]:
        """The taken events that may be processed: those taken under the current assignment,
        each once, in offset order (``AckTracker``). The rest were taken before a rebalance;
        their partition's owner, maybe this worker again, consumes them from the committed offset."""
        events = self.acks.started(taken)
        if len(events) < len(taken):
            self.counters.events_fenced(len(taken) - len(events))
        return events

    async def _process(self, stream: StreamT[bytes], events: list[EventT], slots: asyncio.Semaphore, priority: int) -> None:
        try:
            messages = [_input_message(event) for event in events]
            await self.handler.handle(messages, priority)
            for event in self.acks.finished(events):
                await stream.ack(event)
            self.counters.batch_completed()
        except asyncio.CancelledError:
            raise  # stopping: nothing acked, the events are consumed again
        except Exception as exc:  # noqa: BLE001
            if self.fatal is None:
                self.fatal = exc
                log.critical("batch could not be processed, stopping the worker so nothing is lost: %s", exc)
            await self.app.crash(exc)
        finally:
            slots.release()

    async def ensure_started(self) -> None:
        """Connect to (or start) the Dask cluster and start the producer, once, for both agents."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._started)
        except Exception as exc:
            if self.fatal is None:  # both agents wait for the start: say it once
                self.fatal = exc
                log.critical("cannot start: %s", exc)
            await self.app.crash(exc)
            raise

    async def _start(self) -> None:
        self.producer = await start_producer(self.settings.kafka)
        await self.cluster.start()
        self.slots = {LIVE_PRIORITY: asyncio.Semaphore(0), BACKFILL_PRIORITY: asyncio.Semaphore(0)}
        self.in_flight = {LIVE_PRIORITY: 0, BACKFILL_PRIORITY: 0}
        await self.grow_in_flight()

    async def grow_in_flight(self) -> None:
        """Size the batches in flight to ``batch.max_in_flight``, or by default to the cluster's
        task threads + 1, and grow them as workers join (a timer calls this). Never shrinks:
        batches beyond a smaller cluster's threads wait in the scheduler's queue, harmlessly."""
        target = batches_in_flight(self.settings.batch.max_in_flight, sum((await self.cluster.threads()).values()))  # refreshes cluster.workers
        targets = {LIVE_PRIORITY: target, BACKFILL_PRIORITY: max(1, math.floor(target * self.settings.worker.backfill_share))}
        if targets[LIVE_PRIORITY] <= self.in_flight[LIVE_PRIORITY]:
            return
        for priority, wanted in targets.items():
            for _ in range(wanted - self.in_flight[priority]):
                self.slots[priority].release()  # one more batch may go
            self.in_flight[priority] = max(wanted, self.in_flight[priority])
        log.info("up to %d batch(es) in flight on the cluster, at most %d of them backfill", *targets.values())

    async def publish(self, topic: str, key: bytes, value: bytes) -> Any:
        """Send, and return only once the broker has the event (or raise after kafka.delivery_timeout_s)."""
        assert self.producer is not None, "publish before start"
        return await asyncio.wait_for(
            self.producer.send_and_wait(topic, value, key=key), timeout=self.settings.kafka.delivery_timeout_s
        )

    async def finish_in_flight(self) -> int:
        """Before a revoke: start no batch, and wait up to ``worker.shutdown_grace_s`` for those
        in flight to publish and acknowledge. Returns how many did not finish (they carry on;
        their events are fenced off and consumed again by the partitions' next owner)."""
        self.revoking = True
        return 0 if self.draining else len(await self._finish_batches())

    async def _finish_batches(self) -> set[asyncio.Task[None]]:
        """Wait up to ``worker.shutdown_grace_s`` for the batches in flight; those still running."""
        tasks = set(self._tasks)
        if not tasks:
            return set()
        _, pending = await asyncio.wait(tasks, timeout=self.settings.worker.shutdown_grace_s)
        return pending

    async def drain(self) -> None:
        """Stop taking events, let in-flight batches finish and publish, commit what they acked."""
        self.draining = True
        log.info("stopping: %d batch(es) in flight, waiting up to %.0f s for them", len(self._tasks), self.settings.worker.shutdown_grace_s)
        pending = await self._finish_batches()
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d batch(es) did not finish within worker.shutdown_grace_s; their events will be consumed again", len(pending))
        try:
            await asyncio.wait_for(self.app.consumer.commit(), timeout=STOP_STEP_S)
        except Exception as exc:  # noqa: BLE001 - the next owner of the partitions starts from the last commit
            log.warning("final commit failed: %s", exc)
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), timeout=STOP_STEP_S)
            except Exception as exc:  # noqa: BLE001 - everything acknowledged was confirmed already
                log.warning("producer did not stop cleanly: %s", exc)
            self.producer = None
        try:  # leave the scheduler cleanly: it forgets this client and its event subscription
            await asyncio.wait_for(self.cluster.close(), timeout=STOP_STEP_S)
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.debug("Dask client did not close cleanly: %s", exc)

    async def watch_partitions(self) -> None:
        """Find assigned input partitions with events waiting and none taken for
        ``worker.stall_s``; try once to get them moving again (resume them, seek to the
        committed offsets); a partition still stalled a window later fails ``/livez``."""
        consumer = self.app.consumer
        ends: dict[TP, int] = {}
        for tp in self.progress.partitions():
            highwater = _highwater(consumer, tp)
            if highwater is not None:
                ends[tp] = highwater
        unknown = [tp for tp in self.progress.partitions() if tp not in ends]
        if unknown:  # never fetched since the assignment: ask the broker
            try:
                ends.update(await asyncio.wait_for(consumer.highwaters(*unknown), timeout=STOP_STEP_S))
            except Exception as exc:  # noqa: BLE001 - unknown offsets never make a stall
                log.debug("could not read end offsets: %s", exc)
        committed = dict(consumer._committed_offset)  # noqa: SLF001 - Faust keeps it; no public accessor
        for tp in self.progress.partitions():
            if committed.get(tp) is None:  # not known to Faust yet: where the fetcher stands
                try:
                    committed[tp] = await asyncio.wait_for(consumer.position(tp), timeout=STOP_STEP_S)
                except Exception as exc:  # noqa: BLE001 - unknown offsets never make a stall
                    log.debug("could not read the position of %s: %s", tp, exc)
        topics = {self.settings.topics.uploads: LIVE_PRIORITY, self.settings.topics.backfill: BACKFILL_PRIORITY}
        stalls = self.progress.stalled(
            time.monotonic(), self.settings.worker.stall_s, ends.get, committed.get,
            excused=lambda tp: self.waiting_for_slot.get(topics.get(tp.topic, LIVE_PRIORITY), False),
        )
        fresh = [stall.partition for stall in stalls if not stall.recovery_tried]
        if fresh and getattr(self.app, "rebalancing", False):
            return  # a rebalance under way resumes the partitions itself (or takes them away)
        if fresh:
            log.warning("input partitions stalled, trying to recover in place: %s", "; ".join(s.describe() for s in stalls if not s.recovery_tried))
            await self._recover(fresh)
            self.progress.recovery_tried(fresh, time.monotonic())
        self.stalls = [stall for stall in stalls if stall.recovery_tried]
        if self.stalls:
            log.error("input partitions still stalled after a recovery; /livez fails: %s", "; ".join(s.describe() for s in self.stalls))
        self.counters.stalled_partitions(len(self.stalls))

    async def watch_group(self) -> None:
        """Holding no input partition: find those that no member of the group takes (events
        waiting, the group's committed offset still for ``worker.stall_s``); ask to rejoin
        once, and fail ``/livez`` if they are still orphaned a window later (``orphans``)."""
        if self.assigned:
            self.orphan_watch.observe(time.monotonic(), True, {}, {})
            self.orphans = []
            self.counters.orphaned_partitions(0)
            return
        if getattr(self.app, "rebalancing", False):
            return  # a rebalance under way hands the partitions out
        # the group's offsets as `visionstream lag` reads them: a consumer of its own, not a member
        lag = await asyncio.wait_for(read_lag(self.settings.kafka, self.settings.kafka.consumer_group, list(self.inputs)), timeout=2 * STOP_STEP_S)
        committed = {TP(p.topic, p.partition): p.start if p.committed is None else p.committed for p in lag.partitions}
        ends = {TP(p.topic, p.partition): p.end for p in lag.partitions}
        verdict = self.orphan_watch.observe(time.monotonic(), bool(self.assigned), committed, ends)
        described = "; ".join(orphan.describe() for orphan in self.orphan_watch.orphans)
        if verdict is Verdict.REJOIN:
            log.warning("this worker holds no input partition and no member of the group takes these; asking the group to rebalance: %s", described)
            await _request_rejoin(self.app.consumer)
        elif verdict is Verdict.WEDGED:
            log.error("input partitions still taken by no member after a rebalance was asked for; /livez fails: %s", described)
        self.orphans = list(self.orphan_watch.orphans) if verdict is Verdict.WEDGED else []
        self.counters.orphaned_partitions(len(self.orphans))

    async def _recover(self, partitions: list[TP]) -> None:
        """Resume fetching ``partitions``, let Faust's flow go on, and seek each of them to its
        committed offset (or where the fetcher stands): what was taken already is refused by
        the tracker (behind its tail), what was never taken is fetched again."""
        consumer = self.app.consumer
        consumer.resume_partitions(partitions)
        if not self.app.flow_control.is_active():
            log.warning("Faust's flow control was suspended outside a rebalance; resuming it")
            self.app.flow_control.resume()
            consumer.resume_flow()
        committed = consumer._committed_offset  # noqa: SLF001 - Faust keeps it; no public accessor
        for tp in partitions:
            offset = committed.get(tp)
            if offset is None:
                offset = await asyncio.wait_for(consumer.position(tp), timeout=STOP_STEP_S)
            if offset is not None:
                await asyncio.wait_for(consumer.seek(tp, offset), timeout=STOP_STEP_S)

    def _measure_lag(self) -> None:
        consumer = self.app.consumer
        for tp in self.assigned:
            highwater = _highwater(consumer, tp)
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001 - Faust keeps it; no public accessor
            lag = None if highwater is None else highwater - (committed or 0)
            self.counters.consumer_lag(tp.topic, tp.partition, lag)

    @property
    def started(self) -> bool:
        started = self._started
        return started is not None and started.done() and not started.cancelled() and started.exception() is None

    def live(self) -> tuple[bool, str]:
        """Wedged: work waiting, and no batch completed for ``worker.stall_s``; or input
        partitions with events waiting and none taken, even after a recovery was tried."""
        if self.stalls:
            return False, "input partitions stalled: " + "; ".join(stall.describe() for stall in self.stalls)
        if self.orphans:
            return False, "input partitions taken by no member of the group: " + "; ".join(orphan.describe() for orphan in self.orphans)
        stalled = self.counters.seconds_stalled()
        if stalled > self.settings.worker.stall_s:
            return False, f"no batch completed for {stalled:.0f} s while {self.counters.in_flight_batches} batch(es) waited"
        return True, ""

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
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
        return self.live()

    def health(self) -> dict[str, Any]:
        ready, why = self.readiness()
        return {
            "status": "ready" if ready else "starting" if not self.started else "unready",
            "reason": why,
            "cluster": self.cluster.address,
            "assigned_partitions": len(self.assigned),
            "stalled_partitions": [stall.describe() for stall in self.stalls],
            "orphaned_partitions": [orphan.describe() for orphan in self.orphans],
            "counters": self.counters.snapshot(),
        }


async def _request_rejoin(consumer: Any) -> None:
    """Ask aiokafka's group coordinator for a new rebalance (on Faust's consumer thread)."""
    thread = consumer._thread  # noqa: SLF001

    async def rejoin() -> None:
        thread._ensure_consumer()._coordinator.request_rejoin()  # noqa: SLF001 - no public API asks for a rebalance

    await thread.call_thread(rejoin)


def _highwater(consumer: Any, tp: TP) -> int | None:
    """The partition's high watermark from the consumer's last fetch; None before one."""
    try:
        return consumer.highwater(tp)
    except Exception:  # noqa: BLE001 - not fetched yet, or the broker reports none
        return None


def _input_message(event: EventT) -> InputMessage:
    message = event.message
    value = event.value if isinstance(event.value, bytes) else (message.value or b"")
    return InputMessage(
        value=value,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
    )
