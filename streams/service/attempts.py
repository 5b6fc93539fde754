"""Attempts at one batch on the cluster: a deadline per attempt (``batch.timeout_s``), retries
with exponential backoff until ``batch.retry_timeout_s``, and none while this stream worker or
another isolates a worker-killer (``streams.service.isolation``). No Faust here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
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
    """What attempts ask of the cluster: whether another stream worker isolates, how often
    workers died with these images (None: a cluster that keeps no record), when a worker starts
    classifying an attempt (``starts``; a cluster that cannot say yields an event set at once)
    and when a worker last started any batch (``last_batch_start``, ``time.monotonic``)."""

    async def wait_while_isolating(self, deadline_s: float) -> None: ...
    def tally_deaths(self, uris: list[str]) -> DeathTally | None: ...
    def starts(self, uris: list[str]) -> AbstractContextManager[asyncio.Event]: ...
    def last_batch_start(self) -> float: ...


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
        """One attempt: ``batch.timeout_s`` from when a worker starts classifying it. Until then
        it waits in the queue behind other batches (a backfill behind live traffic) and its
        deadline runs only while no batch starts anywhere on the cluster (nothing moves: a hung
        worker holds it); at most ``batch.queue_timeout_s`` in all, after which it is retried
        like any transient failure (never isolated: its images did nothing)."""
        with self.cluster.starts(uris) as started:
            attempt = asyncio.ensure_future(self.classify(uris, priority))
            try:
                await self._until_started(uris, attempt, started)
            except BaseException:
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                raise
            try:
                return await asyncio.wait_for(attempt, timeout=self.batch.timeout_s)
            except TimeoutError as exc:
                raise self._timed_out(uris) from exc

    async def _until_started(self, uris: list[str], attempt: asyncio.Future[list[ImageResult]], started: asyncio.Event) -> None:
        submitted = time.monotonic()
        while not (started.is_set() or attempt.done()):
            now = time.monotonic()
            if now - submitted >= self.batch.queue_timeout_s:
                raise ClusterUnavailable("cluster", f"no Dask worker started the batch within batch.queue_timeout_s ({self.batch.queue_timeout_s:g} s)")
            moving = max(submitted, self.cluster.last_batch_start()) + self.batch.timeout_s - now
            if moving <= 0:
                raise self._timed_out(uris)  # not queued behind work: nothing started for batch.timeout_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(attempt, started), timeout=min(moving, submitted + self.batch.queue_timeout_s - now))

    def _timed_out(self, uris: list[str]) -> WorkerLost | BatchTimeout:
        counted = self.cluster.tally_deaths(uris)
        if counted is not None and counted.total:  # restarts and model loads ate the deadline
            return WorkerLost("cluster", f"past batch.timeout_s after {counted.total} worker death(s) with these images")
        return BatchTimeout(len(uris), self.batch.timeout_s)


async def _first(attempt: asyncio.Future[list[ImageResult]], started: asyncio.Event) -> None:
    """Until the attempt started on a worker, or ended (either way: its own outcome follows)."""
    if started.is_set():
        return
    waiting = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait({attempt, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
