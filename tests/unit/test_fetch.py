import io
import time

import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.errors import FetchError
from inference.worker.fetch import SUPERSEDED, fetch_many
from inference.settings import ImageSettings, StorageSettings


def test_a_batch_whose_every_object_is_superseded_is_the_stores_problem():
    """Events that name other ETags than their objects carry, every one of them (some MinIO
    releases, for encrypted objects): retried as the store's failure, not 60 dead letters."""
    from inference.worker.fetch import _store_wide_failure

    uris = [f"s3://b/{i}.jpg" for i in range(3)]
    assert _store_wide_failure(uris, [FetchError(uri, SUPERSEDED) for uri in uris]) == SUPERSEDED
    assert _store_wide_failure(uris, [FetchError(uris[0], SUPERSEDED), b"ok", b"ok"]) is None  # one overwritten object: its own


@pytest.fixture
def memory_files():
    fs = fsspec.filesystem("memory")
    fs.pipe("/fetchtest/a.jpg", b"aaa")
    fs.pipe("/fetchtest/big.jpg", b"x" * 2000)
    yield
    fs.rm("/fetchtest", recursive=True)


def test_fetch_keeps_order_and_reports_each_failure(memory_files, tmp_path):
    local = tmp_path / "l.jpg"
    local.write_bytes(b"local")
    uris = ["memory://fetchtest/a.jpg", str(local), "memory://fetchtest/missing.jpg", f"file://{local}", str(tmp_path)]
    results = fetch_many(uris, StorageSettings(), ImageSettings())
    assert results[0] == b"aaa" and results[1] == b"local" and results[3] == b"local"
    assert isinstance(results[2], FetchError) and results[2].reason == "object not found" and results[2].stage == "fetch"
    assert isinstance(results[4], FetchError)


def test_objects_above_the_size_limit_are_refused_without_reading_them_whole(memory_files, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 2000)
    uris = ["memory://fetchtest/big.jpg", "memory://fetchtest/a.jpg", str(big), f"file://{big}"]
    results = fetch_many(uris, StorageSettings(), ImageSettings(max_bytes=1000))
    for index in (0, 2, 3):
        assert isinstance(results[index], FetchError) and "larger than the limit of 1000 bytes" in results[index].reason
    assert results[1] == b"aaa"


def test_unsupported_protocol_is_an_error_record():
    [result] = fetch_many(["nosuchproto://x/y.jpg"], StorageSettings(), ImageSettings())
    assert isinstance(result, FetchError) and "unsupported location" in result.reason


@pytest.mark.parametrize(
    ("code", "status", "permanent"),
    [
        ("NoSuchKey", 404, "object not found"),
        ("AccessDenied", 403, "access denied"),
        ("InvalidRange", 416, "empty object"),
        ("ExpiredToken", 400, None),  # the credentials, not the object: every image would fail
        ("InvalidAccessKeyId", 403, None),
        ("SignatureDoesNotMatch", 403, None),
        ("RequestTimeTooSkewed", 403, None),
        ("SlowDown", 503, None),
        ("InternalError", 500, None),
        ("RequestTimeout", 400, None),  # a 400 that botocore itself retries: the network, not the object
    ],
)
def test_object_errors_are_records_and_service_errors_are_retried(code, status, permanent):
    from botocore.stub import Stubber

    from inference.errors import StorageUnavailable
    from inference.worker.fetch import s3_client

    storage = StorageSettings(endpoint_url="http://127.0.0.1:9", region="us-east-1", access_key_id="k", secret_access_key="s")
    client = s3_client(storage)
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        if permanent is None:
            with pytest.raises(StorageUnavailable):
                fetch_many(["s3://bucket/key.jpg"], storage, ImageSettings())
        else:
            [result] = fetch_many(["s3://bucket/key.jpg"], storage, ImageSettings())
            assert isinstance(result, FetchError) and result.reason == permanent


