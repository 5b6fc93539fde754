"""Decode micro-benchmark: how fast bytes become the model's uint8 crops, and on how many cores.

    python -m benchmarks.decode [--images N] [--workers 1,2,4,8,16] [--source DIR] [--output DIR]

1. **Per image, one core**, by JPEG size: torchvision.io.decode_jpeg + tensor resize/crop,
   Pillow draft mode + tensor resize/crop, and the former Pillow path (decode, Pillow resize,
   float normalise). Decides which path ``images.decode_crop`` takes for large JPEGs.
2. **Threads against processes** for the CPU path (``images.decode_crop``) with k workers:
   a thread pool (what a Dask worker's decode pool is) and a process pool (bytes out, crops
   back, as a separate pool would have to do). Pools are started and warmed before timing.
3. **On the GPU** where there is one: batches of 60 through nvJPEG + resize/crop on the device
   (``inference.worker.gpu``), from 1 and from several task threads at once.

Each figure is the median of ``--repeats`` timed passes (min and max in the JSON). Writes
decode.json and decode.md under --output and prints the tables.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from benchmarks.machine import cpu_name
from inference.worker.images import Preprocessing, as_bytes_tensor, decode, decode_crop, preprocess, read_header, resize_crop
from streams.embedded.samples import image_size, synthetic_photo

SPEC = Preprocessing(resize_size=232, crop_size=224)  # ResNet50's IMAGENET1K_V2 transforms
SIZES = ((440, 390), (800, 600), (1600, 1200), (4000, 3000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="generated photo-like JPEGs for the pool figures (default 240)")
    parser.add_argument("--source", help="a folder of images instead")
    parser.add_argument("--workers", default=None, help="pool sizes to try, comma-separated (default: 1, 2, 4, ... up to the cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sizes", action="store_true", help="skip the per-size comparison")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else _powers(cores)
    data = _load(args.source, args.images)
    results: dict[str, Any] = {"cores": cores, "cpu": cpu_name(), "images": len(data), "torch": torch.__version__}
    if not args.skip_sizes:
        results["per_image_ms"] = by_size(args.repeats)
    results["pools"] = pools(data, workers, args.repeats)
    if torch.cuda.is_available():
        results["gpu"] = {"name": torch.cuda.get_device_name(0), **on_gpu(data, args.repeats)}
    results["verdict"] = verdict(results)
    text = table(results)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(results, indent=2))
    (out / "decode.md").write_text(text + "\n")
    print(text)
    return 0


def _powers(cores: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= cores:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == cores else [*sizes, cores]


def _load(source: str | None, count: int) -> list[bytes]:
    if source:
        paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
        return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(7)
    return [_jpeg(synthetic_photo(rng, *image_size(rng))) for _ in range(count)]


def _jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _timed(run: Callable[[], Any], repeats: int) -> list[float]:
    run()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def _summary(count: int, times: list[float]) -> dict[str, float]:
    rates = sorted(count / t for t in times)
    return {"images_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1]}


# --- 1. per image, one core ---------------------------------------------------------------------


def _torchvision_path(data: bytes) -> torch.Tensor:
    return resize_crop(decode_jpeg(as_bytes_tensor(data), mode=ImageReadMode.RGB), SPEC)


def _draft_path(data: bytes) -> torch.Tensor:
    return resize_crop(F.pil_to_tensor(decode(data, "x", 10**9, SPEC.resize_size)), SPEC)


def _former_path(data: bytes) -> torch.Tensor:
    return preprocess(decode(data, "x", 10**9, SPEC.resize_size), SPEC)


def by_size(repeats: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    out: dict[str, dict[str, float]] = {}
    for width, height in SIZES:
        data = _jpeg(synthetic_photo(rng, width, height))
        rounds = max(3, int(40 * 440 * 390 / (width * height)))
        row = {}
        for name, path in (("torchvision_io", _torchvision_path), ("pillow_draft", _draft_path), ("former_pillow", _former_path)):
            times = _timed(lambda path=path: [path(data) for _ in range(rounds)], repeats)
            row[name] = statistics.median(times) / rounds * 1000
        out[f"{width}x{height}"] = row
    return out


# --- 2. threads against processes ------------------------------------------------------------


def _one_thread() -> None:
    torch.set_num_threads(1)


def _crop(data: bytes) -> torch.Tensor | str:
    try:
        return decode_crop(data, "x", SPEC, 10**9)
    except Exception as exc:  # noqa: BLE001 - counted, not raised
        return str(exc)


def _crops(chunk: list[bytes]) -> list[np.ndarray | str]:
    """In a pool process: crops go back as numpy arrays (pickled bytes through the pipe), not
    tensors, whose pickling would open a shared-memory segment per crop."""
    return [crop.numpy() if isinstance(crop, torch.Tensor) else crop for crop in map(_crop, chunk)]


def pools(data: list[bytes], workers: list[int], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {"threads": {}, "processes": {}}
    for count in workers:
        with ThreadPoolExecutor(count, initializer=_one_thread) as threads:
            out["threads"][str(count)] = _summary(len(data), _timed(lambda: list(threads.map(_crop, data)), repeats))
        with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as processes:
            chunk = max(1, len(data) // (count * 4))
            out["processes"][str(count)] = _summary(len(data), _timed(lambda: _in_chunks(processes, data, chunk), repeats))
    return out


def _in_chunks(pool: Executor, data: list[bytes], size: int) -> list[Any]:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return [crop for part in pool.map(_crops, chunks) for crop in part]


# --- 3. on the GPU ---------------------------------------------------------------------------------


def on_gpu(data: list[bytes], repeats: int) -> dict[str, Any]:
    from inference.worker.gpu import batch_on, device_crops, jpeg_decoder

    device = torch.device("cuda")
    decoder = jpeg_decoder(device)
    items = [(d, read_header(d, "x", 10**9)) for d in data]
    batches = [items[i : i + 60] for i in range(0, len(items), 60)]
    streams: dict[int, torch.cuda.Stream] = {}

    def one(batch: list[Any]) -> None:
        stream = streams.setdefault(threading.get_ident(), torch.cuda.Stream(device))
        with torch.cuda.stream(stream):
            crops = device_crops(batch, SPEC, decoder)
            batch_on([c for c in crops if c is not None], device)
            stream.synchronize()

    out: dict[str, Any] = {}
    for threads in (1, 2, 4):
        with ThreadPoolExecutor(threads) as pool:
            out[f"nvjpeg_batches_of_60_threads_{threads}"] = _summary(len(data), _timed(lambda: list(pool.map(one, batches)), repeats))
    return out


# --- report ---------------------------------------------------------------------------------------


def verdict(results: dict[str, Any]) -> str:
    threads, processes = results["pools"]["threads"], results["pools"]["processes"]
    widest = max(threads, key=int)
    t, p = threads[widest]["images_per_s"], processes[widest]["images_per_s"]
    choice = "threads" if t >= 0.9 * p else "processes"
    return (
        f"{widest} workers: threads {t:.0f} img/s, processes {p:.0f} img/s "
        f"({t / p:.2f}x); threads scale {t / threads['1']['images_per_s']:.1f}x from 1 to {widest}. "
        f"Choice by this measure: {choice}."
    )


def table(results: dict[str, Any]) -> str:
    lines = [f"Decode to uint8 crops: {results['cpu']}, {results['cores']} cores; torch {results['torch']}; {results['images']} images", ""]
    if "per_image_ms" in results:
        lines += ["| JPEG size | torchvision.io + tensor resize (ms) | Pillow draft + tensor resize (ms) | former Pillow path (ms) |", "| --- | ---: | ---: | ---: |"]
        for size, row in results["per_image_ms"].items():
            lines.append(f"| {size} | {row['torchvision_io']:.2f} | {row['pillow_draft']:.2f} | {row['former_pillow']:.2f} |")
        lines.append("")
    lines += ["| workers | threads img/s (min-max) | processes img/s (min-max) |", "| ---: | ---: | ---: |"]
    for count, row in results["pools"]["threads"].items():
        proc = results["pools"]["processes"][count]
        lines.append(f"| {count} | {_fmt(row)} | {_fmt(proc)} |")
    if "gpu" in results:
        lines += ["", f"On {results['gpu']['name']} (nvJPEG + resize/crop on the device):", "", "| task threads | img/s (min-max) |", "| ---: | ---: |"]
        for key, row in results["gpu"].items():
            if key.startswith("nvjpeg"):
                lines.append(f"| {key.rsplit('_', 1)[-1]} | {_fmt(row)} |")
    lines += ["", results["verdict"]]
    return "\n".join(lines)


def _fmt(row: dict[str, float]) -> str:
    return f"{row['images_per_s']:.0f} ({row['min']:.0f}-{row['max']:.0f})"


if __name__ == "__main__":
    sys.exit(main())
