"""Poison isolation: a batch that keeps killing Dask workers, or does not finish within
``batch.timeout_s``, is split until the image at fault is alone, and only that image is
dead-lettered. No Faust here.

Dask counts a worker's death against every task on it, so a batch beside the culprit dies with
it: the split runs alone, one suspect at a time under the cluster-wide isolation lease, each
attempt only once no other batch of ours runs, and no new batch of this stream worker is
submitted until it is over. One image is convicted only once workers died with it alone on
them twice (the scheduler's record, ``inference.client.deaths``), or once it timed out alone
twice while other images were classified and a probe showed the cluster and its store answer.

What an isolation found (images cleared, images convicted, isolations begun over them) is kept
on the scheduler (``inference.client.verdicts``): when the stream worker stops mid-way, the
next owner of the events resumes from it instead of the whole batch, and gives up on the images
not cleared once ``MAX_CUT_SHORT`` isolations of them were cut short, rather than loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from inference.client.deaths import DeathTally, convicted
from inference.client.verdicts import CLEARED, CONVICTED, Verdict
from inference.errors import BatchTimeout, StoreWideFailure, WorkerLost
from inference.records.objects import S3_SCHEMES, identity, split_s3_uri
from inference.records.results import SLOW_OBJECT, Failure, ImageResult
from inference.settings import BatchSettings
from streams.errors import BatchRetryExhausted
from streams.service.attempts import BatchAttempts
from streams.service.metrics import StreamMetrics

log = logging.getLogger(__name__)

WORKER_STAGE = "worker"


class Isolation(Protocol):
    """What isolating a worker-killer needs of the cluster (``InferenceCluster`` has it)."""

    def tally_deaths(self, uris: list[str]) -> DeathTally: ...
    def isolation(self) -> AbstractAsyncContextManager[None]: ...
    async def wait_while_isolating(self, deadline_s: float) -> None: ...
    async def others_processing(self, uris: list[str]) -> int: ...
    def starts(self, uris: list[str]) -> AbstractContextManager[asyncio.Event]: ...
    def last_batch_start(self) -> float: ...
    @property
    def verdicts(self) -> Verdicts: ...


class Verdicts(Protocol):
    """Where isolations keep what they found for the next owner (``inference.client.verdicts``)."""

    async def read(self, uris: list[str]) -> list[Verdict]: ...
    async def begun(self, uris: list[str], known: list[Verdict]) -> None: ...
    async def decided(self, uris: list[str], verdict: Verdict) -> None: ...
    async def finished(self, uris: list[str]) -> None: ...


class NoVerdicts:
    """Nowhere to keep them: every isolation starts from its whole batch."""

    async def read(self, uris: list[str]) -> list[Verdict]:
        return [Verdict()] * len(uris)

    async def begun(self, uris: list[str], known: list[Verdict]) -> None:
        return None

    async def decided(self, uris: list[str], verdict: Verdict) -> None:
        return None

    async def finished(self, uris: list[str]) -> None:
        return None


class NoLedger:
    """No record of deaths (a cluster that keeps none): one WorkerLost of an image alone
    convicts it, as Dask's KilledWorker says it died on every worker that tried it."""

    def tally_deaths(self, uris: list[str]) -> DeathTally | None:  # type: ignore[override]
        return None

    @asynccontextmanager
    async def isolation(self) -> AsyncIterator[None]:
        yield

    async def wait_while_isolating(self, deadline_s: float) -> None:
        return None

    async def others_processing(self, uris: list[str]) -> int:
        return 0

    @contextmanager
    def starts(self, uris: list[str]) -> Iterator[asyncio.Event]:
        """No word of when a batch starts: its deadline counts from its submission."""
        started = asyncio.Event()
        started.set()
        yield started

    def last_batch_start(self) -> float:
        return 0.0

    @property
    def verdicts(self) -> Verdicts:
        return NoVerdicts()


MAX_CUT_SHORT = 3  # isolations of the same images begun and never finished, before they are given up
ALONE_POLL_S = 0.5  # how often an isolated attempt checks whether other batches still run
CANARY_URI = "memory://visionstream-probe/nothing-here.jpg"  # fetched by a probe; never exists
PROBE_KEY = "visionstream-probe/nothing-here.jpg"  # likewise, in an image's own bucket


def probe_uri(like: str) -> str:
    """What a probe fetches for an image at ``like``: an object that does not exist in the same
    store (its bucket answers at once, found or not: unless the store itself hangs), else an
    in-memory one. A probe of memory alone would pass while the store hung, and convict the
    image whose reads hung with it. Pure."""
    like = str(like)
    if like.startswith(S3_SCHEMES):
        bucket, _ = split_s3_uri(like)
        return f"{like.split('://', 1)[0]}://{bucket}/{PROBE_KEY}"
    return CANARY_URI