def test_an_s3_key_is_fetched_verbatim_never_globbed():
    from botocore.stub import Stubber

    from inference.worker.fetch import s3_client

    storage = StorageSettings(endpoint_url="http://127.0.0.1:9", region="us-east-1", access_key_id="k", secret_access_key="s")
    client = s3_client(storage)
    with Stubber(client) as stub:
        for key in ("Images/**/*.jpg", "private/doc::x.jpg", "a?versionId=1.jpg", "[x].jpg"):
            stub.add_client_error("get_object", "NoSuchKey", http_status_code=404,
                                  expected_params={"Bucket": "bucket", "Key": key, "Range": "bytes=0-1000"})
        results = fetch_many([f"s3://bucket/{k}" for k in ("Images/**/*.jpg", "private/doc::x.jpg", "a?versionId=1.jpg", "[x].jpg")],
                             storage, ImageSettings(max_bytes=1000, fetch_concurrency=1))
        stub.assert_no_pending_responses()
    assert all(isinstance(r, FetchError) and r.reason == "object not found" for r in results)


def stubbed_storage() -> StorageSettings:
    return StorageSettings(endpoint_url="http://127.0.0.1:9", region="us-east-1", access_key_id="k", secret_access_key="s")


@pytest.mark.parametrize(("code", "status"), [("AccessDenied", 403), ("PermanentRedirect", 301)])
def test_a_batch_whose_every_object_fails_alike_is_a_store_failure_not_dead_letters(code, status):
    """A missing KMS permission or a wrong region denies every object: retried, and shown as
    the store's fault, never 60 dead letters. One denied object among readable ones is its own."""
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from inference.errors import StorageUnavailable
    from inference.worker.fetch import s3_client

    storage = stubbed_storage()
    with Stubber(s3_client(storage)) as stub:
        for _ in range(3):
            stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        with pytest.raises(StorageUnavailable, match="every object of a batch of 3"):
            fetch_many([f"s3://bucket/{i}.jpg" for i in range(3)], storage, ImageSettings(fetch_concurrency=1))
    with Stubber(s3_client(storage)) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"abc"), 3)})
        results = fetch_many(["s3://bucket/denied.jpg", "s3://bucket/fine.jpg"], storage, ImageSettings(fetch_concurrency=1))
    assert isinstance(results[0], FetchError) and results[1] == b"abc"


