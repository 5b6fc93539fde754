"""Before a rebalance takes this worker's partitions: finish what is in flight, then commit.

Every group change (a stream worker joining, a graceful leave, a scale-in) is an eager
rebalance: every member's partitions are revoked, then assigned again. Faust forgets the
offsets acknowledged since its last commit as soon as partitions are revoked, before any
application hook runs, and batches still in flight then acknowledge nothing (their events
are fenced, ``AckTracker``). Left alone, each change re-delivers, across the whole group,
what was in flight and what was acknowledged since the last commit: duplicates.

``commit_before_revoke`` puts a step in front of Faust's own revoke handling: stop starting
batches, let those in flight finish (bounded, the way a SIGTERM drain is), and commit what
they acknowledged, while the member still holds its partitions (the group coordinator waits
for it: that is what a revoke callback is for). What does not finish in time is consumed
again by the partition's next owner, as before: never lost, at most duplicated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 10.0
REVOKE_COMMIT_MARGIN_S = 3 * COMMIT_TIMEOUT_S  # beyond worker.shutdown_grace_s, in the group's rebalance timeout


async def commit_acked(consumer: Any, attempts: int = 3) -> bool:
    """Commit what has been acknowledged. Faust's ``commit()``, called while its periodic commit
    is in flight, waits for that one and returns False without committing: the offsets acked
    since would be forgotten at the revoke, and the next owner would process them again. So
    while a commit was in flight, commit again. True if this call committed anything."""
    committed = False
    for _ in range(attempts):
        in_flight = getattr(consumer, "_commit_fut", None) is not None
        committed = bool(await consumer.commit()) or committed
        if not in_flight:
            return committed
    return committed


def commit_before_revoke(consumer: Any, finish_in_flight: Callable[[], Awaitable[int]]) -> None:
    """Wrap ``consumer.on_partitions_revoked`` (Faust's, called on the app's loop for each
    revoke): ``finish_in_flight`` (returns how many batches it cancelled unfinished), then a
    commit, then Faust's own handling. Installed once per consumer."""
    if getattr(consumer, "_visionstream_commit_before_revoke", False):
        return
    faust_revoked = consumer.on_partitions_revoked

    async def on_partitions_revoked(revoked: Any) -> None:
        if revoked:
            try:
                unfinished = await finish_in_flight()
                committed = await asyncio.wait_for(commit_acked(consumer), timeout=COMMIT_TIMEOUT_S)
                log.info(
                    "partitions revoked: batches in flight finished%s, offsets %s",
                    f" but {unfinished}, cancelled (their events go to the next owner)" if unfinished else "",
                    "committed" if committed else "already committed",
                )
            except Exception as exc:  # noqa: BLE001 - the next owner consumes from the last commit: duplicates, never loss
                log.warning("could not commit before giving up partitions: %s", exc)
        await faust_revoked(revoked)

    consumer.on_partitions_revoked = on_partitions_revoked
    consumer._visionstream_commit_before_revoke = True
