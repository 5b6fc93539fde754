"""Dask worker side: the plugin that keeps the model resident, and the batch task.

Each worker builds the model once, in ``ResidentModel.setup`` (in a thread); ``classify_batch``
tasks use it and never rebuild it. The model and what runs it (``inference.worker.runtime``: torch,
torchvision, the decoders) are imported only when a worker loads it: the stream worker and the
other clients import this module for the plugin and the task, and never pay for torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from distributed import Worker, WorkerPlugin, get_worker
from distributed.worker import thread_state

from inference.errors import InferenceError, ModelLoadFailed, ModelNotResident
from inference.records.objects import pinned
from inference.settings import ImageSettings, ModelSettings, StorageSettings, load_settings

if TYPE_CHECKING:
    from inference.worker.model import LoadedModel
    from inference.worker.runtime import BatchRunner

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "visionstream-model-"
STDOUT_TO_STDERR_ENV = "VISIONSTREAM_STDOUT_TO_STDERR"  # set by the embedded cluster for its workers
EMBEDDED_ENV = "VISIONSTREAM_EMBEDDED_WORKER"  # likewise: a worker whose client shares its terminal
LOAD_WAIT_S = 30.0  # the longest a batch waits on a worker for its model to finish loading; then it goes elsewhere
RELOAD_BACKOFF_S = (5.0, 300.0)  # after a failed load, the first and the longest pause before a batch tries again
# Part of every plugin's name: a plugin pickled by an earlier release (other attributes) that a
# standing scheduler still holds is never set up by this code under the same name.
PLUGIN_FORMAT = 2


class ResidentModel(WorkerPlugin):
    """Loads the model once per worker (a ``BatchRunner``) and keeps it until teardown."""

    idempotent = True  # a second stream worker with the same settings reuses the resident model

    def __init__(
        self, model: ModelSettings, images: ImageSettings, storage: StorageSettings, warmup_batch: int = 60, lineage: str | None = None
    ) -> None:
        # The plugin is pickled to the scheduler and kept there: it carries no credentials.
        # Each worker takes them from its own environment, config file or instance role.
        storage = storage.without_credentials()
        self.model_settings, self.image_settings, self.storage_settings = model, images, storage
        self.warmup_batch = warmup_batch  # the batch size a compiled model is specialised for at start-up
        self.name = plugin_name(model, images, storage, warmup_batch)
        # who registered it, e.g. "stream:<consumer group>": a newer configuration of the same
        # line supersedes it; another line's (another deployment, a notebook: None) never does
        self.lineage = lineage
        self.runner: BatchRunner | None = None
        self.loads = 0
        self.active_batches = 0  # batches running or waiting for the model on this worker
        self.failure: str | None = None  # why the last load failed
        self.failed_loads = 0  # consecutive

    def with_model(self, model: ModelSettings) -> ResidentModel:
        """The same configuration with another model (a hot swap's candidate), of the same line."""
        return ResidentModel(model, self.image_settings, self.storage_settings, self.warmup_batch, self.lineage)

    async def setup(self, worker: Worker) -> None:
        """Dask calls this on the worker's event loop: the model loads in a thread (a download,
        a checkpoint read, CUDA start-up and graph capture take seconds to minutes), so the loop
        is not held meanwhile (a running worker keeps its heartbeats). Dask lists the plugin
        before setup ends: a batch that arrives meanwhile waits for ``ready``
        (``classify_batch``), and finds ``loaded`` set only when everything loaded.

        A load that fails is tried again by a later batch (``ensure_loaded``): the scheduler
        keeps the registered plugin and never sets it up on this worker again."""
        logging.getLogger("distributed.worker").addFilter(_said_already)  # once per logger: a set
        _log_to_stderr()
        if os.environ.get(STDOUT_TO_STDERR_ENV) == "1":
            _stdout_to_stderr()
        self.ready = threading.Event()
        self.reload_lock = threading.Lock()
        self.retry_at = 0.0
        self.last_used = time.monotonic()  # this worker's clock: the client's means nothing here
        try:
            await asyncio.to_thread(self._load_recording, worker)
        finally:
            self.last_used = time.monotonic()  # a slow load is not idleness: a swap's candidate is not retired as it lands
            self.ready.set()

    def _load_recording(self, worker: Worker) -> None:
        """``load``, remembering why it failed and when to try again."""
        try:
            self.load(worker)
        except BaseException as exc:
            self.failed_loads += 1
            self.failure = f"{type(exc).__name__}: {exc}"[:500]
            first, longest = RELOAD_BACKOFF_S
            self.retry_at = time.monotonic() + min(longest, first * 2 ** (self.failed_loads - 1))
            # An embedded cluster's client prints a first failure of ours (bad weights, a bad
            # setting) as its one line, on the same terminal: here it is a detail
            reported = os.environ.get(EMBEDDED_ENV) == "1" and isinstance(exc, InferenceError) and self.failed_loads == 1
            log.log(logging.DEBUG if reported else logging.ERROR, "model %s failed to load on %s (attempt %d): %s",
                    self.name, worker.address, self.failed_loads, self.failure)
            raise
        self.failure, self.failed_loads = None, 0

    @property
    def loaded(self) -> LoadedModel | None:
        """The resident model, once everything a batch needs is ready."""
        runner = getattr(self, "runner", None)  # absent on a plugin pickled by an earlier release
        return runner.loaded if runner is not None else None

    def ensure_loaded(self, worker: Worker) -> BatchRunner:
        """The resident model's runner. A batch waits at most ``LOAD_WAIT_S`` for a model still loading
        (a load can take minutes: the batch's deadline must not pay for it, it goes to another
        worker or tries again). Where the last load failed and its backoff has passed, the
        model is loaded again in the background (a checkpoint that was missing, a download that
        broke, memory that was short). Raises ModelLoadFailed, with the reason, meanwhile."""
        self.ready.wait(LOAD_WAIT_S)
        runner = self.runner
        if runner is not None:
            return runner
        if not self.ready.is_set():
            raise ModelLoadFailed(self.name, worker.address, "still loading")
        with self.reload_lock:  # one reload at a time
            if self.runner is None and time.monotonic() >= self.retry_at:
                log.warning("loading model %s again on %s (the last load failed: %s)", self.name, worker.address, self.failure)
                self.ready.clear()
                threading.Thread(target=self._reload, args=(worker,), name="visionstream-reload", daemon=True).start()
        raise ModelLoadFailed(self.name, worker.address, self.failure or "still loading")

    def _reload(self, worker: Worker) -> None:
        try:
            self._load_recording(worker)
        except Exception:  # noqa: BLE001 - recorded, with its backoff, by _load_recording
            pass
        finally:
            self.ready.set()

    def load(self, worker: Worker) -> None:
        """Build the model and everything a batch needs, once; blocking. ``runner`` is set last,
        and only when all of it (the warm-up too) succeeded."""
        from inference.worker.runtime import BatchRunner, RunnerSettings  # torch and the decoders: only where a model runs

        self.storage_settings = with_local_credentials(self.storage_settings)
        cores = max(1, host_cores() // max(1, _local_workers(worker)))  # this worker's share
        runner = BatchRunner.start(RunnerSettings(self.model_settings, self.image_settings, self.storage_settings, worker.address, cores, self.warmup_batch))
        self.loads += 1
        self.runner = runner

    def teardown(self, worker: Worker) -> None:
        runner, self.runner = getattr(self, "runner", None), None  # absent when setup failed
        if runner is not None:
            runner.close()


def plugin_name(model: ModelSettings, images: ImageSettings, storage: StorageSettings, warmup_batch: int) -> str:
    """One plugin per distinct configuration: stream workers sharing a cluster with the same
    settings share one resident model (registration is idempotent), and a different model
    gets its own instead of replacing one that batches are using. Credentials are not part
    of a configuration: a rotated secret keeps the same resident model."""
    public = storage.without_credentials()
    material = json.dumps(
        [model.model_dump(mode="json", exclude={"canary"}), images.model_dump(mode="json"), public.model_dump(mode="json"), warmup_batch, PLUGIN_FORMAT],
        sort_keys=True,
    )
    return PLUGIN_PREFIX + hashlib.sha256(material.encode()).hexdigest()[:12]


def with_local_credentials(storage: StorageSettings) -> StorageSettings:
    """This worker's own storage credentials (VISIONSTREAM_STORAGE__* or its config file);
    none set: boto3's chain (AWS_* variables, instance role) applies."""
    local = load_settings().storage
    if local.access_key_id is None and local.secret_access_key is None:
        return storage
    return storage.model_copy(update={"access_key_id": local.access_key_id, "secret_access_key": local.secret_access_key})


BATCH_STARTED_TOPIC = "visionstream-batch-started"  # a worker's event: {"key": the task's key}, as it starts classifying


def classify_batch(
    plugin: str, uris: list[str], truth_pattern: str, pins: list[list[str | None] | None] | None = None
) -> list[dict[str, Any]]:
    """The Dask task: classify ``uris`` with this worker's resident model ``plugin``; ``pins``
    (``inference.records.objects.pins``) names the object version each event announced.

    Returns plain JSON-ready dicts (no tensors, nothing pickled beyond Dask's own transport).
    Raises ModelNotResident where the plugin is missing (the scheduler restarted and the
    worker re-registered without it): the client registers it again and retries; and
    ModelLoadFailed where its model could not be loaded here (tried again after a backoff).
    """
    worker = get_worker()
    resident = worker.plugins.get(plugin)
    if resident is None or not hasattr(resident, "ready"):  # not registered here, or not set up yet
        raise ModelNotResident(plugin, worker.address)
    resident.active_batches += 1  # waiting for the model counts: a busy plugin is never retired
    try:
        runner = resident.ensure_loaded(worker)
        _say_started(worker)
        return [result.to_dict() for result in runner.classify(pinned(uris, pins), truth_pattern)]
    finally:
        resident.active_batches -= 1
        resident.last_used = time.monotonic()


def plugin_state(name: str, dask_worker: Worker) -> dict[str, Any]:
    """On a worker (``client.run``): whether the plugin ``name`` is here, its model loaded (and
    its version), still loading, or failed (and why)."""
    plugin = dask_worker.plugins.get(name)
    if plugin is None or not hasattr(plugin, "ready"):
        return {"present": plugin is not None, "loaded": False, "version": None, "failure": None}
    loaded = plugin.loaded
    return {
        "present": True,
        "loaded": loaded is not None,
        "version": loaded.info.version if loaded is not None else None,
        "failure": None if loaded is not None or not plugin.ready.is_set() else plugin.failure,
    }


def _say_started(worker: Worker) -> None:
    """Tell the batch's client it starts now (an event on the scheduler): ``batch.timeout_s``
    counts from here, not from the time queued behind other batches or a model load. Outside a
    Dask task (no key), nothing to say; an event that cannot be sent costs only the precision
    of that deadline."""
    key = getattr(thread_state, "key", None)
    if key is None:
        return
    try:
        worker.log_event(BATCH_STARTED_TOPIC, {"key": key})
    except Exception as exc:  # noqa: BLE001 - never the batch's failure
        log.warning("could not tell the scheduler a batch started: %s", exc)


def _stdout_to_stderr() -> None:
    """Everything this process writes to stdout (a library's print, a download's progress) goes
    to stderr: an embedded cluster's workers share the client's stdout, which may carry records."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _said_already(record: logging.LogRecord) -> bool:
    """distributed's traceback for a model plugin whose setup raised: the plugin logged the
    failure in one line already (``_load_recording``, every failure of a load)."""
    failed = record.msg == "Worker plugin %s failed to setup" and str((record.args or ("",))[0]).startswith(PLUGIN_PREFIX)
    return not failed


LEGACY_LINEAGE = "legacy"  # a plugin pickled by a release that recorded no lineage


def plugin_usage(dask_worker: Worker) -> dict[str, tuple[int, float, str | None]]:
    """Run on a worker: for each visionstream plugin, (batches running or waiting, seconds since
    last used, its lineage), by this worker's own clock. A plugin still loading counts as busy."""
    now = time.monotonic()
    usage: dict[str, tuple[int, float, str | None]] = {}
    for name, plugin in dask_worker.plugins.items():
        if not name.startswith(PLUGIN_PREFIX):
            continue
        ready = getattr(plugin, "ready", None)
        loading = ready is None or not ready.is_set()
        active = getattr(plugin, "active_batches", 0) + int(loading)
        usage[name] = (active, now - getattr(plugin, "last_used", now), getattr(plugin, "lineage", LEGACY_LINEAGE))
    return usage


def _log_to_stderr() -> None:
    """visionstream's worker-side lines (how the model runs, when it switches to compiled, why a
    load failed) at INFO on the worker's stderr, where nothing else configured logging: Dask
    configures its own loggers only, and Python's last-resort handler shows warnings alone."""
    import multiprocessing

    logger = logging.getLogger("inference")
    if multiprocessing.parent_process() is None or logger.handlers or logging.getLogger().handlers:
        return  # not a worker process of its own (processes=False: the caller's logging decides)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def model_health(dask_worker: Worker, name: str) -> dict[str, Any]:
    """Run on a worker: whether model plugin ``name`` is loaded there, why not, and how its
    forward pass runs (``BatchRunner.forward_path``)."""
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return {"loaded": False, "reason": "not registered"}
    runner = getattr(plugin, "runner", None)
    return {
        "loaded": plugin.loaded is not None,
        "reason": getattr(plugin, "failure", None),
        "loads": plugin.loads,
        "forward": runner.forward_path if runner is not None else None,
    }


def _local_workers(worker: Worker) -> int:
    """Workers sharing this machine's cores, so torch threads are not oversubscribed."""
    return int(os.environ.get("VISIONSTREAM_LOCAL_WORKERS", "1") or 1)


def host_cores() -> int:
    """The cores this worker's host (or pod) may use: ``VISIONSTREAM_CPUS`` where set (the Helm
    chart sets it to the pod's CPU request), else every core the machine has."""
    given = os.environ.get("VISIONSTREAM_CPUS", "").strip()
    try:
        return max(1, int(float(given))) if given else (os.cpu_count() or 1)
    except ValueError:
        return os.cpu_count() or 1

