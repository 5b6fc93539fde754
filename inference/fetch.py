"""Fetch many objects concurrently through fsspec (adapter): local, file://, s3://, memory://."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem

from inference.errors import FetchError
from inference.settings import ImageSettings, StorageSettings


def filesystem(uri: str, storage: StorageSettings) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` (s3 gets the endpoint and credentials) and its path there."""
    protocol = fsspec.utils.get_protocol(uri)
    options: dict[str, Any] = storage.storage_options() if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def fetch_many(uris: list[str], storage: StorageSettings, images: ImageSettings) -> list[bytes | FetchError]:
    """Read every object, in order; failures come back as FetchError values, never raised.

    At most ``images.max_bytes`` + 1 bytes are read of each, so a huge object is refused
    without being pulled whole. Objects on the same filesystem are read concurrently.
    """
    results: list[bytes | FetchError] = [FetchError(uri, "not fetched") for uri in uris]
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    positions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for index, uri in enumerate(uris):
        try:
            fs, path = filesystem(uri, storage)
        except (ValueError, ImportError) as exc:
            results[index] = FetchError(uri, f"unsupported location: {exc}")
            continue
        groups.setdefault(id(fs), (fs, positions[id(fs)]))
        positions[id(fs)].append((index, path))
    for fs, members in groups.values():
        paths = [path for _, path in members]
        for (index, _), outcome in zip(members, _cat(fs, paths, images), strict=True):
            results[index] = _checked(uris[index], outcome, images.max_bytes)
    return results


def _cat(fs: fsspec.AbstractFileSystem, paths: list[str], images: ImageSettings) -> list[Any]:
    limit = images.max_bytes + 1
    if isinstance(fs, AsyncFileSystem):
        found = fs.cat(paths, on_error="return", start=0, end=limit, batch_size=images.fetch_concurrency)
        if len(paths) == 1 and not isinstance(found, dict):
            found = {paths[0]: found}
        return [found.get(path, FileNotFoundError(path)) for path in paths]

    def read(path: str) -> Any:
        try:
            return fs.cat_file(path, start=0, end=limit)
        except Exception as exc:  # noqa: BLE001 - becomes this image's error record
            return exc

    with ThreadPoolExecutor(max_workers=min(images.fetch_concurrency, max(1, len(paths)))) as pool:
        return list(pool.map(read, paths))


def _checked(uri: str, outcome: Any, max_bytes: int) -> bytes | FetchError:
    if isinstance(outcome, bytes | bytearray):
        if len(outcome) > max_bytes:
            return FetchError(uri, f"object larger than the limit of {max_bytes} bytes")
        return bytes(outcome)
    if isinstance(outcome, FileNotFoundError):
        return FetchError(uri, "object not found")
    if isinstance(outcome, IsADirectoryError):
        return FetchError(uri, "is a directory, not an object")
    if isinstance(outcome, PermissionError):
        return FetchError(uri, "access denied")
    return FetchError(uri, f"{type(outcome).__name__}: {outcome}")
