"""Expand classify SOURCEs (file, folder, glob, s3://bucket/prefix) into object URIs, lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from inference.errors import SourceError
from inference.settings import StorageSettings

GLOB_CHARS = set("*?[")


def iter_sources(sources: list[str], storage: StorageSettings, suffixes: tuple[str, ...] = ()) -> Iterator[str]:
    """Every object URI the sources name, each once, in listing order. What a folder, a glob or
    a prefix holds is kept only where its name ends with one of ``suffixes`` (any case; empty:
    everything), the rule the stream worker and ``backfill`` apply (``filter.suffixes``); a
    file named on its own is always taken."""
    seen: set[str] = set()
    wanted = tuple(suffix.lower() for suffix in suffixes)
    for source in sources:
        found = skipped = 0
        for uri, named in _expand(source, storage):
            if not named and wanted and not uri.lower().endswith(wanted):
                skipped += 1
                continue
            found += 1
            if uri not in seen:
                seen.add(uri)
                yield uri
        if not found:
            if skipped:
                raise SourceError(f"{source}: none of its {skipped} files is an image by name (filter.suffixes: {', '.join(suffixes)})")
            if _is_local_folder(source):
                raise SourceError(f"{source}: an empty folder")
            raise SourceError(f"{source}: no such file, folder, or objects")


def _is_local_folder(source: str) -> bool:
    if fsspec.utils.get_protocol(source) not in ("file", "local"):
        return False
    return Path(source.removeprefix("file://")).expanduser().is_dir()


def _expand(source: str, storage: StorageSettings) -> Iterator[tuple[str, bool]]:
    """(URI, named on its own) for everything ``source`` names."""
    protocol = fsspec.utils.get_protocol(source)
    if protocol in ("s3", "s3a"):
        bucket, _, prefix = source.split("://", 1)[1].partition("/")
        if any(char in source for char in GLOB_CHARS):
            fs, _ = fsspec.core.url_to_fs(source, **storage.storage_options())
            yield from ((f"s3://{path}", False) for path in sorted(fs.glob(source)) if not fs.isdir(path))
        else:
            yield from ((f"s3://{bucket}/{key}", key == prefix) for key, _ in iter_s3_objects(bucket, prefix, storage))
        return
    if protocol not in ("file", "local"):
        fs, path = fsspec.core.url_to_fs(source)
        paths = fs.glob(path) if any(char in path for char in GLOB_CHARS) else fs.find(path)
        yield from ((fs.unstrip_protocol(p), fs.unstrip_protocol(p) == source) for p in sorted(paths))
        return
    path = Path(source.removeprefix("file://")).expanduser()
    if any(char in str(path) for char in GLOB_CHARS):
        matches = sorted(Path(os.sep).glob(str(path.resolve())[1:]) if path.is_absolute() else Path().glob(str(path)))
        yield from ((str(p.resolve()), False) for p in matches if p.is_file())
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            yield from ((str((Path(root) / name).resolve()), False) for name in sorted(files) if not name.startswith("."))
    elif path.exists():
        yield str(path.resolve()), True


def iter_s3_objects(
    bucket: str, prefix: str, storage: StorageSettings, start_after: str | None = None, page_size: int = 1000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, object summary) under ``prefix``, one listing page at a time (never all in memory)."""
    for page in iter_s3_pages(bucket, prefix, storage, start_after, page_size):
        yield from page


def iter_s3_pages(
    bucket: str, prefix: str, storage: StorageSettings, start_after: str | None = None, page_size: int = 1000
) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The listing under ``prefix`` page by page: lists of (key, object summary), folders left out."""
    import boto3
    import botocore.exceptions

    client = boto3.client("s3", **storage.boto3_kwargs())
    paginator = client.get_paginator("list_objects_v2")
    arguments: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
    if start_after:
        arguments["StartAfter"] = start_after
    try:
        for page in paginator.paginate(**arguments):
            yield [(summary["Key"], summary) for summary in page.get("Contents", ()) if not summary["Key"].endswith("/")]
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise SourceError(f"s3://{bucket}/{prefix}: cannot list ({code})") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise SourceError(f"s3://{bucket}/{prefix}: cannot list ({exc})") from exc
