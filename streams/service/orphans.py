"""Orphaned input partitions: events waiting that no member of the consumer group takes. Pure.

``ProgressWatch`` sees the partitions a stream worker holds. After a churning group (members
joining, leaving, dying within seconds) every member can end up holding none while the input
topics fill: each one's ``/readyz`` says "no input partition assigned", which is normal for a
spare member, and nothing notices that the group as a whole stopped. A member that holds no
input partition therefore watches the group's committed offsets: an input partition with
events past its committed offset (two or more: one may be a transaction's marker) whose
committed offset has not moved for ``worker.stall_s`` is orphaned. The member first asks to
rejoin the group (a new rebalance hands the partitions out again); if partitions are still
orphaned ``worker.stall_s`` after that, it fails ``/livez`` so that its supervisor restarts it.
A member that holds partitions leaves this to their own ``ProgressWatch``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    FINE = "fine"
    REJOIN = "rejoin"  # ask the group for a new assignment
    WEDGED = "wedged"  # a rejoin did not help: fail /livez


@dataclass(frozen=True, slots=True)
class Orphan:
    partition: Hashable
    waiting: int  # events past the group's committed offset
    still_s: float  # how long the committed offset has not moved

    def describe(self) -> str:
        return f"{self.partition}: {self.waiting} event(s) waiting, taken by no member for {self.still_s:.0f} s"


@dataclass(slots=True)
class _Seen:
    committed: int | None
    since: float


class OrphanWatch:
    """Feed it the group's committed offsets and the end offsets of every input partition,
    and whether this member holds any; it says what to do."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._seen: dict[Hashable, _Seen] = {}
        self._rejoined_at: float | None = None
        self.orphans: list[Orphan] = []

    def observe(
        self, now: float, holding: bool, committed: Mapping[Hashable, int | None], ends: Mapping[Hashable, int | None]
    ) -> Verdict:
        """``committed``: the group's offset per partition (None: never committed, read as the
        log's start, 0); ``ends``: the high watermarks (None: unknown, never an orphan)."""
        if holding:
            self._seen.clear()
            self._rejoined_at, self.orphans = None, []
            return Verdict.FINE
        orphans: list[Orphan] = []
        for partition, end in ends.items():
            offset = committed.get(partition)
            seen = self._seen.get(partition)
            if seen is None or seen.committed != offset:
                seen = self._seen[partition] = _Seen(offset, now)
            if end is None or end - (offset or 0) <= 1:
                continue
            if now - seen.since > self.stall_s:
                orphans.append(Orphan(partition, end - (offset or 0), now - seen.since))
        self.orphans = orphans
        if not orphans:
            self._rejoined_at = None
            return Verdict.FINE
        if self._rejoined_at is None:
            self._rejoined_at = now
            return Verdict.REJOIN
        if now - self._rejoined_at > self.stall_s:
            return Verdict.WEDGED
        return Verdict.FINE
