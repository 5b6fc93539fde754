"""The death ledger read from the scheduler's events: content-addressed keys, alone or beside."""

from hypothesis import given
from hypothesis import strategies as st

from inference.client.deaths import (
    POISON_DEATHS,
    batch_digest,
    batch_key,
    convicted,
    deaths_from_events,
    key_digest,
    tally,
)


def removal(*keys: str, expected: bool = False, worker: str = "tcp://127.0.0.1:1") -> dict:
    """What distributed's scheduler logs on topic "all" when it removes a worker."""
    return {"action": "remove-worker", "processing-tasks": set(keys), "lost-computed-tasks": set(), "lost-scattered-tasks": set(),
            "stimulus_id": "handle-worker-cleanup-1", "expected": expected, "worker": worker}


@given(st.lists(st.text(min_size=1), min_size=1, max_size=10, unique=True))
def test_a_key_names_its_images_in_any_order_and_every_attempt_is_a_new_key(uris):
    first, second = batch_key(uris), batch_key(list(reversed(uris)))
    assert first != second and key_digest(first) == key_digest(second) == batch_digest(uris)
    assert key_digest("classify_batch-abc") is None and key_digest(("tuple", 1)) is None


def test_deaths_count_against_the_images_alone_or_beside_other_work():
    poison, other = ["s3://b/poison.jpg"], ["s3://b/a.jpg", "s3://b/b.jpg"]
    events = [
        (1.0, removal(batch_key(poison))),  # alone
        (2.0, removal(batch_key(poison), batch_key(other))),  # beside another batch
        (3.0, removal(batch_key(poison), expected=True)),  # a graceful retirement: not a death
        (4.0, removal("some-other-task")),  # not ours
        (5.0, {"action": "add-worker", "worker": "tcp://127.0.0.1:2"}),
        (6.0, "not a mapping"),
        (7.0, removal(batch_key(poison), "some-other-task")),  # beside a task that is not ours
    ]
    deaths = deaths_from_events(events)
    assert [d.at for d in deaths] == [1.0, 2.0, 7.0]
    counted = tally(deaths, poison)
    assert (counted.alone, counted.beside) == (1, 2)
    assert not convicted(poison, counted)
    assert tally(deaths, other).alone == 0 and tally(deaths, other).beside == 1
    deaths += deaths_from_events([(8.0, removal(batch_key(poison)))])
    assert convicted(poison, tally(deaths, poison)) and POISON_DEATHS == 2
    assert not convicted(other, tally(deaths_from_events([(9.0, removal(batch_key(other)))] * 3), other))  # a batch is split, never convicted


def test_two_versions_of_one_key_are_different_images_to_the_death_record():
    from inference.records.objects import PinnedUri

    uri = "s3://b/dogs/a.jpg"
    assert batch_digest([PinnedUri(uri, "v1")]) != batch_digest([PinnedUri(uri, "v2")])
    assert batch_digest([PinnedUri(uri, "v1"), "s3://b/x.jpg"]) == batch_digest(["s3://b/x.jpg", PinnedUri(uri, "v1")])
    assert batch_digest([PinnedUri(uri)]) == batch_digest([uri])
