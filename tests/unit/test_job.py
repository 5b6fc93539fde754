"""The classify job (``inference.client.job.classify_all``) against a recording cluster seam."""

import asyncio
import threading

import pytest

from inference.client.job import classify_all

from .test_processing import fake_result


class Cluster:
    """The seam: records the batches and how many were on it at once."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.on_it = 0
        self.most_on_it = 0

    async def classify(self, uris: list[str]) -> list:
        self.batches.append(uris)
        self.on_it += 1
        self.most_on_it = max(self.most_on_it, self.on_it)
        await asyncio.sleep(0.01)
        self.on_it -= 1
        return [fake_result(uri) for uri in uris]


def test_every_uri_once_in_batches_with_at_most_max_in_flight_on_the_cluster():
    cluster = Cluster()
    seen: list[str] = []
    uris = [f"Images/{i}.jpg" for i in range(130)]
    tally = asyncio.run(classify_all(cluster, iter(uris), 20, 3, lambda r: seen.append(r.uri)))
    assert sorted(seen) == sorted(uris) and tally.images == 130
    assert [len(b) for b in cluster.batches] == [20] * 6 + [10]
    assert cluster.most_on_it == 3


def test_sources_are_iterated_off_the_event_loop():
    """A bucket listing blocks; it must not run on the loop that drives the Dask client."""
    threads: set[threading.Thread] = set()

    def listing():
        for index in range(45):
            threads.add(threading.current_thread())
            yield f"s3://b/{index}.jpg"

    async def run() -> threading.Thread:
        await classify_all(Cluster(), listing(), 20, 2, lambda r: None)
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert threads and loop_thread not in threads


def test_a_failing_batch_stops_the_job_with_its_own_error():
    from inference.errors import ClusterUnavailable

    class Failing(Cluster):
        async def classify(self, uris: list[str]) -> list:
            if uris[0].endswith("/40.jpg"):
                raise ClusterUnavailable("tcp://127.0.0.1:1", "scheduler gone")
            return await super().classify(uris)

    cluster = Failing()
    with pytest.raises(ClusterUnavailable, match="scheduler gone"):
        asyncio.run(classify_all(cluster, (f"s3://b/{i}.jpg" for i in range(1000)), 20, 2, lambda r: None))
    assert len(cluster.batches) < 10  # the job stopped: no batch was taken after the failure was seen