class SlowBody:
    """A response body that sends a byte at a time, slowly."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s

    def read(self, size: int = -1) -> bytes:
        time.sleep(self.pause_s)
        return b"x"

    def __enter__(self) -> "SlowBody":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def test_one_slow_object_is_its_own_dead_letter_and_a_slow_store_is_retried():
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from inference.errors import StorageUnavailable
    from inference.worker.fetch import SLOW_OBJECT, s3_client

    storage = stubbed_storage()
    images = ImageSettings(fetch_concurrency=1, fetch_timeout_s=0.2)
    with Stubber(s3_client(storage)) as stub:
        stub.add_response("get_object", {"Body": SlowBody(0.05)})
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"abc"), 3)})
        results = fetch_many(["s3://bucket/slow.jpg", "s3://bucket/fine.jpg"], storage, images)
    assert isinstance(results[0], FetchError) and results[0].reason == SLOW_OBJECT and results[1] == b"abc"
    with Stubber(s3_client(storage)) as stub:
        for _ in range(2):
            stub.add_response("get_object", {"Body": SlowBody(0.05)})
        with pytest.raises(StorageUnavailable, match="took longer"):
            fetch_many(["s3://bucket/a.jpg", "s3://bucket/b.jpg"], storage, images)


@given(st.lists(st.sampled_from(["access denied", "object not found", "bucket in another region or endpoint", SUPERSEDED, None]), min_size=1, max_size=8))
def test_only_a_shared_store_wide_reason_makes_a_store_failure(reasons):
    from inference.worker.fetch import STORE_WIDE_REASONS, _store_wide_failure

    uris = [f"s3://b/{i}.jpg" for i in range(len(reasons))]
    results = [b"ok" if reason is None else FetchError(uri, reason) for uri, reason in zip(uris, reasons)]
    found = _store_wide_failure(uris, results)
    alike = len(reasons) >= 2 and len(set(reasons)) == 1 and reasons[0] in STORE_WIDE_REASONS
    assert found == (reasons[0] if alike else None)
    assert _store_wide_failure([f"/local/{i}.jpg" for i in range(len(reasons))], results) is None  # local files: each its own


@pytest.fixture
def s3_store():
    """moto's S3 in this process; fetch's cached clients are made inside it."""
    moto = pytest.importorskip("moto")
    import boto3

    from inference.worker.fetch import s3_client

    s3_client.cache_clear()
    with moto.mock_aws():
        yield boto3.client("s3", region_name="us-east-1"), StorageSettings(region="us-east-1", access_key_id="k", secret_access_key="s")
    s3_client.cache_clear()


def two_uploads(client, bucket: str, versioned: bool) -> tuple[dict, dict]:
    client.create_bucket(Bucket=bucket)
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return client.put_object(Bucket=bucket, Key="dogs/a.jpg", Body=b"first"), client.put_object(Bucket=bucket, Key="dogs/a.jpg", Body=b"second")


def test_an_overwritten_object_is_superseded_never_read_under_the_first_event(s3_store):
    from inference.worker.fetch import SUPERSEDED
    from inference.records.objects import PinnedUri

    client, storage = s3_store
    first, second = two_uploads(client, "plain-bucket", versioned=False)
    uri = "s3://plain-bucket/dogs/a.jpg"
    old, new = PinnedUri(uri, etag=first["ETag"]), PinnedUri(uri, None, second["ETag"].strip('"'))  # listings quote it, events do not
    results = fetch_many([old, new, uri], storage, ImageSettings(fetch_concurrency=1))
    assert isinstance(results[0], FetchError) and results[0].reason == SUPERSEDED and results[0].stage == "fetch"
    assert results[1:] == [b"second", b"second"]  # the current object's own event, and an unpinned URI
    assert fetch_many([old], storage.model_copy(update={"pin_versions": False}), ImageSettings()) == [b"second"]


def test_each_version_of_a_versioned_object_is_read_as_its_event_names_it(s3_store):
    from inference.records.objects import PinnedUri

    client, storage = s3_store
    first, second = two_uploads(client, "versioned-bucket", versioned=True)
    uri = "s3://versioned-bucket/dogs/a.jpg"
    pinned = [PinnedUri(uri, first["VersionId"], first["ETag"]), PinnedUri(uri, second["VersionId"], second["ETag"])]
    assert fetch_many(pinned, storage, ImageSettings(fetch_concurrency=1)) == [b"first", b"second"]
    client.delete_object(Bucket="versioned-bucket", Key="dogs/a.jpg", VersionId=first["VersionId"])
    [gone] = fetch_many(pinned[:1], storage, ImageSettings())
    assert isinstance(gone, FetchError) and gone.reason.startswith("version not found")


def test_a_store_that_denies_reads_by_version_id_is_read_pinned_by_etag():
    """AWS wants s3:GetObjectVersion for a read by version id; a policy with s3:GetObject alone
    must not turn every upload of a versioned bucket into an access-denied dead letter."""
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from inference.worker.fetch import _VERSION_READS_DENIED, s3_client
    from inference.records.objects import PinnedUri

    storage = stubbed_storage().model_copy(update={"region": "eu-west-1"})  # a store of its own: the flag is per store
    uri = PinnedUri("s3://bucket/dogs/a.jpg", "v1", "e1")
    by_version = {"Bucket": "bucket", "Key": "dogs/a.jpg", "Range": "bytes=0-1000", "VersionId": "v1"}
    by_etag = {"Bucket": "bucket", "Key": "dogs/a.jpg", "Range": "bytes=0-1000", "IfMatch": '"e1"'}
    try:
        with Stubber(s3_client(storage)) as stub:
            stub.add_client_error("get_object", "AccessDenied", http_status_code=403, expected_params=by_version)
            stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"abc"), 3)}, expected_params=by_etag)
            stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"def"), 3)}, expected_params=by_etag)  # no second try by version
            images = ImageSettings(max_bytes=1000, fetch_concurrency=1)
            assert fetch_many([uri], storage, images) == [b"abc"]
            assert fetch_many([uri], storage, images) == [b"def"]
            stub.assert_no_pending_responses()
        with Stubber(s3_client(storage.model_copy(update={"region": "eu-west-2"}))) as stub:  # denied both ways: the object's own record
            stub.add_client_error("get_object", "AccessDenied", http_status_code=403, expected_params={**by_version})
            stub.add_client_error("get_object", "AccessDenied", http_status_code=403, expected_params=by_etag)
            [denied] = fetch_many([uri], storage.model_copy(update={"region": "eu-west-2"}), ImageSettings(max_bytes=1000))
            assert isinstance(denied, FetchError) and denied.reason == "access denied"
    finally:
        _VERSION_READS_DENIED.clear()
