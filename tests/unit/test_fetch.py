import fsspec
import pytest

from inference.errors import FetchError
from inference.fetch import fetch_many
from inference.settings import ImageSettings, StorageSettings


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
    ],
)
def test_object_errors_are_records_and_service_errors_are_retried(code, status, permanent):
    from botocore.stub import Stubber

    from inference.errors import StorageUnavailable
    from inference.fetch import s3_client

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

    from inference.fetch import s3_client

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
