"""Reconcile: find the objects of a prefix that no event covers, and announce them.

A notification can be lost before it reaches Kafka (a MinIO queue that overflowed or was
never configured, a bucket rule that missed a suffix, a deleted topic); nothing downstream
can notice an object that was never announced. Reconcile lists the prefix and announces, as
backfill events through the same path as ``backfill``, every image object whose current
version nothing accounts for.

What accounts for an object version, read from the service's own topics from their start:
  - a prediction or a dead letter for it (``uri`` and ``etag``), superseded ones included;
  - an announcement still on its way: its event on the uploads or backfill topic (the
    worker consumes it; acknowledged only once its result is published).
Object versions are matched by URI and ETag (the listing's ETag is the current version's); a
record that names no ETag accounts for no version (the object is announced again, with its
ETag, once). Keys that no event may name (control characters, ``::``: the parser refuses them)
are counted and left alone, never announced to be refused again.

``Accounted`` keeps one 64-bit digest per version it heard of (sorted, 8 bytes each, plus the
page being listed), never the URIs. A listed object is taken for accounted by mistake when
its digest equals one of n known ones: about m·n/2⁶⁴ for m objects listed (5e-8 for a million
against a million); that object would not be announced.
Reconcile can only know what the topics still hold: an object whose prediction passed the
predictions topic's retention is announced again (``--modified-after`` bounds the listing),
and a read that stops short of the end offsets seen at its start (``kafka.read_topics``)
is said so.
It errs towards announcing: a duplicate prediction, never a missing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from inference.records.objects import plain_etag
from inference.records.results import is_dead_letter, is_prediction
from inference.settings import EventSettings, FilterSettings, Settings
from streams.errors import MalformedEvent
from streams.service.backfill import BackfillPlan, listing, object_ref, parse_s3_uri, publisher
from streams.service.kafka import read_topics
from streams.service.s3events import ObjectRef, allowed_filter, key_problem, parse_notification

log = logging.getLogger(__name__)

MAX_REFUSED_SHOWN = 5


def version_digest(uri: str, etag: str) -> int:
    """One object version as a 64-bit number."""
    material = f"{uri}\x00{etag}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little")


class Accounted:
    """The object versions the topics account for: ``add`` while reading, then ``freeze`` once,
    then ``covers``. 8 bytes a version once frozen."""

    def __init__(self) -> None:
        self._growing: array[int] | None = array("Q")
        self._sorted = np.empty(0, dtype=np.uint64)

    def add(self, uri: str, etag: str | None) -> bool:
        """Remember this version; False (nothing kept) where ``etag`` names none."""
        assert self._growing is not None, "Accounted.add after freeze"
        bare = plain_etag(etag)
        if bare is None:
            return False
        self._growing.append(version_digest(uri, bare))
        return True

    def freeze(self) -> Accounted:
        if self._growing is not None:
            self._sorted = np.unique(np.frombuffer(self._growing, dtype=np.uint64))
            self._growing = None
        return self

    def __len__(self) -> int:
        return len(self._sorted) if self._growing is None else len(self._growing)

    @property
    def nbytes(self) -> int:
        return self._sorted.nbytes if self._growing is None else self._growing.itemsize * len(self._growing)

    def covers(self, uri: str, etag: str | None) -> bool:
        """This version of ``uri`` is accounted for (never one without an ETag)."""
        assert self._growing is None, "Accounted.covers before freeze"
        bare = plain_etag(etag)
        if bare is None:
            return False
        digest = version_digest(uri, bare)
        at = int(np.searchsorted(self._sorted, np.uint64(digest)))
        return at < len(self._sorted) and int(self._sorted[at]) == digest


def account(accounted: Accounted, value: bytes | None, output: bool, filter: FilterSettings, limits: EventSettings) -> int:
    """Add what one record of the topics accounts for; returns how many versions. ``output``:
    a record of the predictions or dead-letter topic, else an S3 notification. Whatever the
    bytes, a record that names no object adds nothing. Pure but for ``accounted``."""
    if value is None:
        return 0
    if output:
        try:
            record = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return 0
        if not isinstance(record, dict) or not (is_prediction(record) or is_dead_letter(record)):
            return 0
        uri, etag = record.get("uri"), record.get("etag")
        if not isinstance(uri, str) or not uri:
            return 0  # a message that was never a notification (stage parse)
        return int(accounted.add(uri, etag if isinstance(etag, str) else None))
    try:
        notification = parse_notification(value, filter, limits)
    except MalformedEvent:
        return 0
    return sum(accounted.add(ref.uri, ref.etag) for ref in notification.objects)


@dataclass(frozen=True, slots=True)
class ReconcilePlan:
    """What to reconcile and how."""

    bucket: str
    prefix: str
    topic: str  # where announcements go (the backfill topic)
    dry_run: bool = False
    min_age_s: float = 60.0  # younger objects' notifications may still be on their way
    modified_after: datetime | None = None  # only objects written after this (older ones' records may have expired)
    idle_s: float = 5.0  # stop reading a topic after this long without a record

    @classmethod
    def parse(cls, uri: str, topic: str, **options: Any) -> ReconcilePlan:
        """A plan for ``s3://bucket/prefix``; ValueError if ``uri`` is not one."""
        return cls(*parse_s3_uri(uri), topic, **options)

    def excludes(self, summary: dict[str, Any], now: datetime) -> str | None:
        """Why an object the topics do not account for is left alone: ``too_new`` (its
        notification may still be on its way), ``out_of_range`` (before ``modified_after``),
        or None: announce it."""
        modified = summary.get("LastModified")
        if not isinstance(modified, datetime):
            return None
        if self.modified_after is not None and modified <= self.modified_after:
            return "out_of_range"
        if (now - modified).total_seconds() < self.min_age_s:
            return "too_new"
        return None


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    listed: int = 0  # image objects listed under the prefix
    too_new: int = 0  # younger than min_age_s
    out_of_range: int = 0  # not modified after modified_after
    accounted: int = 0  # listed objects the topics account for
    announced: int = 0  # published (a dry run: would be)
    versions_known: int = 0  # distinct object versions the topics account for
    index_bytes: int = 0
    read_s: float = 0.0
    elapsed_s: float = 0.0
    refused: int = 0  # keys no event may name, left alone


