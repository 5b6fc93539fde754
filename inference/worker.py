"""Dask worker side: the plugin that keeps the model resident, and the batch task.

Each worker builds the model once, in ``ResidentModel.setup``; ``classify_batch`` tasks
use it and never rebuild it. A worker runs two task threads: while one batch holds the
model (one at a time, under a lock), the next batch is fetched and decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from distributed import Worker, WorkerPlugin, get_worker

from inference.errors import ImageError, ModelNotResident
from inference.fetch import fetch_many
from inference.images import decode, preprocess
from inference.labels import match_truth, parse_truth
from inference.model import LoadedModel, load_model, top_k
from inference.results import Failure, ImageResult, Prediction, Timings
from inference.settings import ImageSettings, ModelSettings, StorageSettings, load_settings

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "visionstream-model-"


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
        self.active_batches = 0
        self.last_used = time.monotonic()

    def setup(self, worker: Worker) -> None:
        self.storage_settings = with_local_credentials(self.storage_settings)
        cores = os.cpu_count() or 1
        self.torch_threads = max(1, cores // max(1, _local_workers(worker)))
        self.loaded = load_model(self.model_settings, self.storage_settings)
        self.loads += 1
        self.model_lock = threading.Lock()
        threads = self.image_settings.decode_threads or cores
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="visionstream-decode")
        self.worker_address = worker.address
        if self.model_settings.compile:
            self._warm_up()

    def teardown(self, worker: Worker) -> None:
        pool = getattr(self, "decode_pool", None)  # absent when setup failed
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.loaded = None

    def classify(self, uris: list[str], truth_pattern: str) -> list[ImageResult]:
        assert self.loaded is not None, "ResidentModel used before setup"
        loaded = self.loaded
        started = time.perf_counter()
        fetched = fetch_many(uris, self.storage_settings, self.image_settings)
        fetched_at = time.perf_counter()
        tensors = list(self.decode_pool.map(self._prepare, uris, fetched))
        decoded_at = time.perf_counter()
        good = [index for index, item in enumerate(tensors) if isinstance(item, torch.Tensor)]
        scores = indices = None
        inference_failure: str | None = None
        with self.model_lock:
            locked_at = time.perf_counter()
            # OpenMP thread counts are per calling thread, and Dask's nannies export
            # OMP_NUM_THREADS=1: set it in the task thread that runs the model.
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            if good:
                try:
                    logits = loaded.predict(torch.stack([tensors[i] for i in good]))
                    scores, indices = top_k(logits, self.model_settings.top_k)
                except Exception as exc:  # noqa: BLE001 - out of memory, bad kernel: every image says so
                    log.exception("inference failed for a batch of %d", len(good))
                    inference_failure = f"{type(exc).__name__}: {exc}"
        done_at = time.perf_counter()
        timings = Timings(
            fetch_ms=_ms(started, fetched_at),
            decode_ms=_ms(fetched_at, decoded_at),
            queue_ms=_ms(decoded_at, locked_at),
            inference_ms=_ms(locked_at, done_at),
            batch_size=len(uris),
        )
        outcomes: list[Any] = list(tensors)
        for row, index in enumerate(good):
            if inference_failure is not None:
                outcomes[index] = Failure("inference", inference_failure)
            else:
                outcomes[index] = (scores[row].tolist(), indices[row].tolist())  # type: ignore[index]
        return [
            build_result(uri, outcome, loaded, truth_pattern, timings, self.worker_address)
            for uri, outcome in zip(uris, outcomes, strict=True)
        ]

    def _prepare(self, uri: str, data: bytes | ImageError) -> torch.Tensor | Failure:
        if isinstance(data, ImageError):
            return Failure(data.stage, data.reason)
        spec = self.loaded.preprocessing  # type: ignore[union-attr]
        try:
            image = decode(
                data,
                uri,
                self.image_settings.max_pixels,
                spec.resize_size if self.image_settings.draft else None,
            )
            return preprocess(image, spec)
        except ImageError as exc:
            return Failure(exc.stage, exc.reason)
        except Exception as exc:  # noqa: BLE001 - one bad image never fails its batch
            return Failure("decode", f"{type(exc).__name__}: {exc}")

    def _warm_up(self) -> None:
        """Pay torch.compile's cost at start-up, for the batch size the stream sends, not on the first batch."""
        spec = self.loaded.preprocessing  # type: ignore[union-attr]
        torch.set_num_threads(self.torch_threads)
        self.loaded.predict(torch.zeros(self.warmup_batch, 3, spec.crop_size, spec.crop_size))  # type: ignore[union-attr]


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


def classify_batch(plugin: str, uris: list[str], truth_pattern: str) -> list[dict[str, Any]]:
    """The Dask task: classify ``uris`` with this worker's resident model ``plugin``.

    Returns plain JSON-ready dicts (no tensors, nothing pickled beyond Dask's own transport).
    Raises ModelNotResident where the plugin is missing (the scheduler restarted and the
    worker re-registered without it): the client registers it again and retries.
    """
    worker = get_worker()
    resident = worker.plugins.get(plugin)
    if resident is None or resident.loaded is None:
        raise ModelNotResident(plugin, worker.address)
    resident.active_batches += 1
    try:
        return [result.to_dict() for result in resident.classify(uris, truth_pattern)]
    finally:
        resident.active_batches -= 1
        resident.last_used = time.monotonic()


def plugin_usage(dask_worker: Worker) -> dict[str, tuple[int, float]]:
    """Run on a worker: for each visionstream plugin, (batches running, seconds since last used)."""
    now = time.monotonic()
    return {
        name: (getattr(plugin, "active_batches", 0), now - getattr(plugin, "last_used", now))
        for name, plugin in dask_worker.plugins.items()
        if name.startswith(PLUGIN_PREFIX)
    }


def _local_workers(worker: Worker) -> int:
    """Workers sharing this machine's cores, so torch threads are not oversubscribed."""
    return int(os.environ.get("VISIONSTREAM_LOCAL_WORKERS", "1") or 1)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
