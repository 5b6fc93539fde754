"""Put local images into the bucket and, optionally, publish the S3 events a bucket would (adapter)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inference.errors import SourceError
from streams.errors import UploadFailed
from inference.settings import Settings, StorageSettings
from streams.service.events import encode, now_iso
from streams.service.kafka import ensure_topics, start_producer
from streams.service.s3events import ObjectRef, object_created_event

log = logging.getLogger(__name__)


def local_files(paths: list[str], prefix: str) -> Iterator[tuple[Path, str]]:
    """(file, key): a folder keeps its own name under ``prefix``; hidden files are left out."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            yield path, prefix + path.name
        elif path.is_dir():
            base = path.resolve().parent
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        file = Path(root) / name
                        yield file, prefix + file.resolve().relative_to(base).as_posix()
        else:
            raise SourceError(f"{raw}: no such file or folder")


def s3_client(storage: StorageSettings):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", **storage.boto3_kwargs())


def create_bucket(storage: StorageSettings, bucket: str) -> None:
    client = s3_client(storage)
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - botocore's errors, as one of ours
        raise _upload_failed(exc, storage, bucket, "creating the bucket") from exc


def _upload_failed(exc: Exception, storage: StorageSettings, bucket: str, doing: str) -> UploadFailed:
    """What went wrong talking to the store, in one line that says what to change."""
    import botocore.exceptions

    where = storage.endpoint_url or "S3"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return UploadFailed(f"bucket {bucket!r} does not exist at {where} (create it, or pass --create-bucket)")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return UploadFailed(f"{doing} in {bucket!r} at {where} was refused ({code}): check the storage credentials and their policy")
        return UploadFailed(f"{doing} in {bucket!r} at {where} failed: {code or exc}")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        return UploadFailed(f"cannot reach the object store at {where} (storage.endpoint_url)")
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return UploadFailed(f"no storage credentials for {where}: set storage.access_key_id and storage.secret_access_key, or AWS_*")
    return UploadFailed(f"{doing} in {bucket!r} at {where} failed: {type(exc).__name__}: {exc}")


async def upload_paths(
    paths: list[str], prefix: str, settings: Settings, notify: bool = False, make_bucket: bool = False
) -> int:
    """Upload the files under ``paths`` to ``prefix``, eight at a time, and publish each one's
    ObjectCreated event once it is stored (``notify``). boto3 and the file system block, so
    they run in threads, never on the event loop."""
    storage, bucket = settings.storage, settings.storage.bucket
    if make_bucket:
        await asyncio.to_thread(create_bucket, storage, bucket)
    files = await asyncio.to_thread(lambda: list(local_files(paths, prefix)))
    client = await asyncio.to_thread(s3_client, storage)

    def put(item: tuple[Path, str]) -> ObjectRef:
        file, key = item
        body = file.read_bytes()
        try:
            response = client.put_object(Bucket=bucket, Key=key, Body=body)
        except Exception as exc:  # noqa: BLE001 - botocore's errors, as one of ours
            raise _upload_failed(exc, storage, bucket, f"putting {key!r}") from exc
        return ObjectRef(bucket, key, etag=response.get("ETag", "").strip('"') or None,
                         version=response.get("VersionId"), size_bytes=len(body), event_time=now_iso())

    producer = None
    if notify:
        await ensure_topics(settings.kafka, settings.topics, [settings.topics.uploads])
        producer = await start_producer(settings.kafka)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(8, thread_name_prefix="upload")
    try:
        refs = [loop.run_in_executor(pool, put, item) for item in files]
        sends = []
        try:
            for pending in refs:
                ref = await pending
                if producer is not None:
                    sends.append(await producer.send(settings.topics.uploads, encode(object_created_event(ref)), key=ref.uri.encode()))
            await asyncio.gather(*sends)
        except BaseException:
            for pending in refs:
                pending.cancel()
            await asyncio.gather(*refs, *sends, return_exceptions=True)  # the first failure is the one to tell
            raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # waiting here would block the loop
        if producer is not None:
            await producer.stop()
    return len(files)
