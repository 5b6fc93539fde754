"""Which batches were on a Dask worker when it died, from the scheduler's own record. Pure.

The scheduler logs every worker it removes (``remove-worker`` events, with the keys that were
processing there and whether the removal was expected, a graceful retirement). That log lives
on the scheduler, so every stream worker reads the same history, and it outlives the stream
worker that submitted a batch. A batch's task key names its content (``batch_key``): the digest
of its URIs, then a nonce. Every attempt at the same images, by any stream worker, before or
after a restart, carries the same digest, so deaths are counted against the images, not
against one attempt.

A death *explains* an image only when that image was alone on the worker: the only task
processing there was a batch of that one image. An image is a worker-killer when it died alone
``POISON_DEATHS`` times; a death beside other work (a neighbour's batch, an operator's kill,
preemption) is never held against a single image.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inference.records.objects import identity

KEY_PREFIX = "visionstream-batch-"
POISON_DEATHS = 2  # alone, unexpected deaths that convict an image


def batch_digest(uris: Sequence[str]) -> str:
    """The same for the same images (the same object versions, where pinned), in any order."""
    material = "\n".join(sorted(identity(uri) for uri in uris)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:24]


def batch_key(uris: Sequence[str]) -> str:
    """A new Dask key for one attempt at ``uris``: content digest, then a nonce."""
    return f"{KEY_PREFIX}{batch_digest(uris)}-{uuid.uuid4().hex[:8]}"


def key_digest(key: Any) -> str | None:
    """The content digest a key carries, or None for a key that is not ours."""
    if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
        return None
    return key[len(KEY_PREFIX):].rsplit("-", 1)[0]


@dataclass(frozen=True, slots=True)
class Death:
    """An unexpected removal of a worker, with what was processing there."""

    worker: str
    at: float  # the scheduler's clock, seconds
    keys: frozenset[str]

    @property
    def digests(self) -> set[str]:
        return {digest for key in self.keys if (digest := key_digest(key)) is not None}

    def alone(self, digest: str) -> bool:
        """Only attempts at this one batch of images were processing on the worker."""
        return bool(self.keys) and all(key_digest(key) == digest for key in self.keys)


def deaths_from_events(events: Iterable[tuple[float, Any]]) -> list[Death]:
    """The scheduler's ``all`` events -> unexpected worker removals that held batches of ours."""
    found: list[Death] = []
    for at, message in events:
        if not isinstance(message, Mapping) or message.get("action") != "remove-worker" or message.get("expected"):
            continue
        keys = frozenset(str(key) for key in message.get("processing-tasks") or ())
        if any(key_digest(key) is not None for key in keys):
            found.append(Death(str(message.get("worker", "")), float(at), keys))
    return found


@dataclass(frozen=True, slots=True)
class DeathTally:
    beside: int  # deaths with the batch on the worker beside other work
    alone: int  # deaths with only this batch on the worker

    @property
    def total(self) -> int:
        return self.beside + self.alone


def tally(deaths: Iterable[Death], uris: Sequence[str]) -> DeathTally:
    """How often workers died with (attempts at) exactly these images on them."""
    digest = batch_digest(uris)
    beside = alone = 0
    for death in deaths:
        if digest in death.digests:
            if death.alone(digest):
                alone += 1
            else:
                beside += 1
    return DeathTally(beside, alone)


def convicted(uris: Sequence[str], counted: DeathTally) -> bool:
    """One image that killed its workers alone, often enough that chance is ruled out."""
    return len(uris) == 1 and counted.alone >= POISON_DEATHS
