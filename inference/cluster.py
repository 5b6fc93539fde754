"""Connect to, or start, the persistent Dask cluster; register the model; submit batches (adapter)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from distributed import Client, KilledWorker, Nanny, Scheduler, Semaphore, SpecCluster
from distributed.security import Security
from distributed.system import MEMORY_LIMIT

from inference.deaths import Death, DeathTally, batch_digest, batch_key, deaths_from_events, key_digest, tally

from inference.errors import ClusterUnavailable, ConfigError, InferenceError, ModelLoadFailed, ModelNotResident, WorkerLost
from inference.objects import identity, pins
from inference.results import ImageResult
from inference.settings import ClusterSettings, ImageSettings, ModelSettings, Settings, StorageSettings
from inference.worker import EMBEDDED_ENV, LEGACY_LINEAGE, STDOUT_TO_STDERR_ENV, ResidentModel, classify_batch, plugin_usage

log = logging.getLogger(__name__)

AVOID_S = (10.0, 300.0)  # how long batches avoid a worker whose model failed to load: first, longest
ISOLATION_LEASE = "visionstream-isolation"  # held, cluster-wide, by the stream worker that isolates a worker-killer
DEATHS_KEPT = 10_000  # the newest worker deaths remembered (a few hundred bytes each)
BUSY_CHECK_S = 1.0  # how often a waiting batch asks whether another stream worker isolates
LEASE_WAIT_S = 120.0  # the longest one stream worker waits for another's isolation before its own
SUBSCRIBE_EVERY_S = 5.0  # a client that reconnects to a restarted scheduler is subscribed to nothing there


@dataclass(slots=True)
class Unhealthy:
    """A worker whose model failed to load: why, how often in a row, and until when to avoid it."""

    reason: str
    failures: int
    until: float  # monotonic


class InferenceCluster:
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
        self.settings = cluster
        self.plugin = ResidentModel(model, images, storage, warmup_batch=batch_size, lineage=lineage)
        self._worker_env = storage.credentials_env()  # for the embedded cluster's workers only
        self.security: Security | None = None  # a caller's own client's (the Python API); else from ``cluster``
        self.truth_pattern = truth_pattern
        self.client: Client | None = None
        self._local: Any = None
        self.unhealthy: dict[str, Unhealthy] = {}  # worker address -> why its model is not loaded
        self.workers: dict[str, int] = {}  # task threads per worker, as last seen (``threads``)
        self.deaths: deque[Death] = deque(maxlen=DEATHS_KEPT)  # the scheduler's record, kept current
        self._death_watch: dict[str, asyncio.Event] = {}  # key of a batch in flight -> set when its worker dies
        self._in_flight: dict[str, list[str]] = {}  # key of a batch in flight -> its URIs
        self.suspects: set[str] = set()  # images (``identity``) that were on a worker when it died (this process's batches)
        self._isolation: Semaphore | None = None
        self._isolating_checked = (0.0, False)  # (monotonic, another stream worker isolates)
        self._subscribed_at = 0.0  # monotonic

    @classmethod
    def from_settings(cls, settings: Settings, lineage: str | None = None) -> InferenceCluster:
        return cls(settings.cluster, settings.model, settings.images, settings.storage, settings.truth.pattern, settings.batch.size, lineage)

    @property
    def address(self) -> str:
        return self.settings.scheduler or (self._local.scheduler_address if self._local else "embedded")

    async def __aenter__(self) -> InferenceCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            if self.settings.scheduler:
                self.client = await Client(
                    self.settings.scheduler, asynchronous=True, timeout=self.settings.connect_timeout_s,
                    security=self.security or client_security(self.settings),
                )
            else:
                # the workers it starts get the storage credentials of this configuration (file,
                # environment or options alike) in their environment; the scheduler never does
                self._local = await embedded_cluster(self.settings, asynchronous=True, env=self._worker_env)
                self.client = await Client(self._local, asynchronous=True)
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            await self.close()
            raise ClusterUnavailable(self.settings.scheduler or "embedded", str(exc) or type(exc).__name__) from exc
        try:
            await self._register()
        except InferenceError:  # WeightsUnavailable, ConfigError: already one clear message
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise ClusterUnavailable(self.address, f"model plugin failed on a worker: {exc}") from exc
        await self._follow_deaths()
        threads = await self.threads()
        if not threads:
            log.warning("Dask cluster %s has no workers yet; batches wait until one joins", self.address)
        log.info("Dask cluster %s ready: %d worker(s) with the model resident", self.address, len(threads))

    async def _follow_deaths(self) -> None:
        """Read the scheduler's record of workers that died with batches of ours on them, and
        follow it from now on (the scheduler pushes each new event)."""
        assert self.client is not None
        try:
            history = await asyncio.wait_for(self.client.get_events("all"), timeout=self.settings.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - an older record is a nicety; new deaths still arrive
            log.warning("could not read the scheduler's event log: %s", exc)
            history = ()
        self.deaths.clear()
        self.deaths.extend(deaths_from_events(history))
        self._subscribe()

    def _subscribe(self) -> None:
        """Ask the scheduler for its events, again every few seconds: Dask's client reconnects
        to a restarted scheduler by itself, and the new scheduler knows no subscription."""
        if self.client is not None and time.monotonic() - self._subscribed_at >= SUBSCRIBE_EVERY_S:
            self.client.subscribe_topic("all", self._on_event)
            self._subscribed_at = time.monotonic()

    def _on_event(self, event: tuple[float, Any]) -> None:
        for death in deaths_from_events([event]):
            self.deaths.append(death)
            for key in death.keys:
                watch = self._death_watch.get(key)
                if watch is not None:
                    watch.set()
                if len(self.suspects) < DEATHS_KEPT:
                    self.suspects.update(identity(uri) for uri in self._in_flight.get(key, ()))

    def tally_deaths(self, uris: list[str]) -> DeathTally:
        """How often Dask workers died with these images on them (any stream worker's attempts)."""
        return tally(self.deaths, uris)

    @asynccontextmanager
    async def isolation(self) -> AsyncIterator[None]:
        """Hold the cluster-wide isolation lease while one stream worker runs suspects alone;
        the others hold their new batches meanwhile (``wait_while_isolating``). The lease
        lapses by itself if its holder dies. Where it cannot be had (a scheduler that just
        restarted), isolation goes on without it: suspects still wait to run alone."""
        assert self.client is not None
        lease: Semaphore | None = None
        try:
            if self._isolation is None:
                self._isolation = await Semaphore(max_leases=1, name=ISOLATION_LEASE, scheduler_rpc=self.client.scheduler, loop=self.client.loop)
            lease = self._isolation
            if not await lease.acquire(timeout=LEASE_WAIT_S):
                log.warning("another stream worker has isolated for %.0f s; isolating beside it", LEASE_WAIT_S)
                lease = None
        except Exception as exc:  # noqa: BLE001 - a lease of a scheduler that is gone
            log.warning("could not take the isolation lease (%s: %s); isolating without it", type(exc).__name__, exc)
            self._isolation, lease = None, None
        try:
            yield
        finally:
            if lease is not None:
                try:
                    await lease.release()
                except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
                    log.warning("could not release the isolation lease: %s", exc)

    async def wait_while_isolating(self, deadline_s: float) -> None:
        """Hold a new batch while another stream worker isolates a worker-killer, for at most ``deadline_s``."""
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up and await self._someone_isolates():
            await asyncio.sleep(BUSY_CHECK_S)

    async def _someone_isolates(self) -> bool:
        checked_at, isolating = self._isolating_checked
        if time.monotonic() - checked_at < BUSY_CHECK_S or self.client is None:
            return isolating
        try:
            leases = await asyncio.wait_for(self.client.scheduler.semaphore_value(name=ISOLATION_LEASE), timeout=5.0)
        except Exception:  # noqa: BLE001 - no lease registered yet, or the scheduler is busy: go on
            leases = 0
        isolating = bool(leases) and not (self._isolation is not None and self._isolation._leases)  # noqa: SLF001 - not our own
        self._isolating_checked = (time.monotonic(), isolating)
        return isolating

    async def others_processing(self, uris: list[str]) -> int:
        """Batches of ours, other than attempts at ``uris``, processing on the cluster now."""
        assert self.client is not None
        processing = await self.client.processing()
        digest = batch_digest(uris)
        return sum(
            1 for keys in processing.values() for key in keys
            if (other := key_digest(key)) is not None and other != digest
        )

    async def threads(self) -> dict[str, int]:
        """Task threads per worker address."""
        assert self.client is not None
        self.workers = dict(await self.client.nthreads())
        return dict(self.workers)

    async def _register(self) -> None:
        """Register the model plugin: the scheduler keeps it and sets it up on every worker,
        including workers that join later. Waits for the workers' set-up for at most
        ``cluster.setup_timeout_s``."""
        assert self.client is not None
        try:
            await asyncio.wait_for(
                self.client.register_plugin(self.plugin, name=self.plugin.name), timeout=self.settings.setup_timeout_s
            )
        except TimeoutError as exc:
            raise ClusterUnavailable(
                self.address, f"the model was not set up on the workers within {self.settings.setup_timeout_s:g} s (cluster.setup_timeout_s)"
            ) from exc

    async def classify(self, uris: list[str], priority: int = 0) -> list[ImageResult]:
        """Run one batch on the cluster; per-image failures are inside the results.

        Raises ClusterUnavailable (scheduler gone), WorkerLost (workers died with the batch on
        them: a second death for images never seen at one before, the first for images that
        were; Dask's own limit is four, each a restart and a model load), or the task's own
        error (a failed forward pass, storage down).
        Cancelling the caller cancels the batch on the cluster too.
        """
        seen_dying = self.tally_deaths(uris).total or not self.suspects.isdisjoint(identity(uri) for uri in uris)
        deaths_allowed = 0 if seen_dying else 1
        try:
            return await self._submit(uris, priority, deaths_allowed)
        except ModelLoadFailed as exc:
            self._avoid(exc)
            raise  # retried by the caller, on the other workers while this one backs off
        except ModelNotResident as exc:
            # The scheduler restarted and its workers re-registered without the plugin.
            log.warning("%s; registering it again", exc)
            await self._register()
        try:
            return await self._submit(uris, priority, deaths_allowed)
        except ModelLoadFailed as exc:
            self._avoid(exc)
            raise
        except ModelNotResident as exc:
            raise ClusterUnavailable(self.address, str(exc)) from exc

    def _avoid(self, failed: ModelLoadFailed) -> None:
        """Send no batch to ``failed.worker`` for a while (doubling while its model keeps
        failing to load); it loads again when the next batch reaches it after that."""
        previous = self.unhealthy.get(failed.worker)
        if previous is not None and previous.until > time.monotonic():
            previous.reason = failed.reason  # the batches in flight meanwhile say the same: no escalation
            return
        failures = (previous.failures if previous else 0) + 1
        first, longest = AVOID_S
        pause = min(longest, first * 2 ** (failures - 1))
        self.unhealthy[failed.worker] = Unhealthy(failed.reason, failures, time.monotonic() + pause)
        log.warning("the model failed to load on Dask worker %s (%s); sending its batches elsewhere for %.0f s", failed.worker, failed.reason, pause)

    def healthy(self, reported: Mapping[str, Any]) -> list[str]:
        """The workers of ``reported`` (address -> anything) that batches may go to now."""
        now = time.monotonic()
        return [address for address in reported if address not in self.unhealthy or self.unhealthy[address].until <= now]

    def without_model(self) -> int:
        """Workers, of those last seen, whose model failed to load and that batches avoid now."""
        return len(self.workers) - len(self.healthy(self.workers))

    def model_trouble(self) -> str | None:
        """Why no worker (of those last seen) can take a batch now, if none can: for readiness."""
        workers = self.workers
        if not workers or self.healthy(workers):
            return None
        reasons = sorted({self.unhealthy[address].reason for address in workers if address in self.unhealthy})
        return f"no Dask worker has the model loaded: {'; '.join(reasons)[:300]}"

    async def _submit(self, uris: list[str], priority: int, deaths_allowed: int) -> list[ImageResult]:
        if self.settings.scheduler and (self.client is None or self.client.status in ("closing", "closed")):
            await self._reconnect()
        if self.client is None:
            raise ClusterUnavailable(self.address, "not started")
        client = self.client
        placement: dict[str, Any] = {}
        if self.unhealthy:
            workers = await self.threads()
            healthy = self.healthy(workers)
            for address in [address for address in self.unhealthy if address not in workers]:
                del self.unhealthy[address]  # gone from the cluster
            if healthy and len(healthy) < len(workers):
                placement = {"workers": healthy, "allow_other_workers": False}
        self._subscribe()
        key = batch_key(uris)  # names the images: deaths count against them, whoever submits them
        future = client.submit(
            classify_batch, self.plugin.name, [str(uri) for uri in uris], self.truth_pattern, pins(uris),
            key=key, priority=priority, **placement,
        )
        died = self._death_watch[key] = asyncio.Event()
        self._in_flight[key] = list(uris)
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
        finally:
            self._death_watch.pop(key, None)
            self._in_flight.pop(key, None)
        worker = records[0].get("worker") if records else None
        if worker in self.unhealthy:
            del self.unhealthy[worker]  # its model loaded after all
        self.suspects.difference_update(identity(uri) for uri in uris)  # classified: they did not kill this worker
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

    async def _reconnect(self) -> None:
        """A new client after the old one gave up on a scheduler that went away."""
        log.warning("reconnecting to Dask scheduler %s", self.address)
        old, self.client = self.client, None
        if old is not None:
            await old.close()
        try:
            self.client = await Client(
                self.settings.scheduler, asynchronous=True, timeout=self.settings.connect_timeout_s,
                security=self.security or client_security(self.settings),
            )
            await self._register()
            self._isolation = None  # a lease of the old scheduler's
            await self._follow_deaths()
        except (OSError, TimeoutError) as exc:
            raise ClusterUnavailable(self.address, f"reconnect failed: {exc}") from exc

    async def retire_superseded(self, idle_s: float) -> list[str]:
        """Unregister the model plugins this one superseded (``superseded``): the workers
        release the old model. Other configurations' and notebook clients' plugins stay."""
        if self.client is None:
            return []
        usage = await self.client.run(plugin_usage)
        retired = superseded(usage, self.plugin.name, self.plugin.lineage, idle_s)
        for name in retired:
            log.info("unregistering model plugin %s: superseded by %s (line %s)", name, self.plugin.name, self.plugin.lineage)
            await self.client.unregister_worker_plugin(name)
        return retired

    async def model_loads(self) -> dict[str, int]:
        """How many times each worker built the model (1 each for a persistent cluster)."""
        assert self.client is not None
        return await self.client.run(_plugin_loads, self.plugin.name)

    async def close(self) -> None:
        if self.client is not None:
            try:
                # first: else the scheduler tries to send this very client its own departure
                self.client.unsubscribe_topic("all")
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.debug("could not unsubscribe from the scheduler's events: %s", exc)
            await self.client.close()
            self.client = None
        if self._local is not None:
            await self._local.close()
            self._local = None


def superseded(usage: Mapping[str, Mapping[str, Sequence[Any]]], own: str, lineage: str | None, idle_s: float) -> list[str]:
    """The plugins ``own`` supersedes, given ``plugin_usage`` of every worker: those of the same
    lineage (an earlier configuration of the same deployment, after a rolling update) and those a
    release without lineages registered, once no batch used them for ``idle_s`` on any worker.
    Another lineage's (two configurations sharing a cluster, a notebook client's) never are; a
    plugin without a lineage of its own (None) supersedes nothing. Workers of an earlier release
    report no lineage: their plugins count as legacy. Pure."""
    if lineage is None:
        return []
    busy: set[str] = set()
    lines: dict[str, set[Any]] = {}
    for per_plugin in usage.values():
        for name, report in per_plugin.items():
            active, idle = report[0], report[1]
            lines.setdefault(name, set()).add(report[2] if len(report) > 2 else LEGACY_LINEAGE)
            if active or idle < idle_s:
                busy.add(name)
    return sorted(name for name, found in lines.items() if name != own and name not in busy and found <= {lineage, LEGACY_LINEAGE})


def embedded_cluster(settings: ClusterSettings, *, asynchronous: bool = False, env: Mapping[str, str] | None = None) -> SpecCluster:
    """The cluster visionstream starts when no scheduler is given; demo, benchmarks and tests use it too.

    Everything listens on 127.0.0.1. On a host with CUDA devices (``cluster.gpu`` auto or true)
    each worker process sees one GPU (``CUDA_VISIBLE_DEVICES``), several workers per GPU where
    the cores allow (``worker_processes``): a worker's fetch, header reads and launches hold its
    GIL, so one process cannot keep a GPU busy. Elsewhere ``cluster.n_workers`` CPU workers
    (default 1). ``env`` reaches every worker process (credentials of an embedded S3 server).
    Await it when ``asynchronous``; close it (or use it as a context manager) when done.
    """
    gpus = _visible_gpus() if settings.gpu is not False else []
    if settings.gpu is True and not gpus:
        raise ClusterUnavailable("embedded", "cluster.gpu is true but no CUDA device is visible")
    # Mutual TLS with a certificate made for this cluster alone (``cluster.tls``): loopback is
    # shared by every local user, and Dask's transport runs whatever a peer sends (pickles).
    security = Security.temporary() if settings.tls else None
    transport = {"security": security, "protocol": "tls://"} if security is not None else {}
    workers = worker_specs(settings, gpus, os.cpu_count() or 1, env or {})
    for spec in workers.values():
        spec["options"].update(transport)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", **transport}}
    _workers_skip_main()
    return EmbeddedCluster(
        workers=workers, scheduler=scheduler, asynchronous=asynchronous, silence_logs=logging.WARNING,
        name="visionstream-embedded", security=security,
    )


_OPEN_EMBEDDED: set[int] = set()  # ids of the embedded clusters open in this process


class EmbeddedCluster(SpecCluster):
    """visionstream's embedded cluster: while one is open, Dask worker processes started in this
    process are prepared without the caller's ``__main__`` (``_workers_skip_main``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _OPEN_EMBEDDED.add(id(self))
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            _OPEN_EMBEDDED.discard(id(self))
            raise

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            _OPEN_EMBEDDED.discard(id(self))


def _workers_skip_main() -> None:
    """Dask worker processes started from here do not run the caller's ``__main__`` again.

    multiprocessing's spawn (Dask's default) re-imports the parent's main module in each child:
    a script that calls ``inference.classify`` at top level, with no ``if __name__ ==
    "__main__":`` guard, would start a cluster again inside each worker process as it boots, which
    multiprocessing refuses, and the caller would wait forever for workers that never come. The
    workers need nothing from the script: they run visionstream's own functions (cloudpickle
    sends anything defined in ``__main__`` by value). So while an embedded cluster is open, the
    preparation of processes Dask's nannies name "Dask Worker process" leaves the main module
    out; every other process, and every process once none is open, is prepared as before."""
    import multiprocessing.spawn as spawn

    original = spawn.get_preparation_data
    if getattr(original, "skips_main_for_dask_workers", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if _OPEN_EMBEDDED and str(name).startswith("Dask Worker process"):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.skips_main_for_dask_workers = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def client_security(settings: ClusterSettings) -> Security | None:
    """How to reach a standing scheduler: mutual TLS where ``cluster.tls_ca``, ``tls_cert`` and
    ``tls_key`` are set (files or PEM text); plain TCP otherwise. ConfigError where they are
    incomplete, or the address is ``tls://`` without them."""
    given = {"tls_ca": settings.tls_ca, "tls_cert": settings.tls_cert, "tls_key": settings.tls_key}
    if any(given.values()):
        missing = [f"cluster.{name}" for name, value in given.items() if not value]
        if missing:
            raise ConfigError(f"TLS to the Dask scheduler needs cluster.tls_ca, tls_cert and tls_key; missing {', '.join(missing)}")
        if settings.scheduler and not settings.scheduler.startswith("tls://"):
            raise ConfigError(f"cluster.tls_* are set but cluster.scheduler {settings.scheduler!r} is not a tls:// address")
        assert settings.tls_key is not None
        return Security(
            tls_ca_file=settings.tls_ca, tls_client_cert=settings.tls_cert,
            tls_client_key=settings.tls_key.get_secret_value(), require_encryption=True,
        )
    if settings.scheduler and settings.scheduler.startswith("tls://"):
        raise ConfigError("cluster.scheduler is a tls:// address: set cluster.tls_ca, tls_cert and tls_key (files or PEM)")
    return None


