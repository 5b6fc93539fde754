"""The classify job: sources -> batches on the cluster (bounded in flight) -> records, in order of completion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from inference.client.cluster import InferenceCluster
from inference.records.evaluation import accuracy
from inference.records.report import plural
from inference.records.results import ImageResult


@dataclass(slots=True)
class Tally:
    """Running counts for a summary line: images, errors, accuracy where truth is known."""

    images: int = 0
    errors: int = 0
    with_truth: int = 0
    matches: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def add(self, result: ImageResult) -> None:
        self.images += 1
        if result.error is not None:
            self.errors += 1
        elif result.match is not None:
            self.with_truth += 1
            self.matches += int(result.match)

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def accuracy(self) -> float | None:
        return accuracy(self.matches, self.with_truth)

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        accuracy = f"{self.accuracy:.2%} top-1 ({self.matches}/{self.with_truth} with truth)" if self.accuracy is not None else "no ground truth"
        return (
            f"{plural(self.images, 'image')}, {plural(self.errors, 'error')}, {accuracy}, "
            f"{self.elapsed_s:.1f} s, {self.images_per_s:.1f} images/s"
        )


def batches_in_flight(configured: int, task_threads: int) -> int:
    """``batch.max_in_flight``, or by default one batch per task thread of the cluster and one
    more, so that no thread waits for its next batch (at least 2). Pure."""
    return configured or max(2, task_threads + 1)


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


async def classify_all(
    cluster: InferenceCluster,
    uris: Iterable[str],
    batch_size: int,
    max_in_flight: int,
    on_result: Callable[[ImageResult], None],
) -> Tally:
    """Classify every URI; at most ``max_in_flight`` batches are on the cluster at once, records
    are handed to ``on_result`` as their batch completes. A batch that raises (the cluster gone,
    retries spent) cancels the others and the error comes out of here."""
    tally = Tally()
    slots = asyncio.Semaphore(max(1, max_in_flight))

    async def classify(batch: list[str]) -> None:
        try:
            for result in await cluster.classify(batch):
                tally.add(result)
                on_result(result)
        finally:
            slots.release()

    batches = batched(uris, batch_size)
    try:
        async with asyncio.TaskGroup() as group:
            # listing a bucket or walking a folder blocks: the next batch is taken in a thread, so
            # the loop that drives the Dask client keeps serving the batches in flight meanwhile
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                await slots.acquire()
                group.create_task(classify(batch))
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0]  # one batch's own error (its cause kept), as the caller knows them
    tally.finished = time.perf_counter()
    return tally
