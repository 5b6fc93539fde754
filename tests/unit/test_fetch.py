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


def test_objects_above_the_size_limit_are_refused_without_reading_them_whole(memory_files):
    results = fetch_many(["memory://fetchtest/big.jpg", "memory://fetchtest/a.jpg"], StorageSettings(), ImageSettings(max_bytes=1000))
    assert isinstance(results[0], FetchError) and "larger than the limit of 1000 bytes" in results[0].reason
    assert results[1] == b"aaa"


def test_unsupported_protocol_is_an_error_record():
    [result] = fetch_many(["nosuchproto://x/y.jpg"], StorageSettings(), ImageSettings())
    assert isinstance(result, FetchError) and "unsupported location" in result.reason
