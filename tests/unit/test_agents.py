"""The stream service's acknowledgement: an event is acked only after its batch's events were
published, per partition in offset order, never past a batch still in work; a batch that could
not be published acks nothing. Faust's stream and the cluster are replaced at their seams."""

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from inference.records.results import ImageResult, ModelInfo, Prediction
from inference.settings import FilterSettings, Settings
from streams.service.agents import StreamService
from streams.service.capacity import BACKFILL_PRIORITY, LIVE_PRIORITY
from streams.service.processing import BatchHandler
from streams.service.s3events import ObjectRef, object_created_event

MODEL = ModelInfo("resnet18", "none", "fp32", "cpu")
BEST = Prediction(151, "n02085620", "Chihuahua", 0.5)


def upload_event(partition: int, offset: int, generation: int = 1) -> SimpleNamespace:
    """What ``_process`` reads of a Faust event: its value, its message's place in the topic and
    the consumer generation it was fetched under."""
    value = json.dumps(object_created_event(ObjectRef("b", f"Images/{partition}-{offset}.jpg"))).encode()
    message = SimpleNamespace(
        topic="image-uploads", partition=partition, offset=offset, tp=("image-uploads", partition), timestamp=None, value=value,
        generation_id=generation,
    )
    return SimpleNamespace(message=message, value=value)


def uri(event: SimpleNamespace) -> str:
    return f"s3://b/Images/{event.message.partition}-{event.message.offset}.jpg"


