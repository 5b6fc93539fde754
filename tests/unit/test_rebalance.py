"""commit_before_revoke: in flight finished, then committed, then Faust's own revoke handling."""

import asyncio

from streams.service.rebalance import commit_before_revoke


class Consumer:
    """Faust's consumer at the seam this module touches: its revoke handler and commit."""

    def __init__(self, commit_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.commit_fails = commit_fails

    async def on_partitions_revoked(self, revoked: set) -> None:
        self.calls.append(f"faust forgets {sorted(revoked)}")

    async def commit(self) -> bool:
        if self.commit_fails:
            raise RuntimeError("coordinator gone")
        self.calls.append("commit")
        return True


def test_batches_finish_and_are_committed_before_faust_forgets_the_partitions():
    consumer = Consumer()

    async def finish() -> int:
        consumer.calls.append("finish in flight")
        return 0

    commit_before_revoke(consumer, finish)
    commit_before_revoke(consumer, finish)  # installed once
    asyncio.run(consumer.on_partitions_revoked({"uploads-0", "uploads-1"}))
    assert consumer.calls == ["finish in flight", "commit", "faust forgets ['uploads-0', 'uploads-1']"]
    consumer.calls.clear()
    asyncio.run(consumer.on_partitions_revoked(set()))  # the first join revokes nothing
    assert consumer.calls == ["faust forgets []"]


def test_a_failed_commit_still_hands_the_partitions_back():
    consumer = Consumer(commit_fails=True)

    async def finish() -> int:
        return 2

    commit_before_revoke(consumer, finish)
    asyncio.run(consumer.on_partitions_revoked({"uploads-0"}))
    assert consumer.calls == ["faust forgets ['uploads-0']"]


def test_the_commit_before_a_revoke_outlasts_a_periodic_commit_already_in_flight():
    """Faust's own commit() (its real code, below) waits for a commit in flight and then returns
    False without committing: the offsets acked since would be dropped at the revoke."""
    from types import SimpleNamespace

    from faust.transport.consumer import Consumer as FaustConsumer

    class Commits:
        commit = FaustConsumer.commit
        maybe_wait_for_commit_to_finish = FaustConsumer.maybe_wait_for_commit_to_finish

        def __init__(self) -> None:
            self._commit_fut = None
            self.app = SimpleNamespace(client_only=False)
            self.loop = asyncio.get_running_loop()
            self.acked, self.committed = {"uploads-0": 5}, [{}]

        async def force_commit(self, topics=None, start_new_transaction=True) -> bool:
            offsets = dict(self.acked)  # what is acked when the commit starts
            await asyncio.sleep(0.05)  # the round trip to the coordinator
            if offsets == self.committed[-1]:
                return False
            self.committed.append(offsets)
            return True

        async def on_partitions_revoked(self, revoked: set) -> None:
            pass

    async def run() -> list[dict]:
        consumer = Commits()

        async def finish() -> int:
            consumer.acked["uploads-0"] = 10  # the batch in flight finishes and acks
            return 0

        commit_before_revoke(consumer, finish)
        periodic = asyncio.ensure_future(consumer.commit())  # Faust's timer: carries offset 5
        await asyncio.sleep(0.01)
        await consumer.on_partitions_revoked({"uploads-0"})
        await periodic
        return consumer.committed

    assert asyncio.run(run())[-1] == {"uploads-0": 10}
