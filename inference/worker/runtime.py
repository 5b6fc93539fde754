"""Dask worker side, where the model runs: the resident model and what a batch needs beside it.

``BatchRunner`` is built by ``inference.worker.plugin.ResidentModel`` (the plugin) once per worker, and
only there: this module imports torch, torchvision and the decoders, which a stream worker never
needs. A worker runs several task threads: while one batch holds the model (one at a time, under
a lock), the next is fetched and decoded (on the GPU where the model is on one, each task thread
on a CUDA stream of its own) and the last one's results go back. Crops travel as uint8 and are
normalised on the model's device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from inference.records.labels import match_truth, parse_truth
from inference.records.results import Failure, ImageResult, Prediction, Timings
from inference.settings import ImageSettings, ModelSettings, StorageSettings
from inference.worker.decoding import BatchDecoder
from inference.worker.fetch import fetch_many
from inference.worker.forward import ForwardPath
from inference.worker.gpu import batch_on
from inference.worker.model import LoadedModel, load_model, top_k

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """What a worker's runner is built from, beside the model: the settings, where it runs, how
    many threads the forward pass may use, the batch size its warm-up is specialised for."""

    model: ModelSettings
    images: ImageSettings
    storage: StorageSettings
    worker_address: str
    torch_threads: int
    warmup_batch: int = 60


class BatchRunner:
    """One worker's loaded model with its forward pass (``forward``) and decoders (``decoder``);
    ``classify`` runs one batch. Built by ``start``, ended by ``close``."""

    def __init__(self, forward: ForwardPath, decoder: BatchDecoder, storage_settings: StorageSettings, worker_address: str) -> None:
        self.forward = forward
        self.decoder = decoder
        self.loaded = forward.loaded
        self.storage_settings = storage_settings
        self.worker_address = worker_address
        self.streams = threading.local()

    @classmethod
    def start(cls, settings: RunnerSettings) -> BatchRunner:
        """Build the model and everything a batch needs, warmed up; blocking (seconds to minutes).
        On the CPU, a compiled forward (``inference.worker.compiled``) is built in a process of its own
        while batches run eagerly, and switched in between batches."""
        model = load_model(settings.model, settings.storage)
        runner = cls.around(model, settings)
        runner.decoder.start()
        try:
            if model.device.type == "cuda":
                runner.forward.warm_up()
                runner.decoder.warm_up()
        except BaseException:
            runner.close()
            raise
        if not runner.forward.compile_in_background():
            how = "as a CUDA graph" if runner.forward.name == "cuda-graph" else "eagerly"
            log.info("model %s runs %s on %s at %s", model.info.name, how, model.device, model.precision)
        return runner

    @classmethod
    def around(cls, model: LoadedModel, settings: RunnerSettings) -> BatchRunner:
        """A runner for a model already loaded, neither warmed up nor compiling (``start`` does both)."""
        forward = ForwardPath(model, settings.model, settings.torch_threads, settings.warmup_batch)
        decoder = BatchDecoder(settings.images, model.preprocessing, model.device, settings.torch_threads)
        return cls(forward, decoder, settings.storage, settings.worker_address)

    @property
    def forward_path(self) -> str:
        """How batches run now (``ForwardPath.name``)."""
        return self.forward.name

    def close(self) -> None:
        """Stop the decode pool and kill a package build in progress."""
        self.forward.close()
        self.decoder.close()

    def classify(self, uris: list[str], truth_pattern: str) -> list[ImageResult]:
        """Fetch, decode and classify one batch. Per-image fetch and decode failures become those
        images' records; a failed forward pass (out of memory, a lost device, any exception from
        the model) raises, so that the caller retries the whole batch."""
        loaded, forward = self.loaded, self.forward
        started = time.perf_counter()
        fetched = fetch_many(uris, self.storage_settings, self.decoder.settings)
        fetched_at = time.perf_counter()
        # On the CPU, decode takes the model's turn too: decoding beside the forward pass would
        # take cores from its OpenMP threads, which then wait for one another at every operator
        # (measured: the forward ran at 77 % of its speed alone); decoding a batch costs a
        # fraction of its forward pass, and the next batch's fetch still overlaps this one.
        cpu_turn = forward.model_lock if loaded.device.type == "cpu" else nullcontext()
        device_turn = nullcontext() if loaded.device.type == "cpu" else forward.model_lock
        with self._task_stream(), cpu_turn:
            turn_at = time.perf_counter()
            outcomes = self.decoder.decode_all(uris, fetched)
            good = [index for index, item in enumerate(outcomes) if isinstance(item, torch.Tensor)]
            batch = batch_on([outcomes[i] for i in good], loaded.device) if good else None  # type: ignore[misc]
            if batch is not None and batch.is_cuda:
                torch.cuda.current_stream(batch.device).synchronize()  # decoded and on the device before the model is ours
            decoded_at = time.perf_counter()
            with device_turn:
                locked_at = time.perf_counter()
                logits = forward.run(batch) if batch is not None else None  # raises: not a per-image failure
            done_at = time.perf_counter()
        timings = Timings(
            fetch_ms=_ms(started, fetched_at),
            decode_ms=_ms(turn_at, decoded_at),
            queue_ms=_ms(fetched_at, turn_at) + _ms(decoded_at, locked_at),  # waiting for the model's turn
            inference_ms=_ms(locked_at, done_at),
            batch_size=len(uris),
        )
        results: list[Any] = list(outcomes)
        if logits is not None:
            scores, indices = top_k(logits, forward.settings.top_k)
            for row, index in enumerate(good):
                results[index] = (scores[row].tolist(), indices[row].tolist())
        return [
            build_result(str(uri), outcome, loaded, truth_pattern, timings, self.worker_address)  # a plain str goes back
            for uri, outcome in zip(uris, results, strict=True)
        ]

    @contextmanager
    def _task_stream(self) -> Iterator[None]:
        """On a GPU, a CUDA stream of this task thread's own: its decode and copies overlap the
        forward pass another thread is running, instead of queueing behind it."""
        device = self.loaded.device
        if device.type != "cuda":
            yield
            return
        stream = getattr(self.streams, "stream", None)
        if stream is None:
            stream = self.streams.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield


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


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
