"""JPEG decode and crops on the model's CUDA device (nvJPEG), and one batch on that device.

A batch's plain JPEGs decode in one ``decode_jpeg(list, device="cuda")`` call, then resize,
crop (and, on the model's device, normalise) there, equal to the weights' transforms within
rounding. decode_jpeg returns nothing when any image of the list fails, so a failed batch is
retried one image at a time to find which; those, and what the header already rules out (other
formats, CMYK, truncated files), take the CPU path (``images.decode_crop``), which reports what is wrong. The
code is device-agnostic: with ``device="cpu"`` it runs on libjpeg-turbo, which is how the unit
tests check it without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from inference.worker.images import ImageHeader, Preprocessing, as_bytes_tensor, orient, resize_crop

Decoder = Callable[[list[Tensor]], list[Tensor]]


def jpeg_decoder(device: torch.device | str) -> Decoder:
    """decode_jpeg for a list of encoded images, to RGB on ``device`` (nvJPEG on CUDA)."""
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB, device=device)


def device_decodable(header: ImageHeader, data: bytes) -> bool:
    """Worth trying on the device: a JPEG whose colours decode the same there (YCbCr or gray)
    and that ends where a JPEG ends (its EOI marker). A truncated JPEG, or one with bytes after
    its end, takes the CPU path: libjpeg-turbo and Pillow say what is wrong with it, where a
    lenient GPU decoder might hand back a half-grey picture to classify."""
    return header.plain_jpeg and data.endswith(b"\xff\xd9")


def decode_each(encoded: list[Tensor], decoder: Decoder) -> list[Tensor | Exception]:
    """Decode the list in one call; if that fails, each image alone, so that one bad image
    costs only itself the device path. The exception stands in for each image that fails."""
    if not encoded:
        return []
    try:
        return list(decoder(encoded))
    except RuntimeError as exc:
        if len(encoded) == 1:
            return [exc]
    results: list[Tensor | Exception] = []
    for item in encoded:
        try:
            results.append(decoder([item])[0])
        except RuntimeError as exc:
            results.append(exc)
    return results


def device_crops(
    items: Sequence[tuple[bytes, ImageHeader]], spec: Preprocessing, decoder: Decoder
) -> list[Tensor | None]:
    """Upright uint8 crops [3, crop, crop] where ``decoder`` puts them, in order; None for each
    image the decoder refused (the caller sends those down the CPU path)."""
    decoded = decode_each([as_bytes_tensor(data) for data, _ in items], decoder)
    return [
        resize_crop(orient(image, header.orientation), spec) if isinstance(image, Tensor) else None
        for image, (_, header) in zip(decoded, items, strict=True)
    ]


def _on(tensor: Tensor, device: torch.device) -> bool:
    """``cuda`` names the current device: a tensor on ``cuda:0`` is on it."""
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def batch_on(crops: Sequence[Tensor], device: torch.device) -> Tensor:
    """One batch [n, ...] on ``device``, in the order given. Crops already there stay; the
    others are stacked on the host and travel together, through pinned memory to a GPU,
    without blocking the host."""
    away = [index for index, item in enumerate(crops) if not _on(item, device)]
    if not away:
        return torch.stack(list(crops))
    moved = torch.stack([crops[index] for index in away])
    if device.type == "cuda":
        moved = moved.pin_memory()
    moved = moved.to(device, non_blocking=True)
    if len(away) == len(crops):
        return moved
    here = [index for index in range(len(crops)) if _on(crops[index], device)]
    batch = torch.empty((len(crops), *moved.shape[1:]), dtype=moved.dtype, device=device)
    batch[torch.tensor(away, device=device)] = moved
    batch[torch.tensor(here, device=device)] = torch.stack([crops[index] for index in here])
    return batch
