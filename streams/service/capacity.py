"""How many batches a stream worker keeps on the cluster, per priority (live and backfill).

One semaphore per priority, sized once the cluster is known and grown as workers join
(``grow``): ``batch.max_in_flight``, or by default the cluster's task threads + 1; backfill at
most ``worker.backfill_share`` of that. Never shrunk: batches beyond a smaller cluster's threads
wait in the scheduler's queue, harmlessly. No Faust here.
"""

from __future__ import annotations

import asyncio
import logging
import math

from inference.client.job import batches_in_flight
from inference.settings import Settings

log = logging.getLogger(__name__)

LIVE_PRIORITY, BACKFILL_PRIORITY = 10, 0


class BatchSlots:
    """A slot per batch in flight, per priority; ``waiting`` says which priority waits for one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots: dict[int, asyncio.Semaphore] = {}  # per priority; sized once the cluster is known
        self.in_flight: dict[int, int] = {}  # what each semaphore allows
        self.waiting: dict[int, bool] = {LIVE_PRIORITY: False, BACKFILL_PRIORITY: False}

    def open(self) -> None:
        """No slot yet: ``grow`` adds them once the cluster's threads are counted."""
        self.slots = {LIVE_PRIORITY: asyncio.Semaphore(0), BACKFILL_PRIORITY: asyncio.Semaphore(0)}
        self.in_flight = {LIVE_PRIORITY: 0, BACKFILL_PRIORITY: 0}

    async def acquire(self, priority: int) -> None:
        """Wait for a slot (backpressure: lag stays in Kafka, memory stays flat)."""
        self.waiting[priority] = True
        try:
            await self.slots[priority].acquire()
        finally:
            self.waiting[priority] = False

    def grow(self, threads: int) -> None:
        """Size the batches in flight for a cluster of ``threads`` task threads; never shrinks."""
        target = batches_in_flight(self.settings.batch.max_in_flight, threads)
        targets = {LIVE_PRIORITY: target, BACKFILL_PRIORITY: max(1, math.floor(target * self.settings.worker.backfill_share))}
        if targets[LIVE_PRIORITY] <= self.in_flight[LIVE_PRIORITY]:
            return
        for priority, wanted in targets.items():
            for _ in range(wanted - self.in_flight[priority]):
                self.slots[priority].release()  # one more batch may go
            self.in_flight[priority] = max(wanted, self.in_flight[priority])
        log.info("up to %d batch(es) in flight on the cluster, at most %d of them backfill", *targets.values())
