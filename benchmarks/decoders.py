"""The cost of decoding in decoder processes (``images.decode_processes``) against decoding in
the worker's threads, on one runner: per batch, the decode time and the whole batch's time.

    python -m benchmarks.decoders [--images 60] [--runs 3] [--precision bf16]

Generated photos (500 x 375 JPEGs, the Stanford Dogs size), random weights, compile off (the
forward pass is the same either way); the two ways alternate, twice each, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from benchmarks.machine import cpu_name
from inference.settings import ImageSettings, ModelSettings, StorageSettings
from inference.worker.runtime import BatchRunner, RunnerSettings


def photos(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        noise = Image.fromarray(rng.integers(0, 255, (94, 125, 3), dtype=np.uint8))
        path = folder / f"n02085620_{index}.jpg"
        noise.resize((500, 375), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = parser.parse_args()
    model = ModelSettings(name="resnet50", weights="none", device="cpu", precision=args.precision, compile=False)
    results: dict[str, list[dict[str, float]]] = {"threads": [], "processes": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = photos(Path(folder), args.images)
        for processes in (False, True, False, True):
            settings = RunnerSettings(model, ImageSettings(decode_processes=processes), StorageSettings(), "tcp://bench:1", 2, args.images)
            runner = BatchRunner.start(settings)
            try:
                runner.classify(paths, r"(?P<wnid>n\d{8})")  # warm: the decoder processes start
                runs = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    records = runner.classify(paths, r"(?P<wnid>n\d{8})")
                    runs.append((records[0].timings.decode_ms, (time.perf_counter() - started) * 1000))
            finally:
                runner.close()
            results["processes" if processes else "threads"].append({"decode_ms": min(r[0] for r in runs), "batch_ms": min(r[1] for r in runs)})
    summary = {way: {key: round(min(run[key] for run in runs), 1) for key in ("decode_ms", "batch_ms")} for way, runs in results.items()}
    print(json.dumps({"cpu": cpu_name(), "images": args.images, "precision": args.precision, **summary}, indent=2))


if __name__ == "__main__":
    main()
