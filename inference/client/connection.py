"""The connection to the Dask cluster: connect to a standing scheduler or start the embedded
cluster, register the model plugin on every worker, reconnect after a scheduler restart, close.
``InferenceCluster`` (``inference.client.cluster``) submits batches over it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed import Client
from distributed.security import Security

from inference.client.embedded import embedded_cluster
from inference.errors import ClusterUnavailable, ConfigError, InferenceError
from inference.settings import ClusterSettings, ImageSettings, ModelSettings, StorageSettings
from inference.worker.plugin import ResidentModel

log = logging.getLogger(__name__)


class ClusterConnection:
    """A client of the cluster with the model plugin registered; ``connected`` runs after each
    (re)connection."""

    def __init__(
        self,
        cluster: ClusterSettings,
        model: ModelSettings,
        images: ImageSettings,
        storage: StorageSettings,
        batch_size: int = 60,
        lineage: str | None = None,
    ) -> None:
        self.settings = cluster
        self.plugin = ResidentModel(model, images, storage, warmup_batch=batch_size, lineage=lineage)
        self._worker_env = storage.credentials_env()  # for the embedded cluster's workers only
        self.security: Security | None = None  # a caller's own client's (the Python API); else from ``cluster``
        self.client: Client | None = None
        self._local: Any = None
        self.workers: dict[str, int] = {}  # task threads per worker, as last seen (``threads``)

    def use_model(self, model: ModelSettings) -> None:
        """Before ``start``: register ``model`` instead of the configuration's (a hot swap in force)."""
        self.plugin = self.plugin.with_model(model)

    @property
    def address(self) -> str:
        return self.settings.scheduler or (self._local.scheduler_address if self._local else "embedded")

    async def __aenter__(self) -> Any:  # the subclass itself
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            if self.settings.scheduler:
                self.client = await self._connect()
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
        await self.connected()
        threads = await self.threads()
        if not threads:
            log.warning("Dask cluster %s has no workers yet; batches wait until one joins", self.address)
        log.info("Dask cluster %s ready: %d worker(s) with the model resident", self.address, len(threads))

    async def _connect(self) -> Client:
        return await Client(
            self.settings.scheduler, asynchronous=True, timeout=self.settings.connect_timeout_s,
            security=self.security or client_security(self.settings),
        )

    async def connected(self) -> None:
        """After each connection, the first and every reconnection: what follows the scheduler."""

    async def threads(self) -> dict[str, int]:
        """Task threads per worker address."""
        assert self.client is not None
        self.workers = dict(await self.client.nthreads())
        return dict(self.workers)

    def plugins(self) -> list[ResidentModel]:
        """The model plugins this client keeps registered: the model in use."""
        return [self.plugin]

    async def _register(self) -> None:
        """Register the model plugins (``plugins``): the scheduler keeps them and sets them up on
        every worker, including workers that join later. Waits for the workers' set-up for at
        most ``cluster.setup_timeout_s``."""
        assert self.client is not None
        try:
            for plugin in self.plugins():
                await asyncio.wait_for(self.client.register_plugin(plugin, name=plugin.name), timeout=self.settings.setup_timeout_s)
        except TimeoutError as exc:
            raise ClusterUnavailable(
                self.address, f"the model was not set up on the workers within {self.settings.setup_timeout_s:g} s (cluster.setup_timeout_s)"
            ) from exc

    async def _reconnect(self) -> None:
        """A new client after the old one gave up on a scheduler that went away."""
        log.warning("reconnecting to Dask scheduler %s", self.address)
        old, self.client = self.client, None
        if old is not None:
            await old.close()
        try:
            self.client = await self._connect()
            await self._register()
            await self.connected()
        except (OSError, TimeoutError) as exc:
            raise ClusterUnavailable(self.address, f"reconnect failed: {exc}") from exc

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


def _plugin_loads(name: str, dask_worker: Any) -> int:
    plugin = dask_worker.plugins.get(name)
    return plugin.loads if plugin is not None else 0


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
