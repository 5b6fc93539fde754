"""Per-partition progress of the consumer: which assigned input partitions have events waiting
in Kafka while none is taken. Pure: the service feeds it times, offsets and high watermarks.

A consumer group that churns can leave a stream worker holding partitions it no longer fetches
(faust-streaming has open reports of consumers that stop fetching assigned partitions after a
rebalance): every probe answers, nothing moves. ``ProgressWatch.stalled`` names such partitions;
the service then tries to recover in place once (resume, seek to the committed offsets) and,
if the partitions are still stalled a full ``worker.stall_s`` later, fails ``/livez`` so that
its supervisor restarts it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class PartitionProgress:
    since: float  # monotonic: when it was assigned, an event was last taken, or recovery was tried
    next_offset: int | None = None  # the offset after the last one taken in this assignment
    recovering: bool = False  # recovery was tried and nothing has been taken since


@dataclass(frozen=True, slots=True)
class Stall:
    partition: Hashable
    lag: int  # events in Kafka past what was taken
    idle_s: float
    recovery_tried: bool

    def describe(self) -> str:
        return f"{self.partition}: {self.lag} event(s) waiting, none taken for {self.idle_s:.0f} s"


class ProgressWatch:
    """When each assigned partition last gave an event, and where its next one is."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, PartitionProgress] = {}

    def assigned(self, partitions: Iterable[Hashable], now: float) -> None:
        self._partitions = {partition: PartitionProgress(since=now) for partition in partitions}

    def taken(self, partition: Hashable, offset: int, now: float) -> None:
        progress = self._partitions.get(partition)
        if progress is not None:
            progress.since = now
            progress.next_offset = max(offset + 1, progress.next_offset or 0)
            progress.recovering = False

    def recovery_tried(self, partitions: Iterable[Hashable], now: float) -> None:
        """Give recovered partitions a new window of ``stall_s``; a second stall is reported."""
        for partition in partitions:
            progress = self._partitions.get(partition)
            if progress is not None:
                progress.since, progress.recovering = now, True

    def partitions(self) -> list[Hashable]:
        return list(self._partitions)

    def stalled(
        self,
        now: float,
        stall_s: float,
        end_offset: Callable[[Hashable], int | None],
        position: Callable[[Hashable], int | None],
        excused: Callable[[Hashable], bool] = lambda partition: False,
    ) -> list[Stall]:
        """Partitions with events past what was taken (``end_offset``, the high watermark, at
        least two beyond the next offset to take, else beyond ``position``, the committed
        offset: a transactional producer's commit marker takes an offset that is no event) and
        nothing taken for ``stall_s``. ``excused`` partitions (their agent waits for a free
        batch slot: backpressure, which the batch deadline watches) are never stalled.
        Unknown offsets never make a stall."""
        found: list[Stall] = []
        for partition, progress in self._partitions.items():
            idle_s = now - progress.since
            if idle_s <= stall_s or excused(partition):
                continue
            end = end_offset(partition)
            start = progress.next_offset if progress.next_offset is not None else position(partition)
            if end is None or start is None or end - start <= 1:
                continue  # one offset past what was taken may be a transaction's commit marker, never an event
            found.append(Stall(partition, end - start, idle_s, progress.recovering))
        return found
