"""A batch's images from bytes to uint8 crops: the decode pool, and the device decoder where
the model is on a GPU. On the CPU each decode thread hands its image to a decoder process of its
own (``inference.worker.decoders``, ``images.decode_processes``), killed at the image's deadline.
Whatever a decoder raises for one image is that image's Failure; only the worker's own memory
running out, or no decoder process to be had, fails the batch (which is retried).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from inference.errors import ConfigError, ImageError
from inference.records.results import Failure
from inference.settings import ImageSettings
from inference.worker.decoders import DecoderProcesses
from inference.worker.gpu import Decoder, device_crops, device_decodable, jpeg_decoder
from inference.worker.images import ImageHeader, Preprocessing, decode_crop, read_header

log = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8"  # every JPEG (and MPO) begins with its SOI marker

# Fault injection for tests and the soak, off unless set in a Dask worker's environment: the
# worker process exits at once when it starts decoding an object whose URI contains this text,
# as a decoder crash would make it. Nothing else reads it.
KILL_SWITCH_ENV = "VISIONSTREAM_FAULT_EXIT_ON"


class BatchDecoder:
    """Decodes a batch for one model: ``preprocessing`` on a pool of ``images.decode_threads``
    (default ``threads``) and, for plain JPEGs, on ``device`` where it is a GPU."""

    def __init__(self, settings: ImageSettings, preprocessing: Preprocessing, device: torch.device, threads: int) -> None:
        self.settings = settings
        self.preprocessing = preprocessing
        # one torch thread per decode thread: the pool itself is the parallelism
        self.pool = ThreadPoolExecutor(
            settings.decode_threads or threads, thread_name_prefix="visionstream-decode", initializer=torch.set_num_threads, initargs=(1,),
        )
        self.device = device
        self.device_decoder = _device_decoder(settings.decode, device)
        self.exit_on = os.environ.get(KILL_SWITCH_ENV) or None
        # untrusted bytes on the CPU: in processes this worker kills at the deadline (``decoders``)
        self.processes = DecoderProcesses(settings, preprocessing) if settings.decode_processes else None

    def start(self) -> None:
        """Start the decoder processes' server now, in the background, rather than with the first batch."""
        if self.processes is not None:
            threading.Thread(target=self.processes.prestart, name="visionstream-decoders", daemon=True).start()

    def warm_up(self) -> None:
        """One decode through the device decoder; where it fails, images decode on the CPU
        (ConfigError where ``images.decode`` is gpu)."""
        if self.device_decoder is None:
            return
        try:
            device_crops([(_SAMPLE_JPEG, read_header(_SAMPLE_JPEG, "warm-up", 10**6))], self.preprocessing, self.device_decoder)
        except Exception as exc:  # noqa: BLE001
            if self.settings.decode == "gpu":
                raise ConfigError(f"images.decode is gpu but decoding on {self.device} failed: {exc}") from exc
            log.warning("decoding on %s failed (%s); images decode on the CPU", self.device, exc)
            self.device_decoder = None

    def decode_all(self, uris: list[str], fetched: list[bytes | ImageError]) -> list[torch.Tensor | Failure]:
        """Per image a uint8 crop (on the model's device where it was decoded there) or a Failure.

        With a device decoder, the plain JPEGs decode on the device in one call (up to
        ``images.device_batch_max_pixels`` of them: full-size pictures in device memory) while
        the decode pool takes the rest; what the device refuses joins the pool's share. Only
        data that starts as a JPEG has its header read in this process (a bounded marker walk,
        under the image's deadline); every other format goes to the pool unparsed."""
        if self.device_decoder is None:
            return list(self.pool.map(self.decode_one, uris, fetched))
        outcomes: list[Any] = [None] * len(uris)
        on_device: list[int] = []
        items: list[tuple[bytes, ImageHeader]] = []
        pending: dict[int, Future[torch.Tensor | Failure]] = {}
        device_pixels = 0
        images = self.settings
        for index, (uri, data) in enumerate(zip(uris, fetched, strict=True)):
            if isinstance(data, ImageError):
                outcomes[index] = Failure(data.stage, data.reason)
                continue
            if not data.startswith(JPEG_START):
                # never a device decode: its header is parsed where the decode pool parses it
                # (a decoder process, where a parser that overruns is killed), not here
                pending[index] = self.pool.submit(self.decode_one, uri, data)
                continue
            try:
                header = read_header(data, uri, images.max_pixels, images.max_jpeg_scans, images.decode_timeout_s)
            except Exception as exc:  # noqa: BLE001 - whatever a parser raises, it is this image's alone
                outcomes[index] = _failure(exc, limit=500)
                continue
            pixels = header.width * header.height
            if device_decodable(header, data) and device_pixels + pixels <= images.device_batch_max_pixels:
                device_pixels += pixels
                on_device.append(index)
                items.append((data, header))
            else:
                pending[index] = self.pool.submit(self.decode_one, uri, data)
        if items:
            try:
                crops = device_crops(items, self.preprocessing, self.device_decoder)
            except Exception:  # noqa: BLE001 - anything the device path did not foresee: the CPU path decides
                log.exception("device decode failed for %d images; decoding them on the CPU", len(items))
                crops = [None] * len(items)
            for index, crop in zip(on_device, crops, strict=True):
                if crop is None:
                    pending[index] = self.pool.submit(self.decode_one, uris[index], fetched[index])  # type: ignore[arg-type]
                else:
                    outcomes[index] = crop
        for index, future in pending.items():
            outcomes[index] = future.result()
        return outcomes

    def decode_one(self, uri: str, data: bytes | ImageError) -> torch.Tensor | Failure:
        """The CPU path for one image: a uint8 crop on the CPU, or its Failure."""
        if isinstance(data, ImageError):
            return Failure(data.stage, data.reason)
        if self.exit_on is not None and self.exit_on in uri:
            log.critical("fault injection: %s=%r matches %r; exiting", KILL_SWITCH_ENV, self.exit_on, uri)
            os._exit(70)
        if self.processes is not None:
            return self.processes.decode(uri, data)  # raises DecoderUnavailable only: the batch is retried
        images = self.settings
        try:
            return decode_crop(data, uri, self.preprocessing, images.max_pixels, images.draft, images.max_jpeg_scans, images.decode_timeout_s)
        except Exception as exc:  # noqa: BLE001 - one bad image never fails its batch
            return _failure(exc)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()


def _failure(exc: Exception, limit: int | None = None) -> Failure:
    """One image's decode failure; the worker's own memory running out is not the image's (its
    pixels are bounded): that fails the batch, which is retried."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        raise exc
    if isinstance(exc, ImageError):
        return Failure(exc.stage, exc.reason)
    return Failure("decode", f"{type(exc).__name__}: {exc}"[:limit])


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
