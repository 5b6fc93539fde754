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