class Seams:
    """A cluster whose batches finish when the test says so, a broker that records (or refuses)
    what is published, and a stream that records what is acked and what was published by then."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.published: list[str] = []
        self.acked: list[tuple[int, int]] = []
        self.refuse: set[str] = set()

    async def classify(self, uris: list[str], priority: int) -> list[ImageResult]:
        await self.release.setdefault(uris[0], asyncio.Event()).wait()
        return [ImageResult(u, u.rsplit("/", 1)[-1], BEST, (BEST,), None, None, None, MODEL) for u in uris]

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        published = json.loads(value)["uri"]
        if published in self.refuse:
            raise ConnectionError("broker gone")
        self.published.append(published)

    async def ack(self, event: SimpleNamespace) -> None:
        assert uri(event) in self.published, f"{uri(event)} acked before its prediction was published"
        self.acked.append((event.message.partition, event.message.offset))

    def finish(self, batch: list[SimpleNamespace]) -> None:
        self.release.setdefault(uri(batch[0]), asyncio.Event()).set()


def service(tmp_path: Path, seams: Seams) -> StreamService:
    settings = Settings().with_overrides({"worker": {"data_dir": str(tmp_path)}, "batch": {"retry_timeout_s": 0.05, "retry_backoff_s": 0.01}})
    built = StreamService(settings)  # connects to nothing until started
    built.intake.handler = BatchHandler(seams.classify, seams.publish, settings.batch, settings.topics, FilterSettings())
    built.intake.acks.assigned(1)  # what on_partitions_assigned does, generation 1
    return built


async def start(built: StreamService, seams: Seams, batch: list[SimpleNamespace], slots: asyncio.Semaphore) -> asyncio.Task | None:
    """What ``run_agent`` does for one taken batch; None where nothing of it was admitted."""
    await slots.acquire()
    admitted = built.intake.admit(batch)
    if not admitted:
        slots.release()
        return None
    task = asyncio.create_task(built.intake.process(seams, admitted, slots, 0))
    await asyncio.sleep(0)
    return task


def test_acks_follow_publishing_in_offset_order_and_never_pass_an_unfinished_batch(tmp_path: Path):
    async def run() -> None:
        seams = Seams()
        built = service(tmp_path, seams)
        slots = asyncio.Semaphore(3)
        first = [upload_event(0, offset) for offset in range(0, 3)]
        second = [upload_event(0, offset) for offset in range(3, 6)]
        other = [upload_event(1, offset) for offset in range(0, 2)]
        tasks = [await start(built, seams, batch, slots) for batch in (first, second, other)]
        seams.finish(second)
        await tasks[1]
        assert [uri(e) for e in second] == seams.published  # published...
        assert seams.acked == []  # ...but not acked: the first batch on its partition is still in work
        seams.finish(other)
        await tasks[2]
        assert seams.acked == [(1, 0), (1, 1)]  # another partition does not wait
        seams.finish(first)
        await tasks[0]
        assert seams.acked[2:] == [(0, offset) for offset in range(6)]  # in offset order, once each
        assert built.intake.acks.waiting() == 0 and not slots.locked()

    asyncio.run(run())


def test_a_batch_that_could_not_be_published_acks_nothing_and_stops_the_worker(tmp_path: Path):
    async def run() -> None:
        seams = Seams()
        built = service(tmp_path, seams)
        crashed: list[BaseException] = []

        async def crash(reason: BaseException) -> None:  # Faust's own crash would stop the whole app
            crashed.append(reason)

        built.app.crash = crash
        batch = [upload_event(0, offset) for offset in range(3)]
        seams.refuse = {uri(batch[1])}
        slots = asyncio.Semaphore(1)
        task = await start(built, seams, batch, slots)
        seams.finish(batch)
        await task
        assert seams.acked == [] and [type(reason) for reason in crashed] == [ConnectionError]
        assert built.intake.acks.waiting() == 3 and not slots.locked()  # held back: consumed again after the restart

    asyncio.run(run())


def test_batches_in_flight_follow_the_cluster_as_workers_join(tmp_path: Path):
    async def run() -> list[tuple[int, int]]:
        built = service(tmp_path, Seams())
        built.slots.open()
        seen = []
        for threads in (2, 6, 2):  # one worker of 2 threads, three, one again
            built.slots.grow(threads)
            seen.append((built.slots.in_flight[LIVE_PRIORITY], built.slots.in_flight[BACKFILL_PRIORITY]))
        free = 0
        while not built.slots.slots[LIVE_PRIORITY].locked():  # the semaphore really allows what in_flight says
            await built.slots.slots[LIVE_PRIORITY].acquire()
            free += 1
        assert free == built.slots.in_flight[LIVE_PRIORITY]
        return seen

    # 2 threads: 3 in flight (1 backfill); 6 threads: 7 (3); a worker leaving never shrinks it
    assert asyncio.run(run()) == [(3, 1), (7, 3), (7, 3)]


def test_a_rebalance_never_lets_a_batch_taken_before_it_acknowledge_past_unprocessed_events(tmp_path: Path):
    """The sequence a churning group produces: batch A (offsets 0-2) is in work; a rebalance
    revokes the partition and gives it straight back (generation 2); events 3-5, taken before
    the revoke, come out of the stream's buffer afterwards; Faust re-fetches 0-5 from the
    committed offset. The stale 3-5 must not start (they would ack 3-5 while 0-2 of the new
    generation are in work), A's completion must ack nothing, and the new generation acks
    0-5 only once its own batches are published."""

    async def run() -> None:
        seams = Seams()
        built = service(tmp_path, seams)
        slots = asyncio.Semaphore(4)
        batch_a = [upload_event(0, offset) for offset in range(0, 3)]
        task_a = await start(built, seams, batch_a, slots)
        built.intake.acks.revoked({("image-uploads", 0)})  # on_partitions_revoked
        built.intake.acks.assigned(2)  # on_partitions_assigned: the same partition, generation 2
        stale = [upload_event(0, offset) for offset in range(3, 6)]  # fetched under generation 1
        assert await start(built, seams, stale, slots) is None  # never started
        seams.finish(batch_a)
        await task_a
        assert seams.acked == []  # A finished after the revoke: its partition's new owner acks
        seams.release.clear()
        refetched_head = [upload_event(0, offset, generation=2) for offset in range(0, 3)]
        refetched_tail = [upload_event(0, offset, generation=2) for offset in range(3, 6)]
        task_head = await start(built, seams, refetched_head, slots)
        task_tail = await start(built, seams, refetched_tail, slots)
        seams.finish(refetched_tail)
        await task_tail
        assert seams.acked == []  # 3-5 published, but 0-2 of this generation are still in work
        seams.finish(refetched_head)
        await task_head
        assert seams.acked == [(0, offset) for offset in range(6)]  # once each, in order, by generation 2
        assert built.counters.fenced == 3 and built.intake.acks.waiting() == 0

    asyncio.run(run())


def test_an_offset_behind_what_a_partition_already_took_is_refused(tmp_path: Path):
    built = service(tmp_path, Seams())
    first = [upload_event(0, offset) for offset in range(5, 8)]
    assert built.intake.admit(first) == first
    behind = [upload_event(0, offset) for offset in (3, 6, 8)]
    assert [e.message.offset for e in built.intake.admit(behind)] == [8]  # 3 and 6 are behind 7
    assert built.counters.fenced == 2


def test_batches_that_outlast_the_grace_before_a_revoke_are_cancelled_and_release_the_isolation_lease(tmp_path: Path):
    """A batch still running when the revoke's grace ends holds the isolation lock and the
    cluster-wide lease while it isolates: left running, it would stall the next generation's
    batches and could stop the worker for partitions it no longer holds. It is cancelled, its
    events acknowledged by no one (the next owner consumes them), the lease released."""

    async def run() -> None:
        seams = Seams()
        built = service(tmp_path, seams)
        built.settings = built.settings.with_overrides({"worker": {"shutdown_grace_s": 0.2}})
        held: list[str] = []

        class Lease:
            def __init__(self) -> None:
                self.entered = asyncio.Event()

            async def __aenter__(self) -> None:
                held.append("lease")
                self.entered.set()

            async def __aexit__(self, *exc_info: object) -> None:
                held.remove("lease")

        lease = Lease()

        async def isolating(uris, priority):
            async with lease:
                await asyncio.Event().wait()  # a long isolation: never done by itself
            return []

        built.intake.handler.isolation.classify = isolating
        crashed: list[BaseException] = []

        async def crash(reason: BaseException) -> None:
            crashed.append(reason)

        built.app.crash = crash
        slots = asyncio.Semaphore(1)
        task = await start(built, seams, [upload_event(0, offset) for offset in range(3)], slots)
        built.intake.tasks.add(task)
        await lease.entered.wait()
        assert await built.finish_in_flight() == 1
        assert task.cancelled() and held == [] and crashed == [] and seams.acked == [] and not slots.locked()

    asyncio.run(run())
