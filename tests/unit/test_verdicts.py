"""What isolations found so far, kept on the scheduler for the next owner
(``inference.client.verdicts``): the record's rules on a dict that answers as the scheduler's
metadata does, and one round trip through a real Dask scheduler."""

import asyncio
import time
from typing import Any

from hypothesis import given, strategies as st

from inference.client import verdicts as verdicts_module
from inference.client.verdicts import CLEARED, CONVICTED, METADATA_KEY, Verdict, VerdictBook, digest
from inference.records.objects import PinnedUri


class Metadata:
    """The scheduler's ``set_metadata``/``get_metadata``: a nested dict, keys as lists."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    async def set_metadata(self, keys: list[str], value: Any) -> None:
        place = self.data
        for key in keys[:-1]:
            place = place.setdefault(key, {})
        place[keys[-1]] = value

    async def get_metadata(self, keys: list[str], default: Any = None) -> Any:
        place: Any = self.data
        for key in keys:
            if not isinstance(place, dict) or key not in place:
                return default
            place = place[key]
        return place


def test_a_verdict_book_counts_begun_isolations_keeps_verdicts_and_forgets_what_was_published():
    async def run() -> None:
        book = VerdictBook(Metadata())
        uris = ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg"]
        assert await book.read(uris) == [Verdict()] * 3
        await book.begun(uris, [Verdict()] * 3)
        await book.decided(uris[:1], Verdict(outcome=CLEARED))
        await book.decided(uris[2:], Verdict(outcome=CONVICTED, stage="worker", reason="the workers died"))
        known = await book.read(uris)
        assert known == [Verdict(1, CLEARED), Verdict(1), Verdict(1, CONVICTED, "worker", "the workers died")]
        await book.begun(uris, known)  # cut short, begun again by the next owner: verdicts kept
        assert [verdict.begun for verdict in await book.read(uris)] == [2, 2, 2]
        await book.finished(uris[:2])
        assert await book.read(uris) == [Verdict(), Verdict(), Verdict(2, CONVICTED, "worker", "the workers died")]

    asyncio.run(run())


def test_versions_of_one_key_are_apart_and_old_records_age_out(monkeypatch):
    async def run() -> None:
        metadata = Metadata()
        book = VerdictBook(metadata)
        first, second = PinnedUri("s3://b/a.jpg", version="1"), PinnedUri("s3://b/a.jpg", version="2")
        await book.decided([first], Verdict(outcome=CONVICTED, stage="worker", reason="x"))
        assert [verdict.outcome for verdict in await book.read([first, second])] == [CONVICTED, None]  # a new version is not convicted by the old
        later = time.time() + verdicts_module.KEPT_S + 60
        monkeypatch.setattr(verdicts_module.time, "time", lambda: later)
        await book.begun(["s3://b/other.jpg"], [Verdict()])
        await book.finished(["s3://b/other.jpg"])  # the write that trims
        assert metadata.data[METADATA_KEY] == {}

    asyncio.run(run())


def test_a_verdict_book_keeps_at_most_its_bound_newest_first(monkeypatch):
    monkeypatch.setattr(verdicts_module, "KEPT", 5)

    async def run() -> None:
        metadata = Metadata()
        book = VerdictBook(metadata)
        uris = [f"s3://b/{index}.jpg" for index in range(8)]
        for uri in uris:
            await book.begun([uri], [Verdict()])
        await book.finished(["s3://b/gone.jpg", uris[0]])
        assert len(metadata.data[METADATA_KEY]) == 5
        assert set(metadata.data[METADATA_KEY]) == {digest(uri) for uri in uris[3:]}

    asyncio.run(run())


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=10))
def test_whatever_the_scheduler_holds_under_a_digest_reads_as_a_verdict_or_none(record):
    verdict = Verdict.from_record(record)
    assert verdict.begun >= 0 and verdict.outcome in (None, CLEARED, CONVICTED)


def test_the_record_lives_on_a_real_scheduler():
    from distributed import Client, LocalCluster

    async def run() -> None:
        async with LocalCluster(n_workers=0, processes=False, asynchronous=True, dashboard_address=None) as cluster, \
                Client(cluster, asynchronous=True) as client:
            book = VerdictBook(client)
            await book.begun(["s3://b/a.jpg"], [Verdict()])
            await book.decided(["s3://b/a.jpg"], Verdict(outcome=CONVICTED, stage="worker", reason="died twice alone"))
            async with Client(cluster, asynchronous=True) as other:  # the next owner, another client
                assert await VerdictBook(other).read(["s3://b/a.jpg"]) == [Verdict(1, CONVICTED, "worker", "died twice alone")]
                await VerdictBook(other).finished(["s3://b/a.jpg"])
            assert await book.read(["s3://b/a.jpg"]) == [Verdict()]

    asyncio.run(run())
