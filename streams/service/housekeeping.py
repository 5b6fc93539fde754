"""The stream worker's timers: the lag gauge, the liveness watches, following the cluster as
workers join, and retiring superseded model plugins. Each runs only once the worker started
and reports to the piece it serves, never back to the service; a failed round is logged and
tried again at the next."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import faust
from faust.types import TP

from inference.client.cluster import InferenceCluster
from inference.settings import Settings
from streams.service.capacity import BatchSlots
from streams.service.liveness import LivenessWatch
from streams.service.metrics import StreamMetrics

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 10.0
RETIRE_INTERVAL_S = 60.0
MODEL_INTERVAL_S = 2.0  # how often the model topic is read for new `model set` commands


def add_timers(
    app: faust.App,
    settings: Settings,
    cluster: InferenceCluster,
    slots: BatchSlots,
    liveness: LivenessWatch,
    counters: StreamMetrics,
    *,
    started: Callable[[], bool],
    draining: Callable[[], bool],
    assigned: Callable[[], set[TP]],
    excused: Callable[[TP], bool],
    follow_models: Callable[[], Awaitable[None]],
) -> None:
    """``started``: connected to the cluster; ``draining``: stopping; ``assigned``: the input partitions held now;
    ``excused``: a partition whose agent waits for a batch slot (never stalled)."""

    @app.timer(LAG_INTERVAL_S)
    async def measure_lag() -> None:
        liveness.measure_lag(app, assigned())

    @app.timer(min(LAG_INTERVAL_S, settings.worker.stall_s / 3))
    async def watch_partitions() -> None:
        if started() and not draining():
            try:
                await liveness.watch(app, assigned(), excused)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not check the input partitions' progress: %s", exc)

    @app.timer(LAG_INTERVAL_S)
    async def follow_the_cluster() -> None:
        if started():
            try:
                slots.grow(sum((await cluster.threads()).values()))  # refreshes cluster.workers
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not count the cluster's task threads: %s", exc)
            counters.workers_without_model(cluster.without_model())

    @app.timer(MODEL_INTERVAL_S)
    async def follow_model_commands() -> None:
        if started() and not draining():
            try:
                await follow_models()  # a swap loads in the background: batches go on meanwhile
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not follow the model topic: %s", exc)

    @app.timer(RETIRE_INTERVAL_S)
    async def retire_superseded_models() -> None:
        if started():
            try:
                await cluster.retire_superseded(idle_s=max(RETIRE_INTERVAL_S, settings.batch.timeout_s))
            except Exception as exc:  # noqa: BLE001 - housekeeping; the next round tries again
                log.warning("could not retire superseded model plugins: %s", exc)
