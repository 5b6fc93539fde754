"""Stalled input partitions: events waiting in Kafka, none taken. The watch is pure; the
service's recovery is checked with Faust's consumer replaced at its seam."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from inference.settings import Settings
from streams.service.agents import StreamService
from streams.service.progress import ProgressWatch

P0, P1, P2 = TP("uploads", 0), TP("uploads", 1), TP("uploads", 2)


def test_a_partition_with_events_waiting_and_none_taken_is_stalled():
    watch = ProgressWatch()
    watch.assigned([P0, P1, P2], now=0.0)
    watch.taken(P0, 9, now=50.0)  # P0 took up to 9; its end is 10: nothing waiting
    watch.taken(P2, 3, now=50.0)  # P2 took up to 3; its end is 20: waiting, but taken recently
    ends = {P0: 10, P1: 7, P2: 20}
    committed = {P0: 5, P1: 2, P2: 0}
    [stall] = watch.stalled(60.0, 30.0, ends.get, committed.get)
    assert stall.partition == P1 and stall.lag == 5 and not stall.recovery_tried
    assert watch.stalled(60.0, 30.0, ends.get, committed.get, excused=lambda tp: tp == P1) == []  # backpressure
    assert [s.partition for s in watch.stalled(90.0, 30.0, ends.get, committed.get)] == [P1, P2]


def test_unknown_offsets_never_make_a_stall_and_a_recovery_opens_a_new_window():
    watch = ProgressWatch()
    watch.assigned([P0], now=0.0)
    assert watch.stalled(100.0, 30.0, lambda tp: None, lambda tp: 0) == []
    assert watch.stalled(100.0, 30.0, lambda tp: 10, lambda tp: None) == []
    watch.recovery_tried([P0], now=100.0)
    assert watch.stalled(120.0, 30.0, lambda tp: 10, lambda tp: 0) == []  # within the new window
    [again] = watch.stalled(131.0, 30.0, lambda tp: 10, lambda tp: 0)
    assert again.recovery_tried  # the second stall is the one reported
    watch.taken(P0, 9, now=132.0)
    assert watch.stalled(200.0, 30.0, lambda tp: 10, lambda tp: 0) == []  # moving again


@given(
    taken=st.lists(st.integers(0, 1000), max_size=20),
    end=st.one_of(st.none(), st.integers(0, 2000)),
    committed=st.one_of(st.none(), st.integers(0, 2000)),
    idle=st.floats(0, 100),
)
def test_a_stall_always_has_events_waiting_past_what_was_taken(taken, end, committed, idle):
    watch = ProgressWatch()
    watch.assigned([P0], now=0.0)
    for offset in taken:
        watch.taken(P0, offset, now=0.0)
    stalls = watch.stalled(idle, 30.0, lambda tp: end, lambda tp: committed)
    start = max(taken) + 1 if taken else committed
    expected = idle > 30.0 and end is not None and start is not None and end - start > 1  # a lone marker is no event
    assert bool(stalls) == expected
    if stalls:
        assert stalls[0].lag == end - start > 1


class Consumer:
    """What the watch and the recovery use of Faust's consumer."""

    def __init__(self, ends: dict[TP, int], committed: dict[TP, int]) -> None:
        self.ends, self._committed_offset = ends, committed
        self.resumed: list[TP] = []
        self.seeks = 0

    def highwater(self, tp: TP) -> int | None:
        return self.ends.get(tp)

    async def highwaters(self, *tps: TP) -> dict[TP, int]:
        return {}

    async def position(self, tp: TP) -> int | None:
        return None

    def resume_partitions(self, tps: list[TP]) -> None:
        self.resumed.extend(tps)

    def resume_flow(self) -> None:
        pass

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks += 1
        self.sought = (tp, offset)


def test_a_stalled_partition_is_recovered_once_then_fails_livez(tmp_path: Path, monkeypatch):
    settings = Settings().with_overrides({"worker": {"data_dir": str(tmp_path), "stall_s": 30}})
    service = StreamService(settings)
    consumer = Consumer({P0: 10, P1: 4}, {P0: 2, P1: 4})
    monkeypatch.setattr(type(service.app), "consumer", property(lambda app: consumer))
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr("streams.service.liveness.time.monotonic", lambda: clock.now)
    service.assigned = {P0, P1}
    service.liveness.assigned(service.assigned)
    clock.now += 31
    asyncio.run(service.liveness.watch_partitions(service.app, service.waits_for_a_slot))
    assert consumer.resumed == [P0] and consumer.seeks == 1 and consumer.sought == (P0, 2)  # recovered in place first
    assert service.live()[0]  # not reported yet
    clock.now += 31
    asyncio.run(service.liveness.watch_partitions(service.app, service.waits_for_a_slot))
    alive, why = service.live()
    assert not alive and "uploads" in why and "8 event(s) waiting" in why
    assert consumer.seeks == 1  # tried once; now the supervisor's turn
    assert b"visionstream_stalled_partitions 1.0" in service.counters.exposition()
    service.liveness.taken(P0, 9, clock.now)  # events flow again
    asyncio.run(service.liveness.watch_partitions(service.app, service.waits_for_a_slot))
    assert service.live()[0] and b"visionstream_stalled_partitions 0.0" in service.counters.exposition()
