"""The CPU forward pass eager and compiled (inference.worker.compiled): images/s, the package's cold
build and its load from the cache in a fresh process, and agreement, in one run on this machine.

    .venv/bin/python -m benchmarks.compile_cpu [--model resnet50] [--batch 60] [--precision auto]

Each rate is the best of --runs timed batches after one untimed batch: a full batch, and four
images (a partial batch, padded to one compiled chunk). "cold" builds the package
into an empty cache directory; "warm" is a fresh process loading it from there and running its
warm-up batch (as a restarted worker does). At bf16 it also times eager bf16 with the weights cast
instead of autocast (the compiled package folds autocast's casts into its constants). Prints
JSON with the CPU named; the model has random weights (nothing is downloaded), which changes
nothing of the speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.machine import cpu_name
from inference.worker.compiled import PackageBuilder, compiled_batch, compiled_model, compiled_shapes
from inference.worker.cpu import cpu_has_native_bf16
from inference.worker.model import load_model
from inference.settings import ModelSettings


def rate(predict, batch: torch.Tensor, runs: int) -> float:
    predict(batch)
    best = min(_timed(predict, batch) for _ in range(runs))
    return round(len(batch) / best, 2)


def _timed(predict, batch: torch.Tensor) -> float:
    began = time.perf_counter()
    predict(batch)
    return time.perf_counter() - began


def warm_load_s(args: argparse.Namespace, cache: str) -> float:
    """Load the package the first build wrote, in a fresh process, up to its warm-up batch done."""
    code = (
        "import time, torch; from inference.worker.compiled import PackageBuilder, compiled_batch, compiled_model, compiled_shapes; from inference.worker.model import load_model; "
        "from inference.settings import ModelSettings; torch.set_num_threads(%d); "
        "m = load_model(ModelSettings(name=%r, weights='none', device='cpu', precision=%r, compile=False)); "
        "t = time.perf_counter(); compiled_model(m, %r, %r); print(time.perf_counter() - t)"
    ) % (args.threads, args.model, args.precision_resolved, args.shapes, cache)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


@torch.inference_mode()
def weights_cast_rate(model, batch: torch.Tensor, runs: int) -> float:
    """Eager bf16 with the module's weights cast to bf16 (no autocast): the other eager option."""
    import copy

    from inference.worker.images import normalize

    module = copy.deepcopy(model.module).to(torch.bfloat16)
    mean, std = model.mean_std

    def predict(crops: torch.Tensor) -> torch.Tensor:
        return module(normalize(crops.contiguous(memory_format=torch.channels_last), mean, std).to(torch.bfloat16)).float()

    return rate(predict, batch, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, help="the compiled chunk shape (default: what a worker compiles, compiled_batch)")
    args = parser.parse_args()
    args.chunk = args.chunk or compiled_batch(args.batch, args.threads)
    args.shapes = (args.chunk,) if args.chunk == args.batch else (args.chunk, args.batch)
    torch.set_num_threads(args.threads)
    model = load_model(ModelSettings(name=args.model, weights="none", device="cpu", precision=args.precision, compile=False))
    args.precision_resolved = model.precision
    batch = torch.randint(0, 255, (args.batch, 3, 224, 224), dtype=torch.uint8)
    eager = rate(model.predict, batch, args.runs)
    extra = {"eager_bf16_weights_cast_images_per_s": weights_cast_rate(model, batch, args.runs)} if model.precision == "bf16" else {}
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        fast = compiled_model(model, args.shapes, cache, builder=PackageBuilder(threads=args.threads))
        cold = round(time.perf_counter() - began, 1)
        compiled_rate = rate(fast.predict, batch, args.runs)
        few = batch[:4]  # a partial batch, as an upload stream at a moderate rate sends: padded to one chunk
        few_eager, few_compiled = rate(model.predict, few, args.runs), rate(fast.predict, few, args.runs)
        warm = warm_load_s(args, cache)
        size_mb = round(sum(path.stat().st_size for path in fast.paths.values()) / 2**20)
        per_call = {f"shape_{shape}_images_per_s": round(shape / cost, 2) for shape, cost in fast.costs_s.items()}
    reference, got = model.predict(batch), fast.predict(batch)
    print(json.dumps({
        "cpu": cpu_name(), "native_bf16": cpu_has_native_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads, "model": args.model, "precision": model.precision, "batch": args.batch, "compiled_shapes": list(args.shapes), **per_call,
        "eager_images_per_s": eager, **extra, "compiled_images_per_s": compiled_rate, "speed-up": round(compiled_rate / eager, 2),
        "four_images_eager_per_s": few_eager, "four_images_compiled_per_s": few_compiled,
        "build_cold_s": cold, "load_warm_s": warm, "package_mb": size_mb,
        "top1_agreement": float((reference.argmax(1) == got.argmax(1)).float().mean()),
        "max_abs_logit_difference": float((reference - got).abs().max()),
    }, indent=2))


if __name__ == "__main__":
    main()
