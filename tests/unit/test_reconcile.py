"""Reconcile's pure parts: what a record of the topics accounts for, and what a listing leaves alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from inference.settings import EventSettings, FilterSettings
from streams.service.events import dead_letter_event, encode, encode_dead_letter
from streams.service.reconcile import Accounted, ReconcilePlan, account
from streams.service.s3events import ObjectRef, object_created_event

FILTER, LIMITS = FilterSettings(), EventSettings()


def accounted_for(records: list[tuple[bytes | None, bool]]) -> Accounted:
    accounted = Accounted()
    for value, output in records:
        account(accounted, value, output, FILTER, LIMITS)
    return accounted.freeze()


def test_predictions_dead_letters_and_announcements_account_for_their_versions():
    prediction = encode({"schema": "visionstream.prediction/v1", "uri": "s3://b/dogs/a.jpg", "etag": "e1"})
    dead = encode_dead_letter(dead_letter_event("fetch", "superseded", b"{}", uri="s3://b/dogs/b.jpg", etag="e2"))
    parse_failure = encode_dead_letter(dead_letter_event("parse", "not JSON", b"\x00"))
    announced = encode(object_created_event(ObjectRef("b", "dogs/c d.jpg", etag="e3")))
    no_etag = encode(object_created_event(ObjectRef("b", "dogs/e.jpg")))
    accounted = accounted_for([(prediction, True), (dead, True), (parse_failure, True), (announced, False), (no_etag, False)])
    assert len(accounted) == 3 and accounted.nbytes == 24
    assert accounted.covers("s3://b/dogs/a.jpg", "e1") and accounted.covers("s3://b/dogs/a.jpg", '"e1"')  # a listing quotes it
    assert not accounted.covers("s3://b/dogs/a.jpg", "e9")  # overwritten since: the new version is not accounted for
    assert accounted.covers("s3://b/dogs/b.jpg", "e2") and accounted.covers("s3://b/dogs/c d.jpg", "e3")
    assert not accounted.covers("s3://b/dogs/e.jpg", "anything")  # no ETag: which version it was is unknown, so none
    assert not accounted.covers("s3://b/dogs/never.jpg", "e1")


def test_a_notification_on_an_output_topic_or_a_record_on_an_input_topic_accounts_for_nothing():
    prediction = encode({"schema": "visionstream.prediction/v1", "uri": "s3://b/dogs/a.jpg", "etag": "e1"})
    announced = encode(object_created_event(ObjectRef("b", "dogs/c.jpg", etag="e3")))
    accounted = accounted_for([(prediction, False), (announced, True), (None, True), (None, False)])
    assert len(accounted) == 0


@given(st.binary(max_size=300), st.booleans())
def test_whatever_bytes_a_topic_holds_reading_them_never_raises(value, output):
    accounted = Accounted()
    assert account(accounted, value, output, FILTER, LIMITS) in (0, 1)


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
