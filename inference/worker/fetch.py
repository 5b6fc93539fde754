"""Fetch many objects concurrently (adapter): s3:// by bucket and key, local files, other fsspec URLs.

An ``s3://bucket/key`` URI is split once, at the first ``/`` after the bucket, and read with
one ranged GetObject: no glob (``*``, ``?``, ``[``), no ``::`` chaining, no ``?versionId=``;
a key is only ever the key. A ``PinnedUri`` (``inference.records.objects``) is read at the version its
event announced: ``VersionId``, else ``If-Match`` on the ETag; an object overwritten since is
``SUPERSEDED``, that image's record, never another object's bytes under its event. Local paths (and ``file://``) are read with a plain ``open``;
other protocols (``memory://``, ``gs://``) one file at a time with fsspec's ``cat_file``,
which never expands patterns either.
Patterns are expanded only where a user asks for them: ``classify``'s command line
(``inference.client.sources``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import fsspec

from inference.errors import FetchError, ObjectTooSlow, StorageUnavailable, StoreWideFailure
from inference.records.objects import S3_SCHEMES, PinnedUri, split_s3_uri
from inference.records.results import SLOW_OBJECT, STORE_WIDE_REASONS, SUPERSEDED
from inference.settings import ImageSettings, StorageSettings

# S3 error codes that are about the object, not the service: the image's own failure.
PERMANENT_S3_ERRORS = {
    "NoSuchKey": "object not found",
    "404": "object not found",
    "NoSuchBucket": "bucket not found",
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidObjectState": "object archived (restore it first)",
    "InvalidRange": "empty object",
    "416": "empty object",
    "NoSuchVersion": "version not found (deleted since its event)",
    "InvalidBucketName": "invalid bucket name",
    "KeyTooLongError": "key too long",
    "PermanentRedirect": "bucket in another region or endpoint",
    "301": "bucket in another region or endpoint",
}
# Codes that name the caller's credentials, clock or configuration, not the object: every
# object would fail the same way, so the batch is retried (and the worker stops loudly).
# Transient ones too, whatever their status: RequestTimeout is a 400 that botocore itself retries.
SERVICE_S3_ERRORS = {
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "RequestTimeTooSkewed", "AuthorizationHeaderMalformed", "InvalidSecurity",
    "MissingSecurityHeader", "AccountProblem", "AllAccessDisabled",
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
}
CHUNK_BYTES = 1 << 20
_client_lock = threading.Lock()
log = logging.getLogger(__name__)


def fetch_many(uris: list[str], storage: StorageSettings, images: ImageSettings) -> list[bytes | FetchError]:
    """Read every object, in order; per-object failures come back as FetchError values.

    At most ``images.max_bytes`` + 1 bytes are read of each, so a huge object is refused
    without being pulled whole. Raises StorageUnavailable when the store itself fails
    (connection refused, throttled, 5xx after botocore's retries): that is the batch's
    transient failure, retried by the caller, never an image's dead letter.
    """
    if not uris:
        return []
    pool = _fetch_pool(images.fetch_concurrency)
    results = list(pool.map(lambda uri: _fetch_one(uri, storage, images.max_bytes, images.fetch_timeout_s), uris))
    store_wide = _store_wide_failure(uris, results)
    if store_wide is not None:
        raise StoreWideFailure(storage.endpoint_url or "s3", f"every object of a batch of {len(uris)} failed the same way: {store_wide}")
    return results


def _store_wide_failure(uris: list[str], results: list[bytes | FetchError]) -> str | None:
    """The reason shared by every object of a batch of two or more S3 objects, where it says
    something about the store rather than the objects (``STORE_WIDE_REASONS``). Pure."""
    if len(results) < 2 or not all(uri.startswith(S3_SCHEMES) for uri in uris):
        return None
    reasons = {result.reason if isinstance(result, FetchError) else None for result in results}
    if len(reasons) == 1 and (reason := reasons.pop()) in STORE_WIDE_REASONS:
        return reason
    return None


@cache
def _fetch_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process and concurrency, kept: a pool started per batch costs its threads'
    start-up every batch. The task threads of a worker share it, so ``fetch_concurrency`` bounds
    what one worker asks of the store at once: a pool per task thread doubled the requests and,
    against the embedded S3 server on 2 cores, slowed a 150-image test's batches by half. The
    price: a batch's fetches can queue behind another's slow objects (each bounded by
    ``images.fetch_timeout_s``)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="visionstream-fetch")


def _fetch_one(uri: str, storage: StorageSettings, max_bytes: int, timeout_s: float) -> bytes | FetchError:
    if uri.startswith(S3_SCHEMES):
        outcome = _get_s3(uri, storage, max_bytes, timeout_s)
    elif "://" not in uri or uri.startswith("file://"):
        outcome = _get_local(uri.removeprefix("file://"), uri, max_bytes)
    else:
        outcome = _get_other(uri, max_bytes)
    if isinstance(outcome, FetchError):
        return outcome
    if len(outcome) > max_bytes:
        return FetchError(uri, f"object larger than the limit of {max_bytes} bytes")
    return outcome


def _get_s3(uri: str, storage: StorageSettings, max_bytes: int, timeout_s: float) -> bytes | FetchError:
    pin = _pin(uri, storage)
    outcome = _get_s3_as(uri, storage, max_bytes, timeout_s, pin)
    if "VersionId" in pin and isinstance(outcome, FetchError) and outcome.reason == PERMANENT_S3_ERRORS["AccessDenied"]:
        # AWS asks for s3:GetObjectVersion to read by version id; without it, If-Match on the
        # ETag still pins the bytes (the version is then read only while it is the current one)
        fallback = _etag_pin(uri)
        retried = _get_s3_as(uri, storage, max_bytes, timeout_s, fallback)
        if not isinstance(retried, FetchError) or retried.reason != outcome.reason:
            _version_reads_denied(storage)
            return retried
    return outcome


def _get_s3_as(uri: str, storage: StorageSettings, max_bytes: int, timeout_s: float, pin: dict[str, str]) -> bytes | FetchError:
    bucket, key = split_s3_uri(uri)
    if not bucket or not key:
        return FetchError(uri, "not an s3://bucket/key URI")
    try:
        response = s3_client(storage).get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}", **pin)
        with response["Body"] as body:
            return _read_within(body, max_bytes + 1, time.monotonic() + timeout_s, uri)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "PreconditionFailed" or status == 412:
            return FetchError(uri, SUPERSEDED)
        if code in SERVICE_S3_ERRORS:
            raise StorageUnavailable(storage.endpoint_url or "s3", f"{code} reading {uri}") from exc
        if code in PERMANENT_S3_ERRORS:
            return FetchError(uri, PERMANENT_S3_ERRORS[code])
        if str(status) in PERMANENT_S3_ERRORS:
            return FetchError(uri, PERMANENT_S3_ERRORS[str(status)])
        if 400 <= status < 500 and status not in (408, 429):
            return FetchError(uri, f"refused by the store: {code or status}")
        raise StorageUnavailable(storage.endpoint_url or "s3", f"{code or status} reading {uri}") from exc
    except ObjectTooSlow:
        return FetchError(uri, SLOW_OBJECT)  # this object alone; every object of a batch slow is the store's
    except (botocore.exceptions.ParamValidationError, botocore.exceptions.UnsupportedS3AccesspointConfigurationError) as exc:
        return FetchError(uri, f"invalid bucket or key: {type(exc).__name__}"[:300])
    except (botocore.exceptions.BotoCoreError, OSError) as exc:  # no credentials, connection refused, timeouts
        raise StorageUnavailable(storage.endpoint_url or "s3", f"{type(exc).__name__} reading {uri}") from exc


def _pin(uri: str, storage: StorageSettings) -> dict[str, str]:
    """GetObject's arguments that read exactly the version an event announced."""
    if not isinstance(uri, PinnedUri) or not storage.pin_versions:
        return {}
    if uri.version and storage not in _VERSION_READS_DENIED:
        return {"VersionId": uri.version}
    return _etag_pin(uri)


def _etag_pin(uri: str) -> dict[str, str]:
    etag = uri.etag if isinstance(uri, PinnedUri) else None
    return {"IfMatch": f'"{etag}"'} if etag else {}


_VERSION_READS_DENIED: set[StorageSettings] = set()  # stores that refuse reads by version id to us


def _version_reads_denied(storage: StorageSettings) -> None:
    """Once per store: say so, and pin by ETag alone from now on."""
    with _client_lock:
        if storage in _VERSION_READS_DENIED:
            return
        _VERSION_READS_DENIED.add(storage)
    log.warning(
        "reading objects by version id is denied (grant s3:GetObjectVersion on the bucket's objects); "
        "pinning reads by ETag instead: an object version overwritten since its event is then a superseded dead letter"
    )


def _read_within(body: Any, limit: int, deadline: float, uri: str) -> bytes:
    """Read at most ``limit`` bytes, and give up at ``deadline`` however slowly the store sends them:
    a batch's deadline cancels its Dask future, but only this frees the worker's thread."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() > deadline:
            raise ObjectTooSlow(uri)
        chunk = body.read(min(CHUNK_BYTES, limit - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _get_local(path: str, uri: str, max_bytes: int) -> bytes | FetchError:
    """A local file, read directly: fsspec's layers cost more than the read itself for small images."""
    try:
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except (OSError, ValueError) as exc:  # missing, a folder, no access, a broken mount, a NUL in the name...
        return _file_error(uri, exc)


def _get_other(uri: str, max_bytes: int) -> bytes | FetchError:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        return FetchError(uri, f"unsupported location: {exc}")
    try:
        return fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:  # noqa: BLE001 - becomes this image's error record
        return _file_error(uri, exc)


def _file_error(uri: str, exc: Exception) -> FetchError:
    """This image's error record for a file that could not be read, local or through fsspec."""
    if isinstance(exc, FileNotFoundError):
        return FetchError(uri, "object not found")
    if isinstance(exc, IsADirectoryError):
        return FetchError(uri, "is a directory, not an object")
    if isinstance(exc, PermissionError):
        return FetchError(uri, "access denied")
    return FetchError(uri, f"{type(exc).__name__}: {exc}")


@lru_cache(maxsize=8)
def s3_client(storage: StorageSettings) -> Any:
    """One thread-safe client per storage configuration (credentials: the settings', else
    this process's AWS environment or instance role)."""
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 4},
        max_pool_connections=64,
        connect_timeout=10,
        read_timeout=60,
    )
    with _client_lock:  # boto3's default session is not thread-safe; a session of our own is
        return boto3.session.Session().client("s3", config=config, **storage.boto3_kwargs())
