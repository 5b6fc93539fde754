"""PinnedUri: the URI wherever URIs go, and its pin survives the trip to a Dask worker as plain lists."""

import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.records.objects import PinnedUri, identity, pinned, pins

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
maybe = st.one_of(st.none(), text)


@given(st.lists(st.tuples(text, maybe, maybe, st.booleans()), max_size=8))
def test_pins_cross_as_json_and_come_back_the_same(items):
    uris = [PinnedUri(uri, version, etag) if pin else uri for uri, version, etag, pin in items]
    plain = [str(uri) for uri in uris]
    wire = json.loads(json.dumps(pins(uris)))  # what the task carries: strings, None and lists only
    back = pinned(plain, wire)
    assert back == uris and [identity(uri) for uri in back] == [identity(uri) for uri in uris]
    assert all(type(uri) is str for uri in plain)


@given(text, maybe, maybe)
def test_the_pin_never_changes_what_the_uri_is(uri, version, etag):
    pinned_uri = PinnedUri(uri, version, etag)
    assert pinned_uri == uri and hash(pinned_uri) == hash(uri) and f"{pinned_uri}" == uri
    assert pickle.loads(pickle.dumps(pinned_uri)).etag == pinned_uri.etag  # Dask copies values in-process


def test_unversioned_markers_and_quotes_are_normalised():
    assert PinnedUri("s3://b/k", "null", '"abc"').version is None
    assert PinnedUri("s3://b/k", "", '"abc"').etag == "abc"
    assert pins(["s3://b/k", PinnedUri("s3://b/x")]) is None  # nothing to pin: the task gets no pins


def test_pins_of_another_length_are_refused():
    with pytest.raises(ValueError, match="2 pins for 1 URIs"):
        pinned(["s3://b/k"], [None, ["v", None]])


def test_an_etag_no_conditional_read_could_name_pins_nothing():
    assert PinnedUri("s3://b/k", None, 'W/"abc"').etag == "abc"
    assert PinnedUri("s3://b/k", None, 'a"b').etag is None and PinnedUri("s3://b/k", None, '""').etag is None
