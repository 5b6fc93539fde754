"""Which Dask workers' model failed to load, and how long batches avoid them. Pure but the clock.

A worker whose model failed to load (``ModelLoadFailed``) gets no batch for a while: 10 s at
first, doubling while it keeps failing, at most 300 s; after that the next batch reaching it
loads the model again. A batch that comes back from it means its model loaded after all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inference.errors import ModelLoadFailed

log = logging.getLogger(__name__)

AVOID_S = (10.0, 300.0)  # how long batches avoid a worker whose model failed to load: first, longest


@dataclass(slots=True)
class Unhealthy:
    """A worker whose model failed to load: why, how often in a row, and until when to avoid it."""

    reason: str
    failures: int
    until: float  # monotonic


class WorkerHealth:
    """The workers to avoid now, each with its reason (``unhealthy``: address -> ``Unhealthy``)."""

    def __init__(self) -> None:
        self.unhealthy: dict[str, Unhealthy] = {}

    def avoid(self, failed: ModelLoadFailed) -> None:
        """Send no batch to ``failed.worker`` for a while (doubling while its model keeps
        failing to load); it loads again when the next batch reaches it after that."""
        previous = self.unhealthy.get(failed.worker)
        if previous is not None and previous.until > time.monotonic():
            previous.reason = failed.reason  # the batches in flight meanwhile say the same: no escalation
            return
        failures = (previous.failures if previous else 0) + 1
        first, longest = AVOID_S
        pause = min(longest, first * 2 ** (failures - 1))
        self.unhealthy[failed.worker] = Unhealthy(failed.reason, failures, time.monotonic() + pause)
        log.warning("the model failed to load on Dask worker %s (%s); sending its batches elsewhere for %.0f s", failed.worker, failed.reason, pause)

    def loaded(self, worker: str | None) -> None:
        """A batch came back from ``worker``: its model loaded after all."""
        self.unhealthy.pop(worker, None)  # type: ignore[arg-type]

    def healthy(self, reported: Mapping[str, Any]) -> list[str]:
        """The workers of ``reported`` (address -> anything) that batches may go to now."""
        now = time.monotonic()
        return [address for address in reported if address not in self.unhealthy or self.unhealthy[address].until <= now]

    def placement(self, workers: Mapping[str, Any]) -> dict[str, Any]:
        """Dask ``submit`` options that keep a batch off the workers to avoid, given every
        worker now (address -> threads); those gone from the cluster are forgotten."""
        for address in [address for address in self.unhealthy if address not in workers]:
            del self.unhealthy[address]  # gone from the cluster
        healthy = self.healthy(workers)
        if healthy and len(healthy) < len(workers):
            return {"workers": healthy, "allow_other_workers": False}
        return {}

    def without_model(self, workers: Mapping[str, Any]) -> int:
        """Workers, of ``workers``, whose model failed to load and that batches avoid now."""
        return len(workers) - len(self.healthy(workers))

    def trouble(self, workers: Mapping[str, Any]) -> str | None:
        """Why none of ``workers`` can take a batch now, if none can: for readiness."""
        if not workers or self.healthy(workers):
            return None
        reasons = sorted({self.unhealthy[address].reason for address in workers if address in self.unhealthy})
        return f"no Dask worker has the model loaded: {'; '.join(reasons)[:300]}"
