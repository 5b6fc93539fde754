"""The CPU forward pass eager and compiled (inference.compiled): images/s, compile time cold and
from a warm cache, and agreement, in one run on this machine.

    .venv/bin/python -m benchmarks.compile_cpu [--model resnet50] [--batch 60] [--precision auto]

Each figure is the best of --runs timed batches after one untimed batch. "cold" compiles into
an empty cache directory; "warm" is a fresh process compiling again from that directory (as a
restarted worker does). Prints JSON with the CPU named; the model has random weights (nothing
is downloaded), which changes nothing of the speed.
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
from inference.compiled import CompiledModel
from inference.model import cpu_has_native_bf16, load_model
from inference.settings import ModelSettings


def rate(predict, batch: torch.Tensor, runs: int) -> float:
    predict(batch)
    best = min(_timed(predict, batch) for _ in range(runs))
    return round(len(batch) / best, 2)


def _timed(predict, batch: torch.Tensor) -> float:
    began = time.perf_counter()
    predict(batch)
    return time.perf_counter() - began


def warm_compile_s(args: argparse.Namespace, cache: str) -> float:
    """Compile again in a fresh process from the cache the first compile filled."""
    code = (
        "import time, torch; from inference.compiled import CompiledModel; from inference.model import load_model; "
        "from inference.settings import ModelSettings; torch.set_num_threads(%d); "
        "m = load_model(ModelSettings(name=%r, weights='none', device='cpu', precision=%r, compile=False)); "
        "t = time.perf_counter(); CompiledModel.compile(m, %d, %r); print(time.perf_counter() - t)"
    ) % (args.threads, args.model, args.precision_resolved, args.batch, cache)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(ModelSettings(name=args.model, weights="none", device="cpu", precision=args.precision, compile=False))
    args.precision_resolved = model.precision
    batch = torch.randint(0, 255, (args.batch, 3, 224, 224), dtype=torch.uint8)
    eager = rate(model.predict, batch, args.runs)
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        fast = CompiledModel.compile(model, args.batch, cache)
        cold = round(time.perf_counter() - began, 1)
        compiled_rate = rate(fast.predict, batch, args.runs)
        warm = warm_compile_s(args, cache)
    reference, got = model.predict(batch), fast.predict(batch)
    print(json.dumps({
        "cpu": cpu_name(), "native_bf16": cpu_has_native_bf16(), "threads": args.threads, "model": args.model,
        "precision": model.precision, "batch": args.batch,
        "eager_images_per_s": eager, "compiled_images_per_s": compiled_rate, "speed-up": round(compiled_rate / eager, 2),
        "compile_cold_s": cold, "compile_warm_cache_s": warm,
        "top1_agreement": float((reference.argmax(1) == got.argmax(1)).float().mean()),
        "max_abs_logit_difference": float((reference - got).abs().max()),
    }, indent=2))


if __name__ == "__main__":
    main()
