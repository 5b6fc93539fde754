"""Dask worker side, where the model runs: the resident model and what a batch needs beside it.

``BatchRunner`` is built by ``inference.worker.ResidentModel`` (the plugin) once per worker, and
only there: this module imports torch, torchvision and the decoders, which a stream worker never
needs. A worker runs several task threads: while one batch holds the model (one at a time, under
a lock), the next is fetched and decoded (on the GPU where the model is on one, each task thread
on a CUDA stream of its own) and the last one's results go back. Crops travel as uint8 and are
normalised on the model's device.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from PIL import Image

from inference.compiled import BackgroundCompile, compiled_shapes, compiles
from inference.errors import ConfigError, ImageError
from inference.fetch import fetch_many
from inference.gpu import Decoder, batch_on, device_crops, device_decodable, jpeg_decoder
from inference.images import ImageHeader, decode_crop, read_header
from inference.labels import match_truth, parse_truth
from inference.model import GraphedModel, LoadedModel, load_model, top_k
from inference.results import Failure, ImageResult, Prediction, Timings
from inference.settings import ImageSettings, ModelSettings, StorageSettings

log = logging.getLogger(__name__)

# Fault injection for tests and the soak, off unless set in a Dask worker's environment: the
# worker process exits at once when it starts decoding an object whose URI contains this text,
# as a decoder crash would make it. Nothing else reads it.
KILL_SWITCH_ENV = "VISIONSTREAM_FAULT_EXIT_ON"


class BatchRunner:
    """One worker's loaded model, with its decode pool, device decoder and forward pass (eager,
    compiled or a CUDA graph); ``classify`` runs one batch. Built by ``start``, ended by ``close``."""

    def __init__(
        self,
        model: LoadedModel,
        model_settings: ModelSettings,
        image_settings: ImageSettings,
        storage_settings: StorageSettings,
        worker_address: str,
        torch_threads: int,
        warmup_batch: int = 60,
    ) -> None:
        self.loaded = model
        self.model_settings, self.image_settings, self.storage_settings = model_settings, image_settings, storage_settings
        self.worker_address = worker_address
        self.torch_threads = torch_threads
        self.warmup_batch = warmup_batch  # the batch size a compiled model or a CUDA graph is specialised for
        self.model_lock = threading.Lock()
        threads = image_settings.decode_threads or torch_threads
        # one torch thread per decode thread: the pool itself is the parallelism
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="visionstream-decode", initializer=torch.set_num_threads, initargs=(1,))
        self.exit_on = os.environ.get(KILL_SWITCH_ENV) or None
        self.device_decoder = _device_decoder(image_settings.decode, model.device)
        self.predict: Callable[[torch.Tensor], torch.Tensor] = model.predict
        self.compiling: BackgroundCompile | None = None  # the compiled forward being found or built, where it is
        self.closed = False
        self.streams = threading.local()

    @classmethod
    def start(
        cls,
        model_settings: ModelSettings,
        image_settings: ImageSettings,
        storage_settings: StorageSettings,
        worker_address: str,
        torch_threads: int,
        warmup_batch: int = 60,
    ) -> BatchRunner:
        """Build the model and everything a batch needs, warmed up; blocking (seconds to minutes).
        On the CPU, a compiled forward (``inference.compiled``) is built in a process of its own
        while batches run eagerly, and switched in between batches."""
        model = load_model(model_settings, storage_settings)
        runner = cls(model, model_settings, image_settings, storage_settings, worker_address, torch_threads, warmup_batch)
        try:
            if model.device.type == "cuda":
                runner._warm_up(model)
        except BaseException:
            runner.close()
            raise
        if compiles(model_settings.compile, model.device):
            shapes = compiled_shapes(warmup_batch, torch_threads)
            log.info(
                "model %s runs eagerly on cpu at %s while its compiled forward (shapes %s) is loaded or built (model.compile: %s)",
                model.info.name, model.precision, "+".join(map(str, shapes)), model_settings.compile,
            )
            runner.compiling = BackgroundCompile(
                model, shapes, model_settings.compile_cache_dir, runner.use, torch_threads, model_settings.compile,
                memory_mb=model_settings.compile_memory_mb, between_batches=runner.model_lock,
            ).start()
        else:
            how = "as a CUDA graph" if runner.forward_path == "cuda-graph" else "eagerly"
            log.info("model %s runs %s on %s at %s", model.info.name, how, model.device, model.precision)
        return runner

    @property
    def forward_path(self) -> str:
        """How batches run now: compiled, compiling (eager until it is), cuda-graph, torch-compile
        (CUDA with ``model.compile: true``) or eager."""
        owner = getattr(self.predict, "__self__", None)
        if isinstance(owner, GraphedModel):
            return "cuda-graph"
        if self.loaded.device.type == "cuda" and self.model_settings.compile is True:
            return "torch-compile"
        if owner is not None and owner is not self.loaded:
            return "compiled"
        return "compiling" if self.compiling is not None and self.compiling.is_alive() else "eager"

    def use(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run batches through ``predict`` from the next one on (the compiled forward); not once
        closed. The compile calls it outside the model's lock: a batch reads ``predict`` once."""
        if not self.closed:
            self.predict = predict

    def close(self) -> None:
        """Stop the decode pool and kill a package build in progress."""
        self.closed = True  # no lock: a batch in flight may hold it for seconds
        if self.compiling is not None:
            self.compiling.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def classify(self, uris: list[str], truth_pattern: str) -> list[ImageResult]:
        """Fetch, decode and classify one batch. Per-image fetch and decode failures become those
        images' records; a failed forward pass (out of memory, a lost device, any exception from
        the model) raises, so that the caller retries the whole batch."""
        loaded = self.loaded
        started = time.perf_counter()
        fetched = fetch_many(uris, self.storage_settings, self.image_settings)
        fetched_at = time.perf_counter()
        # On the CPU, decode takes the model's turn too: decoding beside the forward pass would
        # take cores from its OpenMP threads, which then wait for one another at every operator
        # (measured: the forward ran at 77 % of its speed alone); decoding a batch costs a
        # fraction of its forward pass, and the next batch's fetch still overlaps this one.
        cpu_turn = self.model_lock if loaded.device.type == "cpu" else nullcontext()
        device_turn = nullcontext() if loaded.device.type == "cpu" else self.model_lock
        with self._task_stream(), cpu_turn:
            turn_at = time.perf_counter()
            outcomes = self._prepare_all(uris, fetched)
            good = [index for index, item in enumerate(outcomes) if isinstance(item, torch.Tensor)]
            batch = batch_on([outcomes[i] for i in good], loaded.device) if good else None  # type: ignore[misc]
            if batch is not None and batch.is_cuda:
                torch.cuda.current_stream(batch.device).synchronize()  # decoded and on the device before the model is ours
            decoded_at = time.perf_counter()
            with device_turn:
                locked_at = time.perf_counter()
                # OpenMP thread counts are per calling thread, and Dask's nannies export
                # OMP_NUM_THREADS=1: set it in the task thread that runs the model.
                if torch.get_num_threads() != self.torch_threads:
                    torch.set_num_threads(self.torch_threads)
                logits = self.predict(batch) if batch is not None else None  # raises: not a per-image failure
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
        spec = self.loaded.preprocessing
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
                images = self.image_settings
                header = read_header(data, uri, images.max_pixels, images.max_jpeg_scans, images.decode_timeout_s)
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
            spec = self.loaded.preprocessing
            return decode_crop(data, uri, spec, images.max_pixels, images.draft, images.max_jpeg_scans, images.decode_timeout_s)
        except ImageError as exc:
            return Failure(exc.stage, exc.reason)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the worker's memory, not the image (its pixels are bounded): the batch is retried
        except Exception as exc:  # noqa: BLE001 - one bad image never fails its batch
            return Failure("decode", f"{type(exc).__name__}: {exc}")

    def _warm_up(self, loaded: LoadedModel) -> None:
        """On a GPU, pay start-up costs before the first batch: cudnn's kernel choice and a CUDA
        graph for the batch size the stream sends (or torch.compile's compilation, with
        ``model.compile: true``), and one decode through nvJPEG (when it fails, images decode on
        the CPU instead)."""
        torch.set_num_threads(self.torch_threads)
        crop = loaded.preprocessing.crop_size
        if loaded.device.type == "cuda" and self.model_settings.compile is not True:
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
        device = self.loaded.device
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


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
