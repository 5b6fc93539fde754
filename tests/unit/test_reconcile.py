"""Reconcile's pure parts: what a record of the topics accounts for, and what a listing leaves alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from inference.records.results import SLOW_OBJECT
from inference.settings import EventSettings, FilterSettings
from streams.service.events import dead_letter_event, encode, encode_dead_letter
from streams.service.reconcile import MAX_TRANSIENT, NEVER_ANNOUNCED, TRANSIENT, UNPROCESSED, Accounted, Outcomes, ReconcilePlan, account
from streams.service.s3events import ObjectRef, object_created_event

FILTER, LIMITS = FilterSettings(), EventSettings()


def accounted_for(records: list[tuple[bytes | None, bool]], pending: bool = True, retry_transient: bool = True) -> Outcomes:
    outcomes = Outcomes(retry_transient)
    for value, output in records:
        account(outcomes, value, output, FILTER, LIMITS, pending)
    return outcomes.freeze()


def covered(outcomes: Outcomes, uri: str, etag: str | None) -> bool:
    return outcomes.missing(uri, etag) is None


def test_predictions_dead_letters_and_announcements_on_their_way_account_for_their_versions():
    prediction = encode({"schema": "visionstream.prediction/v1", "uri": "s3://b/dogs/a.jpg", "etag": "e1"})
    dead = encode_dead_letter(dead_letter_event("fetch", "superseded", b"{}", uri="s3://b/dogs/b.jpg", etag="e2"))
    parse_failure = encode_dead_letter(dead_letter_event("parse", "not JSON", b"\x00"))
    announced = encode(object_created_event(ObjectRef("b", "dogs/c d.jpg", etag="e3")))
    no_etag = encode(object_created_event(ObjectRef("b", "dogs/e.jpg")))
    accounted = accounted_for([(prediction, True), (dead, True), (parse_failure, True), (announced, False), (no_etag, False)])
    assert len(accounted) == 3 and accounted.nbytes == 24
    assert covered(accounted, "s3://b/dogs/a.jpg", "e1") and covered(accounted, "s3://b/dogs/a.jpg", '"e1"')  # a listing quotes it
    assert accounted.missing("s3://b/dogs/a.jpg", "e9") == NEVER_ANNOUNCED  # overwritten since: the new version is not accounted for
    assert covered(accounted, "s3://b/dogs/b.jpg", "e2") and covered(accounted, "s3://b/dogs/c d.jpg", "e3")
    assert not covered(accounted, "s3://b/dogs/e.jpg", "anything")  # no ETag: which version it was is unknown, so none
    assert accounted.missing("s3://b/dogs/never.jpg", "e1") == NEVER_ANNOUNCED


def test_an_announcement_behind_the_committed_offset_with_no_result_is_announced_again():
    """The worker skipped it (its bucket was added to filter.buckets later) or an offset reset
    passed over it: its event is behind the group's committed offset and nothing else names it."""
    announced = encode(object_created_event(ObjectRef("b", "dogs/skipped.jpg", etag="e1")))
    behind = accounted_for([(announced, False)], pending=False)
    assert behind.missing("s3://b/dogs/skipped.jpg", "e1") == UNPROCESSED
    on_its_way = accounted_for([(announced, False)], pending=True)
    assert covered(on_its_way, "s3://b/dogs/skipped.jpg", "e1")
    prediction = encode({"schema": "visionstream.prediction/v1", "uri": "s3://b/dogs/skipped.jpg", "etag": "e1"})
    assert covered(accounted_for([(announced, False), (prediction, True)], pending=False), "s3://b/dogs/skipped.jpg", "e1")


def test_a_transient_dead_letter_is_announced_again_a_bounded_number_of_times():
    slow = encode_dead_letter(dead_letter_event("fetch", SLOW_OBJECT, b"{}", uri="s3://b/dogs/a.jpg", etag="e1"))
    late = encode_dead_letter(dead_letter_event(
        "decode", "a.jpg: not decoded within images.decode_timeout_s (10 s)", b"{}", uri="s3://b/dogs/a.jpg", etag="e1"))
    corrupt = encode_dead_letter(dead_letter_event("decode", "corrupt or truncated image", b"{}", uri="s3://b/dogs/c.jpg", etag="e1"))
    outcomes = accounted_for([(slow, True), (corrupt, True)])
    assert outcomes.missing("s3://b/dogs/a.jpg", "e1") == f"{TRANSIENT} (1)"
    assert covered(outcomes, "s3://b/dogs/c.jpg", "e1")  # not an image: final
    assert outcomes.missing("s3://b/dogs/a.jpg", "e1") is not None
    assert accounted_for([(slow, True), (late, True)]).missing("s3://b/dogs/a.jpg", "e1") == f"{TRANSIENT} (2)"
    worn = accounted_for([(slow, True)] * (MAX_TRANSIENT + 1))
    assert covered(worn, "s3://b/dogs/a.jpg", "e1")  # the last one is final: no loop
    assert covered(accounted_for([(slow, True)], retry_transient=False), "s3://b/dogs/a.jpg", "e1")


def test_a_notification_on_an_output_topic_or_a_record_on_an_input_topic_accounts_for_nothing():
    prediction = encode({"schema": "visionstream.prediction/v1", "uri": "s3://b/dogs/a.jpg", "etag": "e1"})
    announced = encode(object_created_event(ObjectRef("b", "dogs/c.jpg", etag="e3")))
    accounted = accounted_for([(prediction, False), (announced, True), (None, True), (None, False)])
    assert len(accounted) == 0 and len(accounted.announced) == 0


@given(st.binary(max_size=300), st.booleans())
def test_whatever_bytes_a_topic_holds_reading_them_never_raises(value, output):
    assert account(Outcomes(), value, output, FILTER, LIMITS) in (0, 1)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.one_of(st.none(), st.text(max_size=8))), max_size=50))
def test_every_version_added_is_covered(versions):
    accounted = Accounted()
    kept = [(uri, etag) for uri, etag in versions if accounted.add(uri, etag)]
    accounted.freeze()
    assert all(accounted.covers(uri, etag) for uri, etag in kept)
    assert all(not accounted.covers(uri, etag) for uri, etag in versions if (uri, etag) not in kept)


def test_objects_too_new_or_too_old_are_left_alone():
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    plan = ReconcilePlan("b", "", "backfill", min_age_s=60, modified_after=now - timedelta(days=3))
    assert plan.excludes({"LastModified": now - timedelta(seconds=10)}, now) == "too_new"
    assert plan.excludes({"LastModified": now - timedelta(days=4)}, now) == "out_of_range"
    assert plan.excludes({"LastModified": now - timedelta(hours=1)}, now) is None
    assert plan.excludes({}, now) is None  # a listing without a time: announced rather than lost
    assert json.dumps(ReconcilePlan.parse("s3://b/dogs/", "t").prefix) == '"dogs/"'
