"""The stream worker's HTTP routes on Faust's web server: ``/health`` (a JSON snapshot),
``/livez`` (503 when wedged: restart me), ``/readyz`` (503 when it cannot take work now) and
``/metrics`` (Prometheus' text format). Each only asks the service; none decides anything."""

from __future__ import annotations

from typing import Any, Protocol

import faust

from streams.service.metrics import CONTENT_TYPE, StreamMetrics


class Answers(Protocol):
    """What the routes ask (``StreamService`` answers)."""

    counters: StreamMetrics

    def health(self) -> dict[str, Any]: ...
    def live(self) -> tuple[bool, str]: ...
    def readiness(self) -> tuple[bool, str]: ...


def add_routes(app: faust.App, service: Answers) -> None:
    @app.page("/health")
    async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json(service.health())

    @app.page("/livez")
    async def livez(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        alive, why = service.live()
        return web.json({"status": "ok" if alive else "wedged", "reason": why}, status=200 if alive else 503)

    @app.page("/readyz")
    async def readyz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        ready, why = service.readiness()
        return web.json({"status": "ready" if ready else "unready", "reason": why}, status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(service.counters.exposition(), content_type=CONTENT_TYPE)