@dataclass
class PoisonIsolation:
    """Classifies a batch (``classify``), splitting it where it kills workers or times out."""

    attempts: BatchAttempts
    batch: BatchSettings
    counters: StreamMetrics
    cluster: Isolation
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)  # one isolation at a time
    _isolated: set[str] = field(default_factory=set, init=False, repr=False)  # images isolated here, their records not yet published

    async def classify(self, uris: list[str], priority: int) -> list[ImageResult | Failure]:
        """Classify; where the batch keeps killing workers, split it until the image that does is alone.

        Dask counts a worker's death against every task on it, so a batch beside the culprit
        dies with it. The split therefore runs alone: one suspect at a time under the
        cluster-wide isolation lease, each attempt only once no other batch of ours runs, and
        no new batch of this handler is submitted until it is over."""
        try:
            return list(await self.attempts.run(uris, priority))
        except BatchRetryExhausted as exc:
            if len(uris) < 2 or not isinstance(exc.__cause__, StoreWideFailure):
                raise
            # every object refused alike for all of batch.retry_timeout_s: deleted objects under a
            # GetObject-only policy answer 403 too. One by one, each gets its own record (a lone
            # object's failure is never store-wide), rather than the worker crash-looping on them.
            log.warning("every object of a batch of %d kept failing alike (%s); trying them one by one", len(uris), exc.__cause__)
            return [result for uri in uris for result in await self.attempts.run([uri], priority)]
        except (WorkerLost, BatchTimeout) as exc:
            self.counters.batch_retried()  # its images are tried again, in smaller batches
            log.warning("batch of %d failed (%s); trying its images again in isolation", len(uris), exc)
            async with self._lock, self.cluster.isolation():
                self.attempts.not_isolating.clear()
                try:
                    return await self._isolate(uris, priority)
                finally:
                    self.attempts.not_isolating.set()

    async def published(self, uris: list[str]) -> None:
        """The records of ``uris`` are published: what isolating them found (where this stream
        worker isolated them) is no longer needed. Nothing to do, and no call, for the rest."""
        isolated = [uri for uri in uris if identity(uri) in self._isolated]
        if not isolated:
            return
        self._isolated.difference_update(identity(uri) for uri in isolated)
        try:
            await self.cluster.verdicts.finished(isolated)
        except Exception as exc:  # noqa: BLE001 - a record left behind ages out (inference.client.verdicts)
            log.warning("could not clear the isolation record of %d images: %s", len(uris), exc)

    async def _isolate(self, uris: list[str], priority: int) -> list[ImageResult | Failure]:
        """Split the batch until the culprit is alone, resuming from what an isolation of the same
        images that was cut short (the stream worker stopped mid-way) found; give up on the
        images not cleared once ``MAX_CUT_SHORT`` such isolations began, rather than loop."""
        self._isolated.update(identity(uri) for uri in uris)
        known = await self._known(uris)
        cut_short = max((verdict.begun for verdict in known), default=0)
        results: list[ImageResult | Failure | None] = [
            Failure(verdict.stage or WORKER_STAGE, verdict.reason or "convicted by an earlier isolation") if verdict.outcome == CONVICTED else None
            for verdict in known
        ]
        cleared = [index for index, verdict in enumerate(known) if verdict.outcome == CLEARED]
        suspects = [index for index, verdict in enumerate(known) if verdict.outcome is None]
        if cut_short >= MAX_CUT_SHORT:
            log.error(
                "isolating a batch of %d images was cut short %d times (the stream worker stopped mid-way); "
                "dead-lettering the %d not cleared rather than starting again", len(uris), cut_short, len(suspects),
            )
            reason = (f"isolating its batch to find an image that kills or hangs workers was cut short {cut_short} times "
                      "(the stream worker stopped mid-way): given up rather than started again")
            for index in suspects:
                results[index] = Failure(WORKER_STAGE, reason)
            suspects = []
            self.counters.isolation_step()
        else:
            if cut_short:
                log.warning("resuming the isolation of a batch of %d images, cut short %d time(s): %d cleared and %d convicted before",
                            len(uris), cut_short, len(cleared), len(uris) - len(cleared) - len(suspects))
            await self._note(self.cluster.verdicts.begun(uris, known))
        if cleared:  # classified in isolation before: together, as one batch
            await self._into(results, cleared, self._alone([uris[index] for index in cleared], priority))
        if suspects:  # one alone may have died beside another batch; more are split
            picked = [uris[index] for index in suspects]
            await self._into(results, suspects, self._alone(picked, priority) if len(picked) == 1 else self._halves(picked, priority))
        return [result for result in results if result is not None]

    @staticmethod
    async def _into(results: list[ImageResult | Failure | None], indices: list[int], outcomes: Awaitable[list[ImageResult | Failure]]) -> None:
        for index, outcome in zip(indices, await outcomes, strict=True):
            results[index] = outcome

    async def _known(self, uris: list[str]) -> list[Verdict]:
        try:
            return await self.cluster.verdicts.read(uris)
        except Exception as exc:  # noqa: BLE001 - without the record, isolation starts from the whole batch
            log.warning("could not read the isolation record (%s); isolating from the whole batch", exc)
            return [Verdict()] * len(uris)

    async def _note(self, writing: Awaitable[None]) -> None:
        try:
            await writing
        except Exception as exc:  # noqa: BLE001 - a verdict not kept costs a restart its progress, nothing else
            log.warning("could not keep an isolation verdict on the scheduler: %s", exc)

    async def _halves(self, uris: list[str], priority: int, why: str = "killed its workers") -> list[ImageResult | Failure]:
        middle = len(uris) // 2
        log.warning("a batch of %d %s; splitting it to find the image", len(uris), why)
        return [*await self._alone(uris[:middle], priority), *await self._alone(uris[middle:], priority)]

    async def _alone(self, uris: list[str], priority: int) -> list[ImageResult | Failure]:
        """Classify with nothing else of ours on the cluster; split further if the workers die.

        One image is dead-lettered only once workers died with it alone on them twice (the
        scheduler's record); a death beside other work, or a single one, says nothing about
        it, and it is tried again, within ``batch.retry_timeout_s`` of isolation."""
        give_up = time.monotonic() + self.batch.retry_timeout_s
        timeouts: list[float] = []  # when each attempt of this one image began, that then timed out
        while True:
            await self._wait_until_alone(uris)
            began = time.monotonic()
            try:
                classified = list(await self.attempts.run(uris, priority, isolated=True))
                self.counters.isolation_step()
                await self._note(self.cluster.verdicts.decided(uris, Verdict(outcome=CLEARED)))
                return classified
            except BatchTimeout as exc:
                if len(uris) > 1:
                    return await self._halves(uris, priority, f"did not finish within {self.batch.timeout_s:g} s")
                timeouts.append(began)
                if len(timeouts) >= 2 and self.attempts.last_success > timeouts[-2]:
                    log.error("dead-lettering %r: it did not finish within batch.timeout_s alone, %d times, while other images were classified", uris[0], len(timeouts))
                    self.counters.isolation_step()
                    return await self._convicted(uris, Failure("decode", f"classifying this image alone did not finish within batch.timeout_s ({self.batch.timeout_s:g} s), {len(timeouts)} times, while other images were"))
                if time.monotonic() > give_up:
                    raise BatchRetryExhausted(1, self.batch.retry_timeout_s, str(exc)) from exc
                self.counters.batch_retried()
                log.warning("%r did not finish within batch.timeout_s alone; checking that the cluster answers, then trying it again", uris[0])
                await self._probe_cluster(priority, uris[0])
                await asyncio.sleep(self.batch.retry_backoff_s)
            except WorkerLost as exc:
                if len(uris) > 1:
                    return await self._halves(uris, priority)
                counted = self.cluster.tally_deaths(uris)
                if counted is None or convicted(uris, counted):
                    alone = "" if counted is None else f" ({counted.alone} time(s) alone on the worker)"
                    log.error("dead-lettering %r: the Dask workers classifying it died%s: %s", uris[0], alone, exc.reason)
                    self.counters.isolation_step()
                    return await self._convicted(uris, Failure(WORKER_STAGE, f"the Dask workers classifying this image died{alone}: {exc.reason}"))
                if time.monotonic() > give_up:
                    raise BatchRetryExhausted(1, self.batch.retry_timeout_s, f"workers kept dying beside other work with {uris[0]!r} on them") from exc
                log.warning("a worker died with %r on it (%d time(s) alone, %d beside other work): not enough to blame it; trying it alone again", uris[0], counted.alone, counted.beside)

    async def _convicted(self, uris: list[str], failure: Failure) -> list[ImageResult | Failure]:
        await self._note(self.cluster.verdicts.decided(uris, Verdict(outcome=CONVICTED, stage=failure.stage, reason=failure.message)))
        return [failure]

    async def _probe_cluster(self, priority: int, like: str) -> None:
        """One tiny batch (an object that does not exist in the image's own store, ``probe_uri``:
        its record comes back at once): if it completes within the deadline and its store
        answered, the cluster and the store work, and an image that keeps timing out alone is
        the image's fault. Its record is not published."""
        try:
            [record] = await asyncio.wait_for(self.attempts.classify([probe_uri(like)], priority), timeout=self.batch.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a cluster that does not answer convicts no image
            log.warning("the cluster did not answer a probe (%s: %s)", type(exc).__name__, exc)
            return
        if record.error is not None and SLOW_OBJECT in record.error.message:
            log.warning("the store did not answer a probe within images.fetch_timeout_s: it convicts no image")
            return
        self.attempts.last_success = time.monotonic()

    async def _wait_until_alone(self, uris: list[str]) -> None:
        """Until no other batch of ours runs on the cluster (at most ``batch.timeout_s``): those
        of other stream workers already submitted finish, and new ones wait for the lease."""
        give_up = time.monotonic() + self.batch.timeout_s
        while time.monotonic() < give_up:
            try:
                if not await self.cluster.others_processing(uris):
                    return
            except Exception as exc:  # noqa: BLE001 - the attempt itself reports a lost cluster
                log.debug("could not list the batches processing: %s", exc)
                return
            await asyncio.sleep(ALONE_POLL_S)

