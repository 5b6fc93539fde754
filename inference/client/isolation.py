"""The cluster-wide lease one stream worker holds while it isolates a worker-killer (adapter).

While one stream worker runs suspect images alone on the cluster, the others hold their new
batches (``wait_while_isolating``): a neighbour's batch on the same worker would make every death
ambiguous. The lease is a Dask ``Semaphore`` on the scheduler, so it lapses by itself if its
holder dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from distributed import Semaphore

log = logging.getLogger(__name__)

ISOLATION_LEASE = "visionstream-isolation"  # held, cluster-wide, by the stream worker that isolates a worker-killer
BUSY_CHECK_S = 1.0  # how often a waiting batch asks whether another stream worker isolates
LEASE_WAIT_S = 120.0  # the longest one stream worker waits for another's isolation before its own


class IsolationLease:
    """This client's hold on the cluster-wide isolation lease, and its view of others' holds."""

    def __init__(self) -> None:
        self._lease: Semaphore | None = None
        self._checked = (0.0, False)  # (monotonic, another stream worker isolates)

    def forget(self) -> None:
        """After a reconnect: the lease was the old scheduler's."""
        self._lease = None

    @asynccontextmanager
    async def held(self, client: Any) -> AsyncIterator[None]:
        """Hold the lease while suspects run alone. Where it cannot be had (a scheduler that just
        restarted), isolation goes on without it: suspects still wait to run alone."""
        lease: Semaphore | None = None
        try:
            if self._lease is None:
                self._lease = await Semaphore(max_leases=1, name=ISOLATION_LEASE, scheduler_rpc=client.scheduler, loop=client.loop)
            lease = self._lease
            if not await lease.acquire(timeout=LEASE_WAIT_S):
                log.warning("another stream worker has isolated for %.0f s; isolating beside it", LEASE_WAIT_S)
                lease = None
        except Exception as exc:  # noqa: BLE001 - a lease of a scheduler that is gone
            log.warning("could not take the isolation lease (%s: %s); isolating without it", type(exc).__name__, exc)
            self._lease, lease = None, None
        try:
            yield
        finally:
            if lease is not None:
                try:
                    await lease.release()
                except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
                    log.warning("could not release the isolation lease: %s", exc)

    async def wait_while_others_hold(self, client: Any, deadline_s: float) -> None:
        """Hold a new batch while another stream worker isolates, for at most ``deadline_s``."""
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up and await self._someone_else_holds(client):
            await asyncio.sleep(BUSY_CHECK_S)

    async def _someone_else_holds(self, client: Any) -> bool:
        checked_at, isolating = self._checked
        if time.monotonic() - checked_at < BUSY_CHECK_S or client is None:
            return isolating
        try:
            leases = await asyncio.wait_for(client.scheduler.semaphore_value(name=ISOLATION_LEASE), timeout=5.0)
        except Exception:  # noqa: BLE001 - no lease registered yet, or the scheduler is busy: go on
            leases = 0
        isolating = bool(leases) and not (self._lease is not None and self._lease._leases)  # noqa: SLF001 - not our own
        self._checked = (time.monotonic(), isolating)
        return isolating
