"""Submit batches to the persistent Dask cluster, with the model resident on every worker (adapter).

``InferenceCluster`` runs batches over its connection (``connection``: connect or start the
cluster, register the model, reconnect). What it follows beside it lives in modules of its own:
the deaths of workers with our batches on them (``death_watch``), the workers whose model failed
to load (``health``), the cluster-wide isolation lease (``isolation``), retiring superseded
model plugins (``retirement``) and the embedded cluster it starts when no scheduler is given
(``embedded``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from distributed import Client, KilledWorker

from inference.client.canary import Canary
from inference.client.connection import ClusterConnection
from inference.client.death_watch import DeathWatch
from inference.client.deaths import DeathTally, batch_digest, batch_key, key_digest
from inference.client.health import WorkerHealth
from inference.client.isolation import IsolationLease
from inference.client.retirement import retire_superseded
from inference.client.verdicts import VerdictBook
from inference.errors import ClusterUnavailable, ModelLoadFailed, ModelNotResident, ModelSwapFailed, WorkerLost
from inference.records.objects import pins
from inference.records.results import ImageResult
from inference.settings import ClusterSettings, ImageSettings, ModelSettings, Settings, StorageSettings
from inference.worker.plugin import classify_batch, plugin_state

log = logging.getLogger(__name__)

SWAP_POLL_S = 0.5  # how often a swap asks the workers whether the new model loaded


class InferenceCluster(ClusterConnection):
    """An asynchronous handle on the cluster, with the model resident on every worker.

    Use as ``async with InferenceCluster(...) as cluster: await cluster.classify(uris)``.
    Workers that join later get the model too (the plugin is registered with the scheduler).
    """

    def __init__(
        self,
        cluster: ClusterSettings,
        model: ModelSettings,
        images: ImageSettings,
        storage: StorageSettings,
        truth_pattern: str,
        batch_size: int = 60,
        lineage: str | None = None,
    ) -> None:
        super().__init__(cluster, model, images, storage, batch_size, lineage)
        self.truth_pattern = truth_pattern
        self.health = WorkerHealth()
        self.death_watch = DeathWatch()
        self.lease = IsolationLease()
        self.canary: Canary | None = None  # a candidate model taking a share of the images

    @classmethod
    def from_settings(cls, settings: Settings, lineage: str | None = None) -> InferenceCluster:
        return cls(settings.cluster, settings.model, settings.images, settings.storage, settings.truth.pattern, settings.batch.size, lineage)

    async def connected(self) -> None:
        self.lease.forget()  # a lease of the old scheduler's, after a reconnect
        await self.death_watch.follow(self.client, self.settings.connect_timeout_s)

    def tally_deaths(self, uris: list[str]) -> DeathTally:
        """How often Dask workers died with these images on them (any stream worker's attempts)."""
        return self.death_watch.tally(uris)

    def starts(self, uris: list[str]) -> AbstractContextManager[asyncio.Event]:
        """An event set once a worker starts classifying the next attempt at ``uris``
        (``batch.timeout_s`` counts from there)."""
        self.death_watch.subscribe(self.client)
        return self.death_watch.starts(uris)

    @property
    def verdicts(self) -> VerdictBook:
        """What isolations found so far, on the scheduler (``inference.client.verdicts``)."""
        return VerdictBook(self.client)

    def last_batch_start(self) -> float:
        """When a worker last started classifying a batch, any client's (``time.monotonic``)."""
        return self.death_watch.last_start

    @asynccontextmanager
    async def isolation(self) -> AsyncIterator[None]:
        """Hold the cluster-wide isolation lease while one stream worker runs suspects alone;
        the others hold their new batches meanwhile (``wait_while_isolating``)."""
        assert self.client is not None
        async with self.lease.held(self.client):
            yield

    async def wait_while_isolating(self, deadline_s: float) -> None:
        """Hold a new batch while another stream worker isolates a worker-killer, for at most ``deadline_s``."""
        await self.lease.wait_while_others_hold(self.client, deadline_s)

    async def others_processing(self, uris: list[str]) -> int:
        """Batches of ours, other than attempts at ``uris``, processing on the cluster now."""
        assert self.client is not None
        processing = await self.client.processing()
        digest = batch_digest(uris)
        return sum(
            1 for keys in processing.values() for key in keys
            if (other := key_digest(key)) is not None and other != digest
        )

    async def classify(self, uris: list[str], priority: int = 0) -> list[ImageResult]:
        """Run one batch on the cluster; per-image failures are inside the results.

        Raises ClusterUnavailable (scheduler gone), WorkerLost (workers died with the batch on
        them: a second death for images never seen at one before, the first for images that
        were; Dask's own limit is four, each a restart and a model load), or the task's own
        error (a failed forward pass, storage down).
        Cancelling the caller cancels the batch on the cluster too.
        """
        deaths_allowed = 0 if self.death_watch.seen_dying(uris) else 1
        try:
            return await self._submit(uris, priority, deaths_allowed)
        except ModelLoadFailed as exc:
            self.health.avoid(exc)
            raise  # retried by the caller, on the other workers while this one backs off
        except ModelNotResident as exc:
            # The scheduler restarted and its workers re-registered without the plugin.
            log.warning("%s; registering it again", exc)
            await self._register()
        try:
            return await self._submit(uris, priority, deaths_allowed)
        except ModelLoadFailed as exc:
            self.health.avoid(exc)
            raise
        except ModelNotResident as exc:
            raise ClusterUnavailable(self.address, str(exc)) from exc

    def healthy(self, reported: Mapping[str, Any]) -> list[str]:
        """The workers of ``reported`` (address -> anything) that batches may go to now."""
        return self.health.healthy(reported)

    def without_model(self) -> int:
        """Workers, of those last seen, whose model failed to load and that batches avoid now."""
        return self.health.without_model(self.workers)

    def model_trouble(self) -> str | None:
        """Why no worker (of those last seen) can take a batch now, if none can: for readiness."""
        return self.health.trouble(self.workers)

    async def _submit(self, uris: list[str], priority: int, deaths_allowed: int) -> list[ImageResult]:
        """One task for the batch, or two where a canary takes its share of the images (each
        task's key carries the whole batch's digest: deaths, starts and isolation see one batch)."""
        canary = self.canary
        serving, candidate = canary.split(uris) if canary is not None else (list(range(len(uris))), [])
        if not candidate:
            return await self._submit_to(self.plugin.name, uris, uris, priority, deaths_allowed)
        if not serving:
            return await self._submit_to(canary.plugin.name, uris, uris, priority, deaths_allowed)
        parts = await asyncio.gather(
            self._submit_to(self.plugin.name, [uris[i] for i in serving], uris, priority, deaths_allowed),
            self._submit_to(canary.plugin.name, [uris[i] for i in candidate], uris, priority, deaths_allowed),
        )
        merged: dict[int, ImageResult] = dict(zip(serving + candidate, parts[0] + parts[1], strict=True))
        return [merged[index] for index in range(len(uris))]

    async def _submit_to(self, plugin: str, uris: list[str], batch: list[str], priority: int, deaths_allowed: int) -> list[ImageResult]:
        if self.settings.scheduler and (self.client is None or self.client.status in ("closing", "closed")):
            await self._reconnect()
        if self.client is None:
            raise ClusterUnavailable(self.address, "not started")
        client = self.client
        placement = self.health.placement(await self.threads()) if self.health.unhealthy else {}
        self.death_watch.subscribe(client)
        key = batch_key(batch)  # names the images: deaths count against them, whoever submits them
        future = client.submit(
            classify_batch, plugin, [str(uri) for uri in uris], self.truth_pattern, pins(uris),
            key=key, priority=priority, **placement,
        )
        with self.death_watch.watching(key, uris) as died:
            try:
                records = await self._await_batch(future, died, deaths_allowed)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    await asyncio.shield(_cancel(client, future))  # a deadline or shutdown: free the worker
                    raise
                raise ClusterUnavailable(self.address, "the batch was cancelled (scheduler connection lost)") from exc
            except KilledWorker as exc:
                raise WorkerLost(self.address, str(exc)[:300]) from exc
            except (OSError, TimeoutError) as exc:
                raise ClusterUnavailable(self.address, f"{type(exc).__name__}: {exc}") from exc
        self.health.loaded(records[0].get("worker") if records else None)
        self.death_watch.cleared(uris)  # classified: they did not kill this worker
        return [ImageResult.from_dict(record) for record in records]

    async def _await_batch(self, future: Any, died: asyncio.Event, deaths_allowed: int) -> Any:
        """The batch's records; give up (WorkerLost) once more than ``deaths_allowed`` workers
        died with it, rather than waiting for Dask's own limit (each death costs a restart and a
        model load)."""
        waiting = asyncio.ensure_future(future)
        watching: asyncio.Future[Any] | None = None
        deaths = 0
        try:
            while True:
                died.clear()
                watching = asyncio.ensure_future(died.wait())
                done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    return waiting.result()
                deaths += 1
                if deaths > deaths_allowed:
                    waiting.cancel()
                    await _cancel(self.client, future)
                    raise WorkerLost(self.address, f"{deaths} worker(s) died with the batch on them")
        finally:
            for task in (waiting, watching):
                if task is not None and not task.done():
                    task.cancel()

    async def swap(self, model: ModelSettings) -> str:
        """Load ``model`` on every worker beside the one in use, then send the next batches to
        it (those in flight finish on the plugin they were submitted with); returns the version
        the workers loaded. Raises ModelSwapFailed, the model in use kept, where it did not load
        on every worker within ``cluster.setup_timeout_s``; the candidate is unregistered."""
        candidate, version = await self._load_candidate(model)
        self.plugin = candidate
        if self.canary is not None and self.canary.plugin.name == candidate.name:
            self.canary = None  # promoted: all of the images are its now
        return version

    async def start_canary(self, model: ModelSettings, share: float) -> str:
        """Load ``model`` on every worker beside the one in use and send it ``share`` of the
        images (``inference.client.canary``); returns the version loaded. ModelSwapFailed as
        ``swap``, the canary then not started."""
        candidate, version = await self._load_candidate(model)
        self.canary = Canary(candidate, share, version)
        return version

    def end_canary(self) -> None:
        """Every image to the serving model again; the candidate is retired once idle."""
        self.canary = None

    async def serving_version(self) -> str | None:
        """The version of the model in use, as the workers loaded it (None: none has it loaded)."""
        if self.client is None:
            return None
        states = await self.client.run(plugin_state, self.plugin.name)
        return next((state["version"] for state in states.values() if state["loaded"]), None)

    async def _load_candidate(self, model: ModelSettings) -> tuple[Any, str]:
        if self.client is None:
            raise ModelSwapFailed("none", "not connected to the cluster")
        candidate = self.plugin.with_model(model)
        deadline = asyncio.get_running_loop().time() + self.settings.setup_timeout_s
        serving = {plugin.name for plugin in self.plugins()}
        try:
            await asyncio.wait_for(self.client.register_plugin(candidate, name=candidate.name), timeout=self.settings.setup_timeout_s)
            versions = await self._loaded_everywhere(candidate.name, deadline)
        except Exception as exc:  # noqa: BLE001 - a worker's load error, a timeout, the scheduler gone
            if candidate.name not in serving:  # never the model in use: asked for again, it failed somewhere
                await self._unregister(candidate)
            if isinstance(exc, ModelSwapFailed):
                raise
            raise ModelSwapFailed(candidate.name, (str(exc) or type(exc).__name__)[:500]) from exc
        return candidate, ", ".join(sorted(versions))

    async def _loaded_everywhere(self, name: str, deadline: float) -> set[str]:
        """Until every worker has loaded plugin ``name`` (its versions), or one failed (ModelSwapFailed)."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        while True:
            states = await self.client.run(plugin_state, name)
            failed = {address: state["failure"] for address, state in states.items() if state["failure"]}
            if failed:
                address, why = sorted(failed.items())[0]
                raise ModelSwapFailed(name, f"on {address}: {why}")
            if states and all(state["loaded"] for state in states.values()):
                return {state["version"] or "unknown" for state in states.values()}
            if loop.time() > deadline:
                raise ModelSwapFailed(name, f"not loaded on every worker within cluster.setup_timeout_s ({self.settings.setup_timeout_s:g} s)")
            await asyncio.sleep(SWAP_POLL_S)

    async def _unregister(self, candidate: Any) -> None:
        try:
            if self.client is not None:
                await self.client.unregister_worker_plugin(candidate.name)
        except Exception as exc:  # noqa: BLE001 - retirement removes it later
            log.warning("could not unregister the model that failed to load (%s): %s", candidate.name, exc)

    async def retire_superseded(self, idle_s: float) -> list[str]:
        """Unregister the model plugins this one superseded (``retirement``); a canary's stays."""
        if self.client is None:
            return []
        return await retire_superseded(self.client, self.plugin, idle_s, {plugin.name for plugin in self.plugins()})

    def plugins(self) -> list[Any]:
        """The model in use, and a canary's candidate beside it (registered again after a scheduler restart too)."""
        return [self.plugin, *([self.canary.plugin] if self.canary is not None else [])]

async def _cancel(client: Client, future: Any) -> None:
    try:
        await asyncio.wait_for(client.cancel([future]), timeout=5.0)  # a hung scheduler must not extend the deadline
    except Exception as exc:  # noqa: BLE001 - best effort: the scheduler may be gone already
        log.debug("could not cancel a batch: %s", exc)
