"""An object URI that names the version its event announced. Pure.

Two uploads to one key in quick succession send two events; without a pin both workers read
whatever the key holds when they get to it, and the first event's prediction describes the
second object's bytes. A ``PinnedUri`` carries the version id and ETag from the event, so the
worker reads exactly those bytes (``VersionId`` where the bucket versions objects, else
``If-Match`` on the ETag) or learns that the object was overwritten since (``superseded``).

It is a ``str``, the URI itself, wherever URIs go (records, logs, the images a batch names):
the pin never changes equality or hashing. It crosses to Dask workers as plain strings
(``pins``/``pinned``), never as a pickled object.
"""

from __future__ import annotations

from collections.abc import Sequence

S3_SCHEMES = ("s3://", "s3a://")
NO_VERSION = ("", "null")  # what unversioned buckets send, or S3's name for the unversioned copy


class PinnedUri(str):
    """``s3://bucket/key`` as an event announced it: ``version`` and ``etag`` from the event."""

    version: str | None
    etag: str | None

    def __new__(cls, uri: str, version: str | None = None, etag: str | None = None) -> PinnedUri:
        pinned = super().__new__(cls, uri)
        pinned.version = version if version not in NO_VERSION else None
        pinned.etag = plain_etag(etag)
        return pinned

    def __reduce__(self) -> tuple[type[PinnedUri], tuple[str, str | None, str | None]]:
        return PinnedUri, (str(self), self.version, self.etag)

    @property
    def identity(self) -> str:
        """The URI and its pin, for telling versions apart (never parsed back)."""
        if self.version is None and self.etag is None:
            return str(self)
        return f"{self}\x00{self.version or ''}\x00{self.etag or ''}"


def plain_etag(etag: str | None) -> str | None:
    """An ETag as events send it (bare): quotes (listings) and a weak marker dropped; None where
    nothing, or nothing a conditional read could name, is left."""
    bare = (etag or "").removeprefix("W/").strip('"')
    return bare if bare and '"' not in bare else None


def identity(uri: str) -> str:
    """What tells one announced object from another: the URI, and its pin where it has one."""
    return uri.identity if isinstance(uri, PinnedUri) else uri


def pins(uris: Sequence[str]) -> list[list[str | None] | None] | None:
    """The pins of ``uris`` as plain lists ([version, etag] or None), for a Dask task; None
    where none is pinned."""
    found = [[uri.version, uri.etag] if isinstance(uri, PinnedUri) and (uri.version or uri.etag) else None for uri in uris]
    return found if any(found) else None


def pinned(uris: Sequence[str], pins: Sequence[Sequence[str | None] | None] | None) -> list[str]:
    """``uris`` with their ``pins`` (as ``pins`` wrote them) attached again. Raises ValueError
    on a list of another length."""
    if pins is None:
        return list(uris)
    if len(pins) != len(uris):
        raise ValueError(f"{len(pins)} pins for {len(uris)} URIs")
    return [PinnedUri(uri, *pin) if pin else uri for uri, pin in zip(uris, pins, strict=True)]


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), the key taken verbatim."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key
