"""Whether this stream worker is alive: ``/livez``'s verdict, and the watches behind it.

Three things make a worker wedged, each watched here and none by the service itself:
  - work waiting and no batch completed for ``worker.stall_s`` (the counters say);
  - assigned input partitions with events waiting and none taken for ``worker.stall_s``: tried
    once in place (resume, seek to the committed offset), then ``/livez`` fails
    (``streams.service.progress``);
  - holding no partition while the group as a whole takes none: a rejoin asked once, then
    ``/livez`` fails (``streams.service.orphans``).
The service feeds assignments and taken offsets in, runs ``watch`` on a timer and asks ``verdict``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from faust.types import TP

from inference.settings import Settings
from streams.service.lag import read_lag
from streams.service.metrics import StreamMetrics
from streams.service.orphans import Orphan, OrphanWatch, Verdict
from streams.service.progress import ProgressWatch, Stall

log = logging.getLogger(__name__)

STEP_S = 10.0  # the longest one read of offsets may take


class LivenessWatch:
    """The stalled and orphaned input partitions of one stream worker, and its ``/livez`` verdict."""

    def __init__(self, settings: Settings, counters: StreamMetrics, inputs: tuple[str, ...]) -> None:
        self.settings = settings
        self.counters = counters
        self.inputs = inputs
        self.progress = ProgressWatch()
        self.stalls: list[Stall] = []  # input partitions still stalled after a recovery was tried
        self.orphan_watch = OrphanWatch(settings.worker.stall_s)
        self.orphans: list[Orphan] = []  # input partitions no member takes, still after a rejoin

    def assigned(self, partitions: set[TP]) -> None:
        """A new assignment (empty: revoked, nothing to watch until the next)."""
        self.progress.assigned(partitions, time.monotonic())
        self.stalls = []

    def taken(self, tp: TP, offset: int, now: float) -> None:
        self.progress.taken(tp, offset, now)

    async def watch(self, app: Any, assigned: set[TP], excused: Callable[[TP], bool]) -> None:
        """One round of both watches (a timer runs it)."""
        await self.watch_partitions(app, excused)
        await self.watch_group(app, assigned)

    async def watch_partitions(self, app: Any, excused: Callable[[TP], bool]) -> None:
        """Find assigned input partitions with events waiting and none taken for
        ``worker.stall_s``; try once to get them moving again (resume them, seek to the
        committed offsets); a partition still stalled a window later fails ``/livez``."""
        consumer = app.consumer
        ends: dict[TP, int] = {}
        for tp in self.progress.partitions():
            highwater = _highwater(consumer, tp)
            if highwater is not None:
                ends[tp] = highwater
        unknown = [tp for tp in self.progress.partitions() if tp not in ends]
        if unknown:  # never fetched since the assignment: ask the broker
            try:
                ends.update(await asyncio.wait_for(consumer.highwaters(*unknown), timeout=STEP_S))
            except Exception as exc:  # noqa: BLE001 - unknown offsets never make a stall
                log.debug("could not read end offsets: %s", exc)
        committed = dict(consumer._committed_offset)  # noqa: SLF001 - Faust keeps it; no public accessor
        for tp in self.progress.partitions():
            if committed.get(tp) is None:  # not known to Faust yet: where the fetcher stands
                try:
                    committed[tp] = await asyncio.wait_for(consumer.position(tp), timeout=STEP_S)
                except Exception as exc:  # noqa: BLE001 - unknown offsets never make a stall
                    log.debug("could not read the position of %s: %s", tp, exc)
        stalls = self.progress.stalled(time.monotonic(), self.settings.worker.stall_s, ends.get, committed.get, excused=excused)
        fresh = [stall.partition for stall in stalls if not stall.recovery_tried]
        if fresh and getattr(app, "rebalancing", False):
            return  # a rebalance under way resumes the partitions itself (or takes them away)
        if fresh:
            log.warning("input partitions stalled, trying to recover in place: %s", "; ".join(s.describe() for s in stalls if not s.recovery_tried))
            await _recover(app, fresh)
            self.progress.recovery_tried(fresh, time.monotonic())
        self.stalls = [stall for stall in stalls if stall.recovery_tried]
        if self.stalls:
            log.error("input partitions still stalled after a recovery; /livez fails: %s", "; ".join(s.describe() for s in self.stalls))
        self.counters.stalled_partitions(len(self.stalls))

    async def watch_group(self, app: Any, assigned: set[TP]) -> None:
        """Holding no input partition: find those that no member of the group takes (events
        waiting, the group's committed offset still for ``worker.stall_s``); ask to rejoin
        once, and fail ``/livez`` if they are still orphaned a window later (``orphans``)."""
        if assigned:
            self.orphan_watch.observe(time.monotonic(), True, {}, {})
            self.orphans = []
            self.counters.orphaned_partitions(0)
            return
        if getattr(app, "rebalancing", False):
            return  # a rebalance under way hands the partitions out
        # the group's offsets as `visionstream lag` reads them: a consumer of its own, not a member
        lag = await asyncio.wait_for(read_lag(self.settings.kafka, self.settings.kafka.consumer_group, list(self.inputs)), timeout=2 * STEP_S)
        committed = {TP(p.topic, p.partition): p.start if p.committed is None else p.committed for p in lag.partitions}
        ends = {TP(p.topic, p.partition): p.end for p in lag.partitions}
        verdict = self.orphan_watch.observe(time.monotonic(), bool(assigned), committed, ends)
        described = "; ".join(orphan.describe() for orphan in self.orphan_watch.orphans)
        if verdict is Verdict.REJOIN:
            log.warning("this worker holds no input partition and no member of the group takes these; asking the group to rebalance: %s", described)
            await _request_rejoin(app.consumer)
        elif verdict is Verdict.WEDGED:
            log.error("input partitions still taken by no member after a rebalance was asked for; /livez fails: %s", described)
        self.orphans = list(self.orphan_watch.orphans) if verdict is Verdict.WEDGED else []
        self.counters.orphaned_partitions(len(self.orphans))

    def verdict(self) -> tuple[bool, str]:
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

    def measure_lag(self, app: Any, assigned: set[TP]) -> None:
        """Each assigned partition's lag from the consumer's last fetch, for ``/metrics``."""
        consumer = app.consumer
        for tp in assigned:
            highwater = _highwater(consumer, tp)
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001 - Faust keeps it; no public accessor
            lag = None if highwater is None else highwater - (committed or 0)
            self.counters.consumer_lag(tp.topic, tp.partition, lag)


async def _recover(app: Any, partitions: list[TP]) -> None:
    """Resume fetching ``partitions``, let Faust's flow go on, and seek each of them to its
    committed offset (or where the fetcher stands): what was taken already is refused by
    the tracker (behind its tail), what was never taken is fetched again."""
    consumer = app.consumer
    consumer.resume_partitions(partitions)
    if not app.flow_control.is_active():
        log.warning("Faust's flow control was suspended outside a rebalance; resuming it")
        app.flow_control.resume()
        consumer.resume_flow()
    committed = consumer._committed_offset  # noqa: SLF001 - Faust keeps it; no public accessor
    for tp in partitions:
        offset = committed.get(tp)
        if offset is None:
            offset = await asyncio.wait_for(consumer.position(tp), timeout=STEP_S)
        if offset is not None:
            await asyncio.wait_for(consumer.seek(tp, offset), timeout=STEP_S)


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
