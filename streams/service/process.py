"""The stream worker's process: Faust's worker, with a graceful stop on SIGTERM and SIGINT.

The first signal drains (``StreamService.drain``: no new batches, in-flight ones finish and
publish within ``worker.shutdown_grace_s``, offsets committed), then Faust stops as usual
and the process exits 0. A second signal stops at once; unacknowledged events are then
consumed again after the restart (at least once).

A fatal error (``StreamService.fatal``) is logged once; ``FatalEchoes`` keeps Faust's and
mode's echoes of it while they stop (tracebacks, "Crashed", "Event loop is closed") out of the
log below DEBUG, and the command ends with one ``visionstream: error:`` line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


ECHOING_LOGGERS = ("faust", "mode", "aiokafka", "asyncio", "distributed")


class FatalEchoes(logging.Filter):
    """Once ``fatal()`` names an error: the libraries' errors while stopping are dropped, and
    tracebacks are cut from the records kept (the message line stays)."""

    def __init__(self, fatal: Callable[[], BaseException | None]) -> None:
        super().__init__()
        self.fatal = fatal

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fatal() is None:
            return True
        if record.name.split(".")[0] in ECHOING_LOGGERS and record.levelno >= logging.ERROR:
            return False
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def fatal_echoes_filtered(fatal: Callable[[], BaseException | None], enabled: bool = True) -> Iterator[None]:
    """``FatalEchoes`` on every handler of the root logger, for the ``with`` block."""
    if not enabled:
        yield
        return
    echoes = FatalEchoes(fatal)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(echoes)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(echoes)
