"""What isolating a batch has found so far, kept on the Dask scheduler where the next owner of
its events finds it (adapter).

An isolation splits a batch until the image that kills workers (or hangs) is alone; each step
costs worker restarts and model loads. A stream worker that restarts mid-way (a deploy, a lost
node, a revoke) used to start again from the whole batch. Now each image's verdict (cleared:
classified in an isolated step; convicted: dead-lettered, and why) and the number of isolations
begun over it and not finished are kept in the scheduler's metadata, shared by every stream
worker of the cluster: the next isolation skips what is known, and one begun too often over the
same images gives up on them (``streams.service.isolation``). Only one stream worker isolates
at a time (``inference.client.isolation``), so no two write at once. A scheduler restart forgets
the record, as it forgets the deaths.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from inference.records.objects import identity

log = logging.getLogger(__name__)

METADATA_KEY = "visionstream-isolation"  # the scheduler metadata entry: image digest -> record
KEPT = 10_000  # records kept at most; the oldest go first (a finished isolation forgets its own)
KEPT_S = 24 * 3600.0  # and for at most a day: a record of images no isolation came back to
CLEARED, CONVICTED = "cleared", "convicted"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What is known of one image from isolations that did not finish."""

    begun: int = 0  # isolations begun over this image and not finished
    outcome: str | None = None  # CLEARED or CONVICTED
    stage: str | None = None  # a conviction's dead-letter stage
    reason: str | None = None  # and its reason

    def as_record(self) -> dict[str, Any]:
        return {"begun": self.begun, "outcome": self.outcome, "stage": self.stage, "reason": self.reason, "at": time.time()}

    @classmethod
    def from_record(cls, record: Any) -> Verdict:
        """Whatever the scheduler holds under an image's digest; nothing usable is no verdict."""
        if not isinstance(record, dict):
            return cls()
        begun = record.get("begun")
        outcome = record.get("outcome")
        return cls(
            begun if isinstance(begun, int) and begun >= 0 else 0,
            outcome if outcome in (CLEARED, CONVICTED) else None,
            str(record["stage"]) if record.get("stage") else None,
            str(record["reason"]) if record.get("reason") else None,
        )


def digest(uri: str) -> str:
    """An image's key in the record: its identity (URI and pin), hashed to a fixed length."""
    return hashlib.sha256(identity(uri).encode("utf-8", "surrogateescape")).hexdigest()[:32]


class VerdictBook:
    """The scheduler's record of unfinished isolations, read and written through ``client`` (an
    asynchronous Dask client: its ``get_metadata`` and ``set_metadata``)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def read(self, uris: list[str]) -> list[Verdict]:
        """The verdict known for each of ``uris``, in order (``Verdict()``: nothing known)."""
        everything = await self._all()
        return [Verdict.from_record(everything.get(digest(uri))) for uri in uris]

    async def begun(self, uris: list[str], known: list[Verdict]) -> None:
        """An isolation over ``uris`` begins (``known``: their verdicts, as ``read`` gave them):
        each image's count of isolations begun and not finished goes up."""
        for uri, old in zip(uris, known, strict=True):
            await self._set(uri, Verdict(old.begun + 1, old.outcome, old.stage, old.reason))

    async def decided(self, uris: list[str], verdict: Verdict) -> None:
        """Images cleared or convicted by a step of the isolation under way."""
        for uri, old in zip(uris, await self.read(uris), strict=True):
            await self._set(uri, Verdict(old.begun, verdict.outcome, verdict.stage, verdict.reason))

    async def finished(self, uris: list[str]) -> None:
        """The isolation over ``uris`` is over and its records are being published: forget them."""
        everything = await self._all()
        gone = {digest(uri) for uri in uris}
        if gone.isdisjoint(everything):
            return
        oldest = time.time() - KEPT_S
        kept = {key: record for key, record in everything.items() if key not in gone and _at(record) >= oldest}
        if len(kept) > KEPT:
            kept = dict(sorted(kept.items(), key=lambda item: _at(item[1]))[-KEPT:])
        await self.client.set_metadata([METADATA_KEY], kept)

    async def _all(self) -> dict[str, Any]:
        everything = await self.client.get_metadata([METADATA_KEY], default={})
        return everything if isinstance(everything, dict) else {}

    async def _set(self, uri: str, verdict: Verdict) -> None:
        await self.client.set_metadata([METADATA_KEY, digest(uri)], verdict.as_record())


def _at(record: Any) -> float:
    at = record.get("at") if isinstance(record, dict) else None
    return at if isinstance(at, (int, float)) else 0.0
