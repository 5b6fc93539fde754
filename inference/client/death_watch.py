"""Following the scheduler's record of worker deaths for one client (adapter).

``DeathWatch`` reads the record once (``follow``), then keeps it current from the scheduler's
pushed events. Each batch in flight is watched (``watching``): a death with the batch's key on it
wakes it, and its images become *suspects* (they were on a worker when it died), which makes
their next attempt give up at the first death instead of the second. The counting itself is
``inference.client.deaths`` (pure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from inference.client.deaths import Death, DeathTally, batch_digest, deaths_from_events, key_digest, tally
from inference.records.objects import identity
from inference.worker.plugin import BATCH_STARTED_TOPIC

log = logging.getLogger(__name__)

DEATHS_KEPT = 10_000  # the newest worker deaths remembered (a few hundred bytes each)
SUBSCRIBE_EVERY_S = 5.0  # a client that reconnects to a restarted scheduler is subscribed to nothing there


class DeathWatch:
    """The scheduler's record of worker deaths, kept current, and the batches in flight it wakes."""

    def __init__(self) -> None:
        self.deaths: deque[Death] = deque(maxlen=DEATHS_KEPT)  # the scheduler's record, kept current
        self._died: dict[str, asyncio.Event] = {}  # key of a batch in flight -> set when its worker dies
        self._in_flight: dict[str, list[str]] = {}  # key of a batch in flight -> its URIs
        self.suspects: set[str] = set()  # images (``identity``) that were on a worker when it died (this process's batches)
        self._started: dict[str, asyncio.Event] = {}  # digest of a batch awaited -> set when a worker starts classifying it
        self.last_start = 0.0  # monotonic: when a worker last said it started a batch, any client's
        self._subscribed_at = 0.0  # monotonic

    async def follow(self, client: Any, timeout_s: float) -> None:
        """Read the scheduler's record of workers that died with batches of ours on them, and
        follow it from now on (the scheduler pushes each new event)."""
        try:
            history = await asyncio.wait_for(client.get_events("all"), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - an older record is a nicety; new deaths still arrive
            log.warning("could not read the scheduler's event log: %s", exc)
            history = ()
        self.deaths.clear()
        self.deaths.extend(deaths_from_events(history))
        self.subscribe(client)

    def subscribe(self, client: Any) -> None:
        """Ask the scheduler for its events, again every few seconds: Dask's client reconnects
        to a restarted scheduler by itself, and the new scheduler knows no subscription."""
        if client is not None and time.monotonic() - self._subscribed_at >= SUBSCRIBE_EVERY_S:
            client.subscribe_topic("all", self._on_event)
            client.subscribe_topic(BATCH_STARTED_TOPIC, self._on_started)
            self._subscribed_at = time.monotonic()

    def _on_started(self, event: tuple[float, Any]) -> None:
        _, message = event
        self.last_start = time.monotonic()
        digest = key_digest(message.get("key")) if isinstance(message, dict) else None
        if digest is not None and (started := self._started.get(digest)) is not None:
            started.set()

    @contextmanager
    def starts(self, uris: list[str]) -> Iterator[asyncio.Event]:
        """While an attempt at ``uris`` is awaited: an event set once a worker starts classifying
        it (its model loaded; the time queued behind other batches is over)."""
        digest = batch_digest(uris)
        started = self._started[digest] = asyncio.Event()
        try:
            yield started
        finally:
            if self._started.get(digest) is started:
                del self._started[digest]

    def _on_event(self, event: tuple[float, Any]) -> None:
        for death in deaths_from_events([event]):
            self.deaths.append(death)
            for key in death.keys:
                watch = self._died.get(key)
                if watch is not None:
                    watch.set()
                if len(self.suspects) < DEATHS_KEPT:
                    self.suspects.update(identity(uri) for uri in self._in_flight.get(key, ()))

    def tally(self, uris: list[str]) -> DeathTally:
        """How often Dask workers died with these images on them (any stream worker's attempts)."""
        return tally(self.deaths, uris)

    def seen_dying(self, uris: list[str]) -> bool:
        """Whether any of these images was ever on a worker that died."""
        return bool(self.tally(uris).total) or not self.suspects.isdisjoint(identity(uri) for uri in uris)

    @contextmanager
    def watching(self, key: str, uris: list[str]) -> Iterator[asyncio.Event]:
        """While the batch ``key`` is in flight: an event set whenever a worker dies with it."""
        died = self._died[key] = asyncio.Event()
        self._in_flight[key] = list(uris)
        try:
            yield died
        finally:
            self._died.pop(key, None)
            self._in_flight.pop(key, None)

    def cleared(self, uris: list[str]) -> None:
        """These images were classified: they did not kill the workers they were on."""
        self.suspects.difference_update(identity(uri) for uri in uris)
