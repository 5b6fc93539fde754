"""Reconcile: find the objects of a prefix that no event covers, and announce them.

A notification can be lost before it reaches Kafka (a MinIO queue that overflowed or was
never configured, a bucket rule that missed a suffix, a deleted topic); nothing downstream
can notice an object that was never announced. Reconcile lists the prefix and announces, as
backfill events through the same path as ``backfill``, every image object whose current
version nothing accounts for.

What accounts for an object version is its outcome, read from the service's own topics from
their start:
  - a prediction for it (``uri`` and ``etag``), or a dead letter of a lasting cause (not an
    image, corrupt, too large, superseded, a worker-killer...);
  - an announcement still on its way: its event on an input topic at or past the consumer
    group's committed offset (the worker will consume it; acknowledged only once its result is
    published).
Announced again, each with its reason (``--dry-run`` prints it after a tab):
  - ``never announced``: no event names the version;
  - ``announced, no result``: its event is behind the group's committed offset, yet no
    prediction or dead letter names it (the worker skipped it: its bucket was added to
    ``filter.buckets`` later; or an operator's offset reset passed over it);
  - ``transient dead letter``: its only records are dead letters of a passing cause (the store
    slow, refusing or redirecting; a decode or a batch past its deadline; a decoder process
    lost), at most ``MAX_TRANSIENT`` of them: the one after that is final, so a cause that is
    not passing after all never loops (``--no-retry-transient``: every dead letter is final).
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
from inference.records.results import SLOW_OBJECT, is_dead_letter, is_prediction
from inference.settings import EventSettings, FilterSettings, Settings
from streams.errors import MalformedEvent
from streams.service.backfill import BackfillPlan, listing, object_ref, parse_s3_uri, publisher
from streams.service.kafka import read_topics
from streams.service.lag import read_lag
from streams.service.s3events import ObjectRef, allowed_filter, key_problem, parse_notification

log = logging.getLogger(__name__)

MAX_REFUSED_SHOWN = 5


def version_digest(uri: str, etag: str) -> int:
    """One object version as a 64-bit number."""
    material = f"{uri}\x00{etag}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little")


# what the reason of a dead letter says when its cause may pass (a later attempt may well succeed)
TRANSIENT_SIGNS = (
    SLOW_OBJECT, "access denied", "bucket in another region or endpoint", "within images.decode_timeout_s",
    "within batch.timeout_s", "decoder process died", "past images.decode_memory_mb",
)
MAX_TRANSIENT = 3  # transient dead letters of one version after which the next is taken as final
NEVER_ANNOUNCED, UNPROCESSED, TRANSIENT = "never announced", "announced, no result", "transient dead letter"


def transient(record: dict[str, Any]) -> bool:
    """A dead letter whose cause may pass: a fetch or decode failure whose reason says so. Pure."""
    reason = record.get("reason")
    return record.get("stage") in ("fetch", "decode") and isinstance(reason, str) and any(sign in reason for sign in TRANSIENT_SIGNS)


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


class Outcomes:
    """What the topics say of each object version: a result that settles it (``settled``), an
    announcement still on its way (``pending``), an announcement the worker passed (``announced``),
    and how many transient dead letters it had (``transient``). ``freeze`` once read."""

    def __init__(self, retry_transient: bool = True) -> None:
        self.settled, self.pending, self.announced = Accounted(), Accounted(), Accounted()
        self.retry_transient = retry_transient
        self.transient: dict[int, int] = {}  # version digest -> transient dead letters (few)

    def freeze(self) -> Outcomes:
        for part in (self.settled, self.pending, self.announced):
            part.freeze()
        return self

    def __len__(self) -> int:
        return len(self.settled) + len(self.pending)

    @property
    def nbytes(self) -> int:
        return self.settled.nbytes + self.pending.nbytes + self.announced.nbytes + 16 * len(self.transient)

    def missing(self, uri: str, etag: str | None) -> str | None:
        """Why this version is announced again, or None where it is accounted for."""
        if self.settled.covers(uri, etag) or self.pending.covers(uri, etag):
            return None
        bare = plain_etag(etag)
        seen = self.transient.get(version_digest(uri, bare), 0) if bare is not None else 0
        if seen:
            return None if seen > MAX_TRANSIENT else f"{TRANSIENT} ({seen})"
        return UNPROCESSED if self.announced.covers(uri, etag) else NEVER_ANNOUNCED


def account(outcomes: Outcomes, value: bytes | None, output: bool, filter: FilterSettings, limits: EventSettings, pending: bool = False) -> int:
    """Add what one record of the topics says; returns how many versions it named. ``output``: a
    record of the predictions or dead-letter topic, else an S3 notification, ``pending`` where it
    is at or past its group's committed offset. Whatever the bytes, a record that names no object
    adds nothing. Pure but for ``outcomes``."""
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
        bare = plain_etag(etag if isinstance(etag, str) else None)
        if bare is not None and outcomes.retry_transient and is_dead_letter(record) and transient(record):
            digest = version_digest(uri, bare)
            outcomes.transient[digest] = outcomes.transient.get(digest, 0) + 1
            return 1
        return int(outcomes.settled.add(uri, bare))
    try:
        notification = parse_notification(value, filter, limits)
    except MalformedEvent:
        return 0
    into = outcomes.pending if pending else outcomes.announced
    return sum(into.add(ref.uri, ref.etag) for ref in notification.objects)


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
    retry_transient: bool = True  # announce versions whose dead letters were of a passing cause again

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
    never_announced: int = 0  # of those announced: no event named them
    unprocessed: int = 0  # ... announced, behind the group's committed offset, with no result
    transient: int = 0  # ... whose dead letters were of a passing cause
    versions_known: int = 0  # distinct object versions the topics account for
    index_bytes: int = 0
    read_s: float = 0.0
    elapsed_s: float = 0.0
    refused: int = 0  # keys no event may name, left alone


async def read_outcomes(
    settings: Settings, idle_s: float, on_read: Callable[[int], None] | None = None, extra_inputs: tuple[str, ...] = (),
    retry_transient: bool = True,
) -> Outcomes:
    """What the service's topics (and ``extra_inputs``, where announcements went elsewhere) say
    of every object version, read from their start up to the end offsets seen when reading began
    (where the broker gave none, until ``idle_s`` passes without a record). The consumer group's
    committed offsets are read first: an announcement at or past them is on its way."""
    topics = settings.topics
    outputs = {topics.predictions, topics.dead_letter}
    inputs = sorted({topics.uploads, topics.backfill, *extra_inputs} - outputs)
    uploads = allowed_filter(settings.filter, settings.storage.bucket)  # what the worker would classify
    group = await read_lag(settings.kafka, settings.kafka.consumer_group, inputs)
    committed = {(p.topic, p.partition): p.start if p.committed is None else p.committed for p in group.partitions}
    outcomes = Outcomes(retry_transient)

    def take(topic: str, records: list[Any]) -> None:
        output = topic in outputs
        for record in records:
            # a partition the group never saw: all of it is still to come
            pending = not output and record.offset >= committed.get((topic, record.partition), 0)
            account(outcomes, record.value, output, uploads, settings.events, pending)

    await read_topics(settings.kafka, [*sorted(outputs), *inputs], idle_s, take, on_read)
    return outcomes.freeze()


async def run_reconcile(
    plan: ReconcilePlan,
    settings: Settings,
    on_missing: Callable[[ObjectRef, str], None] | None = None,
    on_read: Callable[[int], None] | None = None,
) -> ReconcileResult:
    """Announce every image object of the plan's prefix that the topics do not account for;
    ``on_missing`` sees each one, with why (what a dry run prints)."""
    started, now = time.monotonic(), datetime.now(UTC)  # before reading: uploads made meanwhile are too new
    outcomes = await read_outcomes(settings, plan.idle_s, on_read, extra_inputs=(plan.topic,), retry_transient=plan.retry_transient)
    read_s = time.monotonic() - started
    listed = covered = 0
    excluded = {"too_new": 0, "out_of_range": 0}
    why_counts = {NEVER_ANNOUNCED: 0, UNPROCESSED: 0, TRANSIENT: 0}
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
                elif (why := outcomes.missing(ref.uri, ref.etag)) is None:
                    covered += 1
                elif (reason := plan.excludes(summary, now)) is not None:
                    excluded[reason] += 1
                else:
                    await out.send(ref)
                    why_counts[why.split(" (")[0]] += 1
                    if on_missing is not None:
                        on_missing(ref, why)
        await out.flush()
        announced = out.confirmed
    if refused:
        log.warning("%d object key(s) under the prefix can never be announced (control characters, '::' or too long; "
                    "rename them to classify them), e.g. %s", len(refused), ", ".join(repr(key) for key in refused[:MAX_REFUSED_SHOWN]))
    return ReconcileResult(
        listed, excluded["too_new"], excluded["out_of_range"], covered, announced,
        why_counts[NEVER_ANNOUNCED], why_counts[UNPROCESSED], why_counts[TRANSIENT],
        len(outcomes), outcomes.nbytes, read_s, time.monotonic() - started, len(refused),
    )
