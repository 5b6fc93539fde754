"""What one more stream worker costs: its resident memory, and its time from start to /readyz 200.

    .venv/bin/python -m benchmarks.stream_worker_footprint [--starts 3]

Runs the embedded broker and S3 server, a standalone Dask scheduler and worker, and starts
`visionstream worker` (as a replica would start: the model already resident on the Dask
worker, from a first start that is not counted) ``--starts`` times, one after another. Prints
the CPU, each start's seconds to /readyz 200 and the process's resident memory then (VmRSS)
and at its peak (VmHWM), and whether torch was loaded in it (/proc/PID/maps).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.machine import cpu_name
from inference.settings import Settings
from streams.embedded.stack import (
    EMBEDDED_BROKER_KAFKA, S3_TEST_CREDENTIALS, EmbeddedStack, free_port, start_dask_scheduler, start_dask_worker, start_stream_worker,
)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def memory_mb(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {name: round(int(fields[name].split()[0]) / 1024, 1) for name in ("VmRSS", "VmHWM")}


def one_start(settings: Settings, workdir: Path, name: str) -> dict[str, object]:
    started = time.perf_counter()
    process = start_stream_worker(settings, workdir, name, "WARNING")
    try:
        while not ready(settings.worker.web_port):
            if process.poll() is not None:
                raise SystemExit(f"the stream worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.05)
        seconds = round(time.perf_counter() - started, 2)
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        return {"ready_s": seconds, **memory_mb(process.pid), "torch_loaded": "libtorch" in maps}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, EmbeddedStack(log_dir=Path(scratch) / "logs") as stack:
        workdir = Path(scratch)
        env = os.environ | S3_TEST_CREDENTIALS
        scheduler = start_dask_scheduler(workdir / "logs", env=env)
        dask_worker = start_dask_worker(f"tcp://127.0.0.1:{scheduler.port}", workdir / "logs", env=env)
        try:
            settings = Settings().with_overrides({
                "model": {"name": "resnet50", "weights": "none"},
                "kafka": {"bootstrap_servers": stack.bootstrap_servers, "consumer_group": "footprint", **EMBEDDED_BROKER_KAFKA},
                "storage": stack.storage_settings(),
                "cluster": {"scheduler": f"tcp://127.0.0.1:{scheduler.port}"},
                "worker": {"web_port": free_port(), "data_dir": str(workdir / "data")},
            })
            warm = one_start(settings, workdir, "warm-up")  # loads the model on the Dask worker
            runs = [one_start(settings, workdir, f"start-{index}") for index in range(args.starts)]
        finally:
            dask_worker.stop()
            scheduler.stop()
    print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "first_start_with_model_load": warm, "starts": runs}, indent=2))


if __name__ == "__main__":
    main()