def reaching(cluster: SpecCluster) -> dict[str, Any]:
    """``cluster`` settings with which another process reaches this embedded cluster: its
    address and, where it runs TLS, its certificate and key (the key is a secret: it travels
    through the child's environment, ``Settings.secrets_env``)."""
    security = cluster.security
    settings: dict[str, Any] = {"scheduler": cluster.scheduler_address}
    if security is not None and security.require_encryption:
        settings |= {"tls_ca": security.tls_ca_file, "tls_cert": security.tls_client_cert, "tls_key": security.tls_client_key}
    return settings


def worker_specs(settings: ClusterSettings, gpus: list[str], cores: int, env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """SpecCluster's worker specifications: ``worker_processes`` nannies on 127.0.0.1, spread
    over ``gpus`` (CUDA_VISIBLE_DEVICES names, each worker sees one) round-robin. Pure."""
    count = worker_processes(settings, len(gpus), cores)
    workers: dict[str, dict[str, Any]] = {}
    for index in range(count):
        # the client's stdout may carry its records (`classify -o -`): the workers print to stderr
        worker_env = {**env, "VISIONSTREAM_LOCAL_WORKERS": str(count), STDOUT_TO_STDERR_ENV: "1", EMBEDDED_ENV: "1"}
        name = f"cpu-{index}"
        if gpus:
            gpu = gpus[index % len(gpus)]
            worker_env["CUDA_VISIBLE_DEVICES"] = gpu
            name = f"gpu{gpu}-{index // len(gpus)}"
        workers[name] = {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": settings.threads_per_worker,
                # a share of the host, but never under 8 GiB where the host has it: a CUDA torch
                # process alone takes several, and Dask pauses a worker at 80 % of its limit
                "memory_limit": max(MEMORY_LIMIT // count, min(MEMORY_LIMIT, 8 << 30)),
                "env": worker_env,
                "silence_logs": logging.WARNING,
            },
        }
    return workers


def worker_processes(settings: ClusterSettings, gpus: int, cores: int) -> int:
    """``cluster.n_workers``, or by default: on a GPU host as many per GPU as there are four
    cores for each (at most 4: two task threads, fetch and decode threads each), else one."""
    if settings.n_workers:
        return settings.n_workers
    if not gpus:
        return 1
    return gpus * max(1, min(4, cores // (4 * gpus)))


async def _cancel(client: Client, future: Any) -> None:
    try:
        await asyncio.wait_for(client.cancel([future]), timeout=5.0)  # a hung scheduler must not extend the deadline
    except Exception as exc:  # noqa: BLE001 - best effort: the scheduler may be gone already
        log.debug("could not cancel a batch: %s", exc)


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them for a child.
    A Linux host without NVIDIA's driver has none, which is known without importing torch
    (hundreds of MB and seconds, in a process that never runs the model)."""
    if sys.platform.startswith("linux") and not os.path.isdir("/proc/driver/nvidia") and not os.path.exists("/dev/dxg"):  # dxg: WSL2's GPU
        return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU cluster
        return []
    named = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return named[:count] if len(named) >= count else [str(index) for index in range(count)]


def _plugin_loads(name: str, dask_worker: Any) -> int:
    plugin = dask_worker.plugins.get(name)
    return plugin.loads if plugin is not None else 0

