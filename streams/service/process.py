"""The stream worker's process: Faust's worker, with a graceful stop on SIGTERM and SIGINT.

The first signal drains (``StreamService.drain``: no new batches, in-flight ones finish and
publish within ``worker.shutdown_grace_s``, offsets committed), then Faust stops as usual
and the process exits 0. A second signal stops at once; unacknowledged events are then
consumed again after the restart (at least once).
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from streams.service.agents import StreamService

log = logging.getLogger(__name__)


class GracefulWorker(faust.Worker):
    def __init__(self, service: StreamService, **options: Any) -> None:
        super().__init__(service.app, **options)
        self.spinner = None  # its terminal escapes would prefix the next log line (and break JSON logs)
        self.service = service
        self._stopping = False

    def _on_sigterm(self) -> None:
        self._graceful(super()._on_sigterm)

    def _on_sigint(self) -> None:
        self._graceful(super()._on_sigint)

    def _graceful(self, stop: Any) -> None:
        if self._stopping:
            log.warning("second stop signal: stopping now")
            stop()
            return
        self._stopping = True

        async def drain_then_stop() -> None:
            try:
                await self.service.drain()
            finally:
                stop()

        self.add_future(drain_then_stop())
