"""Memory and time of reconcile's index per million object versions (no broker: the records
are built here and fed through the same ``account`` the topic reader calls).

    .venv/bin/python -m benchmarks.reconcile_memory --versions 1000000

Prints the CPU, the frozen index's bytes, the peak Python allocation while building it
(tracemalloc), and records/s. The listing side holds one page (1,000 keys) at a time.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from benchmarks.machine import cpu_name
from inference.settings import EventSettings, FilterSettings
from streams.service.reconcile import Outcomes, account


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=1_000_000)
    args = parser.parse_args()
    filter, limits = FilterSettings(), EventSettings()
    template = {"schema": "visionstream.prediction/v1", "prediction": {"label": "Chihuahua", "score": 0.9}}
    accounted = Outcomes()
    tracemalloc.start()
    started = time.perf_counter()
    for index in range(args.versions):
        record = dict(template, uri=f"s3://images/dogs/Images/n02085620-Chihuahua/n02085620_{index:08d}.jpg", etag=f"{index:032x}")
        account(accounted, json.dumps(record).encode(), True, filter, limits)
    accounted.freeze()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    probe = time.perf_counter()
    hits = sum(accounted.missing(f"s3://images/dogs/Images/n02085620-Chihuahua/n02085620_{i:08d}.jpg", f"{i:032x}") is None for i in range(10_000))
    lookup_us = (time.perf_counter() - probe) / 10_000 * 1e6
    assert hits == 10_000
    print(json.dumps({
        "cpu": cpu_name(), "versions": args.versions, "index_bytes": accounted.nbytes,
        "index_bytes_per_million": round(accounted.nbytes / args.versions * 1e6),
        "peak_alloc_bytes": peak, "peak_alloc_bytes_per_million": round(peak / args.versions * 1e6),
        "records_per_s": round(args.versions / elapsed), "lookup_us": round(lookup_us, 1),
    }))


if __name__ == "__main__":
    main()
