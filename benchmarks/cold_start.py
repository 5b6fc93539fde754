"""A new machine's first run, timed: from an empty compile cache, how long until the first
prediction and until the Dask worker runs compiled, for `visionstream classify` and for the
stream path (`visionstream demo`), each in a fresh process with the shipped defaults.

    .venv/bin/python -m benchmarks.cold_start [--images 1200] [--count 600]

Each command runs with ``model.compile_cache_dir`` pointed at a new empty directory, its output
read line by line as it comes: the first prediction is the first JSON record (classify) or the
first prediction line (demo); the switch is the worker's ``now runs compiled`` log line (the
first package loaded; a second shape may follow). Prints JSON with the CPU named. Random
weights (nothing is downloaded), which changes nothing of the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
COMPILED = re.compile(r"now runs compiled \(shapes ([\d+]+)")


def timed_run(args: list[str], cache: str, first_line: re.Pattern[str], timeout_s: float) -> dict[str, float | str | None]:
    """Run ``python -m streams ARGS`` and note when each milestone's line appears (either stream)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("VISIONSTREAM_", "AWS_"))}
    env |= {"VISIONSTREAM_MODEL__COMPILE_CACHE_DIR": cache, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    began = time.monotonic()
    seen: dict[str, float | str | None] = {"first_prediction_s": None, "compiled_s": None, "compiled_shapes": None, "full_shapes_s": None}
    process = subprocess.Popen([sys.executable, "-m", "streams", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tempfile.mkdtemp(prefix="visionstream-cold-"), env=env)

    def read(stream) -> None:
        for line in stream:
            now = round(time.monotonic() - began, 1)
            if seen["first_prediction_s"] is None and first_line.search(line):
                seen["first_prediction_s"] = now
            if (found := COMPILED.search(line)) is not None:
                seen["compiled_s"] = seen["compiled_s"] or now
                seen["compiled_shapes"] = found.group(1)
                seen["full_shapes_s"] = now

    readers = [threading.Thread(target=read, args=(stream,), daemon=True) for stream in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    process.wait(timeout_s)
    for reader in readers:
        reader.join(10)
    seen["total_s"] = round(time.monotonic() - began, 1)
    seen["exit_status"] = process.returncode
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200, help="images for classify (default 1200)")
    parser.add_argument("--count", type=int, default=600, help="images for the demo's stream path (default 600)")
    args = parser.parse_args()
    from streams.embedded.samples import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="visionstream-cold-start-"))
    generate_dataset(work / "dogs", args.images)
    out: dict[str, object] = {"cpu": cpu_name(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as cache:
        out["classify"] = timed_run(
            ["classify", str(work / "dogs"), "--weights", "none", "--log-level", "INFO", "--output", "-"],
            cache, re.compile(r'^\{"uri"'), 3600,
        ) | {"images": args.images}
    with tempfile.TemporaryDirectory() as cache:
        out["stream"] = timed_run(
            ["demo", "--count", str(args.count), "--weights", "none", "--timeout", "3000"],
            cache, re.compile(r"\d+(\.\d+)?%\s+truth"), 3600,
        ) | {"images": args.count}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
