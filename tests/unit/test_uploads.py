"""Uploads keep boto3 off the event loop: every S3 call runs in another thread (moto in-process)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import boto3
import pytest

from inference.settings import Settings
from streams.service.uploads import upload_paths

moto = pytest.importorskip("moto")


def test_uploads_call_s3_from_threads_never_on_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dogs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "dogs" / name).write_bytes(b"\xff\xd8 tiny")
    settings = Settings().with_overrides({"storage": {"bucket": "uploads", "region": "us-east-1"}})
    calls: list[tuple[str, bool]] = []

    def record(event_name: str, **_: object) -> None:
        calls.append((event_name.rsplit(".", 1)[-1], threading.current_thread() is threading.main_thread()))

    with moto.mock_aws():
        boto3.setup_default_session()
        boto3.DEFAULT_SESSION.events.register("before-call.s3", record)
        try:
            count = asyncio.run(upload_paths([str(tmp_path / "dogs")], "in/", settings, make_bucket=True))
        finally:
            boto3.DEFAULT_SESSION = None
        keys = sorted(o["Key"] for o in boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket="uploads")["Contents"])
    assert count == 2 and keys == ["in/dogs/a.jpg", "in/dogs/b.jpg"]
    assert {name for name, _ in calls} >= {"ListBuckets", "CreateBucket", "PutObject"}
    assert not [name for name, on_loop in calls if on_loop], calls