async def read_accounted(
    settings: Settings, idle_s: float, on_read: Callable[[int], None] | None = None, extra_inputs: tuple[str, ...] = ()
) -> Accounted:
    """Every object version the service's topics (and ``extra_inputs``, where announcements
    went elsewhere) account for, read from their start up to the end offsets seen when reading
    began; where the broker gave none, until ``idle_s`` passes without a record."""
    topics = settings.topics
    outputs = {topics.predictions, topics.dead_letter}
    inputs = sorted({topics.uploads, topics.backfill, *extra_inputs} - outputs)
    uploads = allowed_filter(settings.filter, settings.storage.bucket)  # what the worker would classify
    accounted = Accounted()

    def take(topic: str, values: list[bytes | None]) -> None:
        output = topic in outputs
        for value in values:
            account(accounted, value, output, uploads, settings.events)

    await read_topics(settings.kafka, [*sorted(outputs), *inputs], idle_s, take, on_read)
    return accounted.freeze()


async def run_reconcile(
    plan: ReconcilePlan,
    settings: Settings,
    on_missing: Callable[[ObjectRef], None] | None = None,
    on_read: Callable[[int], None] | None = None,
) -> ReconcileResult:
    """Announce every image object of the plan's prefix that the topics do not account for;
    ``on_missing`` sees each one (what a dry run prints)."""
    started, now = time.monotonic(), datetime.now(UTC)  # before reading: uploads made meanwhile are too new
    accounted = await read_accounted(settings, plan.idle_s, on_read, extra_inputs=(plan.topic,))
    read_s = time.monotonic() - started
    listed = covered = 0
    excluded = {"too_new": 0, "out_of_range": 0}
    refused: list[str] = []
    replay = BackfillPlan(plan.bucket, plan.prefix, plan.topic, dry_run=plan.dry_run)
    async with publisher(replay, settings.kafka, settings.topics) as out:
        async for page in listing(replay, settings.storage):
            for key, summary in page:
                if not settings.filter.accepts(key):
                    continue
                listed += 1
                ref = object_ref(plan.bucket, key, summary)
                if key_problem(key) is not None:
                    refused.append(key)  # an event naming it would be refused: never announced
                elif accounted.covers(ref.uri, ref.etag):
                    covered += 1
                elif (reason := plan.excludes(summary, now)) is not None:
                    excluded[reason] += 1
                else:
                    await out.send(ref)
                    if on_missing is not None:
                        on_missing(ref)
        await out.flush()
        announced = out.confirmed
    if refused:
        log.warning("%d object key(s) under the prefix can never be announced (control characters, '::' or too long; "
                    "rename them to classify them), e.g. %s", len(refused), ", ".join(repr(key) for key in refused[:MAX_REFUSED_SHOWN]))
    return ReconcileResult(
        listed, excluded["too_new"], excluded["out_of_range"], covered, announced,
        len(accounted), accounted.nbytes, read_s, time.monotonic() - started, len(refused),
    )
