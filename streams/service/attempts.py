"""Attempts at one batch on the cluster: a deadline per attempt (``batch.timeout_s``), retries
with exponential backoff until ``batch.retry_timeout_s``, and none while this stream worker or
another isolates a worker-killer (``streams.service.isolation``). No Faust here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from tenacity import AsyncRetrying, RetryCallState, RetryError, retry_if_exception, stop_before_delay, wait_exponential

from inference.client.deaths import DeathTally
from inference.errors import BatchTimeout, ClusterUnavailable, WorkerLost
from inference.records.results import ImageResult
from inference.settings import BatchSettings
from streams.errors import BatchRetryExhausted
from streams.service.metrics import StreamMetrics

log = logging.getLogger(__name__)

Classify = Callable[[list[str], int], Awaitable[list[ImageResult]]]


class DeathRecord(Protocol):
    """What attempts ask of the cluster: whether another stream worker isolates, and how often
    workers died with these images (None: a cluster that keeps no record)."""

    async def wait_while_isolating(self, deadline_s: float) -> None: ...
    def tally_deaths(self, uris: list[str]) -> DeathTally | None: ...


@dataclass
class BatchAttempts:
    """Runs a batch until an attempt succeeds (``run``); says when one last did (``last_success``)."""

    classify: Classify
    batch: BatchSettings
    counters: StreamMetrics
    cluster: DeathRecord
    last_success: float = field(default=0.0, init=False)  # monotonic: an attempt of ours completed
    not_isolating: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)  # clear while this worker isolates

    def __post_init__(self) -> None:
        self.not_isolating.set()

    async def run(self, uris: list[str], priority: int, isolated: bool = False) -> list[ImageResult]:
        """Attempts with exponential backoff (``batch.retry_backoff_s``, doubling to 30 s) until
        one succeeds, or until the next pause would pass ``batch.retry_timeout_s``: then
        BatchRetryExhausted. WorkerLost and BatchTimeout are not retried here (the caller splits
        the batch)."""
        retrying = AsyncRetrying(
            # errors only: WorkerLost and BatchTimeout (the caller splits), cancellation, SystemExit... go straight out
            retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and not isinstance(exc, WorkerLost | BatchTimeout)),
            stop=stop_before_delay(self.batch.retry_timeout_s),
            wait=wait_exponential(multiplier=self.batch.retry_backoff_s, exp_base=2, max=30.0),
            before_sleep=self._before_pause,
        )
        self.counters.batch_started()
        try:
            async for attempt in retrying:
                with attempt:
                    if not isolated:
                        await self.not_isolating.wait()
                        await self.cluster.wait_while_isolating(self.batch.timeout_s)
                    results = await self._once(uris, priority)
                    if len(results) != len(uris):
                        raise ClusterUnavailable("cluster", f"returned {len(results)} results for {len(uris)} images")
            self.last_success = time.monotonic()
            return results
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise BatchRetryExhausted(len(uris), self.batch.retry_timeout_s, f"{type(cause).__name__}: {cause}") from cause
        finally:
            self.counters.batch_ended()

    def _before_pause(self, state: RetryCallState) -> None:
        """tenacity's hook before each pause: count the retry and say why."""
        self.counters.batch_retried()
        error = state.outcome.exception() if state.outcome else None
        pause = state.next_action.sleep if state.next_action else 0.0
        log.warning("batch failed (%s: %s); retrying in %.1f s", type(error).__name__, error, pause)

    async def _once(self, uris: list[str], priority: int) -> list[ImageResult]:
        try:
            return await asyncio.wait_for(self.classify(uris, priority), timeout=self.batch.timeout_s)
        except TimeoutError as exc:
            counted = self.cluster.tally_deaths(uris)
            if counted is not None and counted.total:  # restarts and model loads ate the deadline
                raise WorkerLost("cluster", f"past batch.timeout_s after {counted.total} worker death(s) with these images") from exc
            raise BatchTimeout(len(uris), self.batch.timeout_s) from exc
