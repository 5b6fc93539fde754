"""Dask worker side: the plugin that keeps the model resident, and the batch task.

Each worker builds the model once, in ``ResidentModel.setup`` (in a thread); ``classify_batch`` tasks
use it and never rebuild it. A worker runs several task threads: while one batch holds the
model (one at a time, under a lock), the next is fetched and decoded (on the GPU where the
model is on one, each task thread on a CUDA stream of its own) and the last one's results go
back. Crops travel as uint8 and are normalised on the model's device.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from distributed import Worker, WorkerPlugin, get_worker
from PIL import Image

from inference.errors import ConfigError, ImageError, ModelLoadFailed, ModelNotResident
from inference.fetch import fetch_many
from inference.objects import pinned
from inference.gpu import Decoder, batch_on, device_crops, device_decodable, jpeg_decoder
from inference.images import ImageHeader, decode_crop, read_header
from inference.labels import match_truth, parse_truth
from inference.model import GraphedModel, LoadedModel, load_model, top_k
from inference.results import Failure, ImageResult, Prediction, Timings
from inference.settings import ImageSettings, ModelSettings, StorageSettings, load_settings

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "visionstream-model-"
STDOUT_TO_STDERR_ENV = "VISIONSTREAM_STDOUT_TO_STDERR"  # set by the embedded cluster for its workers
LOAD_WAIT_S = 30.0  # the longest a batch waits on a worker for its model to finish loading; then it goes elsewhere
RELOAD_BACKOFF_S = (5.0, 300.0)  # after a failed load, the first and the longest pause before a batch tries again
# Fault injection for tests and the soak, off unless set in a Dask worker's environment: the
# worker process exits at once when it starts decoding an object whose URI contains this text,
# as a decoder crash would make it. Nothing else reads it.
KILL_SWITCH_ENV = "VISIONSTREAM_FAULT_EXIT_ON"


class ResidentModel(WorkerPlugin):
    """Loads the model once per worker and keeps it, with a decode pool, until teardown."""

    idempotent = True  # a second stream worker with the same settings reuses the resident model

    def __init__(self, model: ModelSettings, images: ImageSettings, storage: StorageSettings, warmup_batch: int = 60) -> None:
        # The plugin is pickled to the scheduler and kept there: it carries no credentials.
        # Each worker takes them from its own environment, config file or instance role.
        storage = storage.without_credentials()
        self.model_settings, self.image_settings, self.storage_settings = model, images, storage
        self.warmup_batch = warmup_batch  # the batch size a compiled model is specialised for at start-up
        self.name = plugin_name(model, images, storage, warmup_batch)
        self.loaded: LoadedModel | None = None
        self.loads = 0
        self.active_batches = 0  # batches running or waiting for the model on this worker
        self.failure: str | None = None  # why the last load failed
        self.failed_loads = 0  # consecutive

    async def setup(self, worker: Worker) -> None:
        """Dask calls this on the worker's event loop: the model loads in a thread (a download,
        a checkpoint read, CUDA start-up and graph capture take seconds to minutes), so the loop
        is not held meanwhile (a running worker keeps its heartbeats). Dask lists the plugin
        before setup ends: a batch that arrives meanwhile waits for ``ready``
        (``classify_batch``), and finds ``loaded`` set only when everything loaded.

        A load that fails is tried again by a later batch (``ensure_loaded``): the scheduler
        keeps the registered plugin and never sets it up on this worker again."""
        logging.getLogger("distributed.worker").addFilter(_said_already)  # once per logger: a set
        if os.environ.get(STDOUT_TO_STDERR_ENV) == "1":
            _stdout_to_stderr()
        self.ready = threading.Event()
        self.reload_lock = threading.Lock()
        self.retry_at = 0.0
        self.last_used = time.monotonic()  # this worker's clock: the client's means nothing here
        try:
            await asyncio.to_thread(self._load_recording, worker)
        finally:
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
            log.error("model %s failed to load on %s (attempt %d): %s", self.name, worker.address, self.failed_loads, self.failure)
            raise
        self.failure, self.failed_loads = None, 0

    def ensure_loaded(self, worker: Worker) -> LoadedModel:
        """The resident model. A batch waits at most ``LOAD_WAIT_S`` for a model still loading
        (a load can take minutes: the batch's deadline must not pay for it, it goes to another
        worker or tries again). Where the last load failed and its backoff has passed, the
        model is loaded again in the background (a checkpoint that was missing, a download that
        broke, memory that was short). Raises ModelLoadFailed, with the reason, meanwhile."""
        self.ready.wait(LOAD_WAIT_S)
        loaded = self.loaded
        if loaded is not None:
            return loaded
        if not self.ready.is_set():
            raise ModelLoadFailed(self.name, worker.address, "still loading")
        with self.reload_lock:  # one reload at a time
            if self.loaded is None and time.monotonic() >= self.retry_at:
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
        """Build the model and everything a batch needs, once; blocking. ``loaded`` is set last,
        and only when all of it (the warm-up too) succeeded."""
        self.storage_settings = with_local_credentials(self.storage_settings)
        cores = max(1, (os.cpu_count() or 1) // max(1, _local_workers(worker)))  # this worker's share
        self.torch_threads = cores
        model = load_model(self.model_settings, self.storage_settings)
        self.loads += 1
        self.model_lock = threading.Lock()
        threads = self.image_settings.decode_threads or cores
        old_pool = getattr(self, "decode_pool", None)
        if old_pool is not None:  # a load tried again: the last attempt's pool goes
            old_pool.shutdown(wait=False, cancel_futures=True)
        # one torch thread per decode thread: the pool itself is the parallelism
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="visionstream-decode", initializer=torch.set_num_threads, initargs=(1,))
        self.worker_address = worker.address
        self.exit_on = os.environ.get(KILL_SWITCH_ENV) or None
        self.device_decoder = _device_decoder(self.image_settings.decode, model.device)
        self.predict: Callable[[torch.Tensor], torch.Tensor] = model.predict
        self.streams = threading.local()
        if self.model_settings.compile or model.device.type == "cuda":
            self._warm_up(model)
        self.loaded = model

    def teardown(self, worker: Worker) -> None:
        pool = getattr(self, "decode_pool", None)  # absent when setup failed
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.predict = None  # type: ignore[assignment]
        self.loaded = None

    def classify(self, uris: list[str], truth_pattern: str) -> list[ImageResult]:
        """Fetch, decode and classify one batch. Per-image fetch and decode failures become those
        images' records; a failed forward pass (out of memory, a lost device, any exception from
        the model) raises, so that the caller retries the whole batch."""
        assert self.loaded is not None, "ResidentModel used before setup"
        loaded = self.loaded
        started = time.perf_counter()
        fetched = fetch_many(uris, self.storage_settings, self.image_settings)
        fetched_at = time.perf_counter()
        with self._task_stream():
            outcomes = self._prepare_all(uris, fetched)
            good = [index for index, item in enumerate(outcomes) if isinstance(item, torch.Tensor)]
            batch = batch_on([outcomes[i] for i in good], loaded.device) if good else None  # type: ignore[misc]
            if batch is not None and batch.is_cuda:
                torch.cuda.current_stream(batch.device).synchronize()  # decoded and on the device before the model is ours
            decoded_at = time.perf_counter()
            with self.model_lock:
                locked_at = time.perf_counter()
                # OpenMP thread counts are per calling thread, and Dask's nannies export
                # OMP_NUM_THREADS=1: set it in the task thread that runs the model.
                if torch.get_num_threads() != self.torch_threads:
                    torch.set_num_threads(self.torch_threads)
                logits = self.predict(batch) if batch is not None else None  # raises: not a per-image failure
            done_at = time.perf_counter()
        timings = Timings(
            fetch_ms=_ms(started, fetched_at),
            decode_ms=_ms(fetched_at, decoded_at),
            queue_ms=_ms(decoded_at, locked_at),
            inference_ms=_ms(locked_at, done_at),
            batch_size=len(uris),
        )
        results: list[Any] = list(outcomes)
        if logits is not None:
            scores, indices = top_k(logits, self.model_settings.top_k)
            for row, index in enumerate(good):
                results[index] = (scores[row].tolist(), indices[row].tolist())
        return [
            build_result(str(uri), outcome, loaded, truth_pattern, timings, self.worker_address)  # a plain str goes back
            for uri, outcome in zip(uris, results, strict=True)
        ]

    def _prepare_all(self, uris: list[str], fetched: list[bytes | ImageError]) -> list[torch.Tensor | Failure]:
        """Per image a uint8 crop (on the model's device where it was decoded there) or a Failure.

        With a device decoder, the plain JPEGs decode on the device in one call (up to
        ``images.device_batch_max_pixels`` of them: full-size pictures in device memory) while
        the decode pool takes the rest; what the device refuses joins the pool's share."""
        if self.device_decoder is None:
            return list(self.decode_pool.map(self._prepare, uris, fetched))
        spec = self.loaded.preprocessing  # type: ignore[union-attr]
        outcomes: list[Any] = [None] * len(uris)
        on_device: list[int] = []
        items: list[tuple[bytes, ImageHeader]] = []
        pending: dict[int, Future[torch.Tensor | Failure]] = {}
        device_pixels = 0
        for index, (uri, data) in enumerate(zip(uris, fetched, strict=True)):
            if isinstance(data, ImageError):
                outcomes[index] = Failure(data.stage, data.reason)
                continue
            try:
                header = read_header(data, uri, self.image_settings.max_pixels, self.image_settings.max_jpeg_scans)
            except ImageError as exc:
                outcomes[index] = Failure(exc.stage, exc.reason)
                continue
            except (MemoryError, torch.OutOfMemoryError):
                raise  # the worker's memory, not the image: the batch is retried
            except Exception as exc:  # noqa: BLE001 - whatever a parser raises, it is this image's alone
                outcomes[index] = Failure("decode", f"{type(exc).__name__}: {exc}"[:500])
                continue
            pixels = header.width * header.height
            if device_decodable(header, data) and device_pixels + pixels <= self.image_settings.device_batch_max_pixels:
                device_pixels += pixels
                on_device.append(index)
                items.append((data, header))
            else:
                pending[index] = self.decode_pool.submit(self._prepare, uri, data)
        if items:
            try:
                crops = device_crops(items, spec, self.device_decoder)
            except Exception:  # noqa: BLE001 - anything the device path did not foresee: the CPU path decides
                log.exception("device decode failed for %d images; decoding them on the CPU", len(items))
                crops = [None] * len(items)
            for index, crop in zip(on_device, crops, strict=True):
                if crop is None:
                    pending[index] = self.decode_pool.submit(self._prepare, uris[index], fetched[index])  # type: ignore[arg-type]
                else:
                    outcomes[index] = crop
        for index, future in pending.items():
            outcomes[index] = future.result()
        return outcomes

    def _prepare(self, uri: str, data: bytes | ImageError) -> torch.Tensor | Failure:
        """The CPU path for one image: a uint8 crop on the CPU, or its Failure."""
        if isinstance(data, ImageError):
            return Failure(data.stage, data.reason)
        if self.exit_on is not None and self.exit_on in uri:
            log.critical("fault injection: %s=%r matches %r; exiting", KILL_SWITCH_ENV, self.exit_on, uri)
            os._exit(70)
        try:
            images = self.image_settings
            spec = self.loaded.preprocessing  # type: ignore[union-attr]
            return decode_crop(data, uri, spec, images.max_pixels, images.draft, images.max_jpeg_scans, images.decode_timeout_s)
        except ImageError as exc:
            return Failure(exc.stage, exc.reason)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the worker's memory, not the image (its pixels are bounded): the batch is retried
        except Exception as exc:  # noqa: BLE001 - one bad image never fails its batch
            return Failure("decode", f"{type(exc).__name__}: {exc}")

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Pay start-up costs before the first batch: torch.compile's compilation, or on a GPU
        cudnn's kernel choice and a CUDA graph for the batch size the stream sends, and one
        decode through nvJPEG (when it fails, images decode on the CPU instead)."""
        torch.set_num_threads(self.torch_threads)
        crop = loaded.preprocessing.crop_size
        if loaded.device.type == "cuda" and not self.model_settings.compile:
            try:
                self.predict = GraphedModel.capture(loaded, self.warmup_batch).predict
            except Exception:  # noqa: BLE001 - eager is slower, not wrong
                log.warning("CUDA graph capture failed; running the model eagerly", exc_info=True)
        else:
            loaded.predict(torch.zeros(self.warmup_batch, 3, crop, crop, dtype=torch.uint8))
        if self.device_decoder is not None:
            try:
                device_crops([(_SAMPLE_JPEG, read_header(_SAMPLE_JPEG, "warm-up", 10**6))], loaded.preprocessing, self.device_decoder)
            except Exception as exc:  # noqa: BLE001
                if self.image_settings.decode == "gpu":
                    raise ConfigError(f"images.decode is gpu but decoding on {loaded.device} failed: {exc}") from exc
                log.warning("decoding on %s failed (%s); images decode on the CPU", loaded.device, exc)
                self.device_decoder = None

    @contextmanager
    def _task_stream(self) -> Iterator[None]:
        """On a GPU, a CUDA stream of this task thread's own: its decode and copies overlap the
        forward pass another thread is running, instead of queueing behind it."""
        device = self.loaded.device  # type: ignore[union-attr]
        if device.type != "cuda":
            yield
            return
        stream = getattr(self.streams, "stream", None)
        if stream is None:
            stream = self.streams.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield


def _device_decoder(mode: str, device: torch.device) -> Decoder | None:
    """nvJPEG for images.decode gpu, or auto on a CUDA model; None: decode on the CPU."""
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"images.decode is gpu but the model runs on {device}: use auto or cpu there")
    return jpeg_decoder(device)


def _sample_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


_SAMPLE_JPEG = _sample_jpeg()


def build_result(
    uri: str,
    outcome: tuple[list[float], list[int]] | Failure,
    model: LoadedModel,
    truth_pattern: str,
    timings: Timings,
    worker: str | None = None,
) -> ImageResult:
    """One record from a top-k outcome or a failure. Pure."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    ground_truth = parse_truth(uri, truth_pattern)
    if isinstance(outcome, Failure):
        return ImageResult(uri, name, None, (), ground_truth, None, outcome, model.info, timings, worker)
    scores, indices = outcome
    classes = model.classes
    ranked = tuple(
        Prediction(index, classes.wnids[index], classes.labels[index], round(score, 6))
        for score, index in zip(scores, indices, strict=True)
    )
    best = ranked[0]
    return ImageResult(
        uri, name, best, ranked, ground_truth, match_truth(best.wnid, ground_truth), None, model.info, timings, worker
    )


def plugin_name(model: ModelSettings, images: ImageSettings, storage: StorageSettings, warmup_batch: int) -> str:
    """One plugin per distinct configuration: stream workers sharing a cluster with the same
    settings share one resident model (registration is idempotent), and a different model
    gets its own instead of replacing one that batches are using. Credentials are not part
    of a configuration: a rotated secret keeps the same resident model."""
    public = storage.without_credentials()
    material = json.dumps(
        [model.model_dump(mode="json"), images.model_dump(mode="json"), public.model_dump(mode="json"), warmup_batch],
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


def classify_batch(
    plugin: str, uris: list[str], truth_pattern: str, pins: list[list[str | None] | None] | None = None
) -> list[dict[str, Any]]:
    """The Dask task: classify ``uris`` with this worker's resident model ``plugin``; ``pins``
    (``inference.objects.pins``) names the object version each event announced.

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
        resident.ensure_loaded(worker)
        return [result.to_dict() for result in resident.classify(pinned(uris, pins), truth_pattern)]
    finally:
        resident.active_batches -= 1
        resident.last_used = time.monotonic()


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


def plugin_usage(dask_worker: Worker) -> dict[str, tuple[int, float]]:
    """Run on a worker: for each visionstream plugin, (batches running or waiting, seconds since
    last used), both by this worker's own clock. A plugin still loading counts as busy."""
    now = time.monotonic()
    usage: dict[str, tuple[int, float]] = {}
    for name, plugin in dask_worker.plugins.items():
        if not name.startswith(PLUGIN_PREFIX):
            continue
        ready = getattr(plugin, "ready", None)
        loading = ready is None or not ready.is_set()
        active = getattr(plugin, "active_batches", 0) + int(loading)
        usage[name] = (active, now - getattr(plugin, "last_used", now))
    return usage


def model_health(dask_worker: Worker, name: str) -> dict[str, Any]:
    """Run on a worker: whether model plugin ``name`` is loaded there, and why not."""
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return {"loaded": False, "reason": "not registered"}
    return {"loaded": plugin.loaded is not None, "reason": getattr(plugin, "failure", None), "loads": plugin.loads}


def _local_workers(worker: Worker) -> int:
    """Workers sharing this machine's cores, so torch threads are not oversubscribed."""
    return int(os.environ.get("VISIONSTREAM_LOCAL_WORKERS", "1") or 1)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
