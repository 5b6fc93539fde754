"""`make bench`: the tutorial's method, `visionstream classify`, the stream path and the ceiling,
on the same images and the same kind of Dask cluster, in one run.

    python -m benchmarks.run [--images N] [--source DIR] [--device cpu|cuda] [--precision P]

Writes benchmarks/results/latest.md, latest.json and stage_breakdown.png, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from inference.cluster import InferenceCluster
from inference.evaluation import percentile
from inference.images import decode, preprocess
from inference.job import classify_all
from inference.model import load_model, resolve_device, resolve_precision
from inference.results import ImageResult
from inference.samples import generate_dataset
from inference.settings import Settings
from inference.sources import iter_sources

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    parser.add_argument("--source", help="a folder of real images instead (Stanford Dogs layout)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model once per worker")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    from streams.stack import S3_TEST_CREDENTIALS

    os.environ.update(S3_TEST_CREDENTIALS)  # before the Dask workers start: they read the embedded S3 server

    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory(prefix="visionstream-bench-") as scratch:
        work = Path(scratch)
        folder = Path(args.source) if args.source else work / "images"
        if not args.source:
            say(f"generating {args.images} Stanford-Dogs-like images (200-800 px, JPEG q90) ...")
            generate_dataset(folder, args.images, seed=1)
        paths = sorted(str(p) for p in iter_sources([str(folder)], Settings().storage))
        checkpoint = work / "resnet50.pt"
        torch.manual_seed(0)
        import torchvision

        torch.save(torchvision.models.resnet50().state_dict(), checkpoint)  # same weights for every method
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        settings = Settings().with_overrides({
            "model": {"weights": str(checkpoint), "device": str(device), "precision": precision, "compile": args.compile},
            "batch": {"size": args.batch_size},
        })
        results: dict[str, Any] = {"machine": machine(device, precision), "images": len(paths), "batch_size": args.batch_size}

        say("measuring the ceiling: the model alone on pre-decoded tensors, and decode alone ...")
        results["ceiling"] = ceiling(settings, paths)

        if device.type == "cuda":
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(threads_per_worker=2, dashboard_address=":0", ip="127.0.0.1")
        else:
            cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=":0")
        try:
            settings = settings.with_overrides({"cluster": {"scheduler": cluster.scheduler_address}})
            if not args.skip_tutorial:
                say("running the tutorial's method (dask.delayed, model rebuilt per batch, pickles) ...")
                from benchmarks import tutorial

                classes = [f"{i}: {name}" for i, name in enumerate(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])]
                with Client(cluster.scheduler_address) as client:
                    out = work / "pickles"
                    out.mkdir()
                    started = time.perf_counter()
                    done = tutorial.run(client, paths, str(checkpoint), classes, str(out))
                    elapsed = time.perf_counter() - started
                results["tutorial"] = {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}
            say("running visionstream classify on the same cluster ...")
            results["classify"], records = asyncio.run(classify(settings, paths))
            results["stages"] = {"classify": stage_breakdown(records)}
            if not args.skip_stream:
                say("running the stream path on the embedded broker and S3 server ...")
                results["stream"], results["stages"]["stream"] = stream(settings, folder, work, len(paths))
        finally:
            cluster.close()
    ratios(results)
    write(results, Path(args.output))
    return 0


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def machine(device: torch.device, precision: str) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "device": str(device),
        "precision": precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def ceiling(settings: Settings, paths: list[str]) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(settings.model)
    spec = model.preprocessing
    sample = [Path(p).read_bytes() for p in paths[: min(len(paths), 120)]]
    started = time.perf_counter()
    tensors = [preprocess(decode(data, "x", settings.images.max_pixels, spec.resize_size), spec) for data in sample]
    decode_per_core = len(sample) / (time.perf_counter() - started)
    size = settings.batch.size
    batch = torch.stack((tensors * (size // len(tensors) + 1))[:size])
    model.predict(batch)  # warm-up
    rounds = 3 if model.device.type == "cpu" else 20
    started = time.perf_counter()
    for _ in range(rounds):
        model.predict(batch)
    model_alone = rounds * size / (time.perf_counter() - started)
    return {"model_images_per_s": model_alone, "decode_images_per_s_per_core": decode_per_core}


async def classify(settings: Settings, paths: list[str]) -> tuple[dict[str, Any], list[ImageResult]]:
    records: list[ImageResult] = []
    async with InferenceCluster.from_settings(settings) as cluster:
        await cluster.classify(paths[:2])  # the model is resident from here on; the timed run pays no start-up
        in_flight = sum((await cluster.threads()).values()) + 1
        tally = await classify_all(cluster, paths, settings.batch.size, in_flight, records.append)
    return {"images": tally.images, "errors": tally.errors, "seconds": tally.elapsed_s, "images_per_s": tally.images_per_s}, records


def stage_breakdown(records: list[ImageResult]) -> dict[str, float]:
    batches = {(r.worker, r.timings.fetch_ms, r.timings.inference_ms): r.timings for r in records}.values()
    return {
        stage: statistics.mean(getattr(t, f"{stage}_ms") for t in batches) if batches else 0.0
        for stage in ("fetch", "decode", "queue", "inference")
    }


def stream(settings: Settings, folder: Path, work: Path, count: int) -> tuple[dict[str, Any], dict[str, float]]:
    from streams.demo import collect, stop, wait_ready
    from streams.stack import EMBEDDED_BROKER_KAFKA
    from streams.kafka import ensure_topics
    from streams.stack import EmbeddedStack, free_port
    from streams.uploads import create_bucket, upload_paths

    with EmbeddedStack(log_dir=work / "logs") as stack:
        settings = settings.with_overrides({
            "kafka": {"bootstrap_servers": stack.bootstrap_servers, **EMBEDDED_BROKER_KAFKA},
            "storage": {"endpoint_url": stack.s3_endpoint, "region": "us-east-1"},
            "worker": {"web_port": free_port(), "data_dir": str(work / "worker-data")},
            "batch": {"linger_s": 1.0},
        })
        config = work / "bench.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
        asyncio.run(ensure_topics(settings.kafka, settings.topics))
        create_bucket(settings.storage, settings.storage.bucket)
        log_path = work / "logs" / "worker.log"
        with open(log_path, "ab") as log:
            worker = subprocess.Popen([sys.executable, "-m", "streams", "worker", "--config", str(config), "--log-level", "WARNING"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(settings, worker, log_path, timeout_s=180)
            asyncio.run(upload_paths([str(folder)], "saturated/", settings, notify=True))
            events = asyncio.run(collect_quiet(collect, settings, count, 600))
            saturated = sustained_rate(events)
            half = max(1.0, saturated / 2)
            moderate = asyncio.run(paced_uploads(settings, folder, half, min(count, int(half * 40) + 1)))
            events_moderate = asyncio.run(collect_quiet(collect, settings, count + moderate, 600))
        finally:
            stop(worker)
    paced = [e for uri, e in events_moderate.items() if "/paced/" in uri]
    latencies = sorted(e["latency_ms"] for e in paced if e.get("latency_ms") is not None)
    timings = [e["timings"] for e in events.values() if e.get("timings")]
    stages = {stage: statistics.mean(t[f"{stage}_ms"] for t in timings) if timings else 0.0 for stage in ("fetch", "decode", "queue", "inference")}
    total_latency = [e["latency_ms"] for e in events.values() if e.get("latency_ms") is not None]
    stages["wait_and_publish"] = max(0.0, statistics.mean(total_latency) - sum(stages.values())) if total_latency else 0.0
    return {
        "saturated_images_per_s": saturated,
        "paced_rate_per_s": half,
        "paced_images": len(paced),
        "latency_ms": {q: percentile(latencies, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "linger_s": settings.batch.linger_s,
    }, stages


async def collect_quiet(collect: Any, settings: Settings, expected: int, timeout_s: float) -> dict[str, Any]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return await collect(settings, expected, timeout_s)


async def paced_uploads(settings: Settings, folder: Path, rate: float, count: int) -> int:
    """Upload ``count`` images at ``rate`` per second, each with its S3 event."""
    from streams.uploads import local_files, upload_paths

    files = [str(path) for path, _ in list(local_files([str(folder)], ""))[:count]]
    started = time.perf_counter()
    for index, path in enumerate(files):
        ahead = index / rate - (time.perf_counter() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
        await upload_paths([path], f"paced/{index}-", settings, notify=True)
    return len(files)


def sustained_rate(events: dict[str, dict[str, Any]]) -> float:
    """Images per second from the first upload event to the last prediction event."""
    from streams.events import parse_time

    predictions = [e for e in events.values() if e["schema"].startswith("visionstream.prediction")]
    first = min(parse_time(e["event_time"]) for e in predictions)
    last = max(parse_time(e["predicted_at"]) for e in predictions)
    return len(predictions) / max((last - first).total_seconds(), 1e-6)


def ratios(results: dict[str, Any]) -> None:
    ceiling_rate = results["ceiling"]["model_images_per_s"]
    classify_rate = results["classify"]["images_per_s"]
    results["classify"]["fraction_of_ceiling"] = classify_rate / ceiling_rate
    if "tutorial" in results:
        results["classify"]["x_tutorial"] = classify_rate / results["tutorial"]["images_per_s"]
    if "stream" in results:
        results["stream"]["fraction_of_ceiling"] = results["stream"]["saturated_images_per_s"] / ceiling_rate
        if "tutorial" in results:
            results["stream"]["x_tutorial"] = results["stream"]["saturated_images_per_s"] / results["tutorial"]["images_per_s"]


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; torch {m['torch']}, {m['device']}, {m['precision']}; "
        f"{results['images']} images, batch {results['batch_size']}",
        "",
        "| method | images/s | x tutorial | of ceiling | latency p50 / p95 / p99 |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    if "tutorial" in results:
        lines.append(f"| tutorial's method (dask.delayed, model per batch) | {results['tutorial']['images_per_s']:.1f} | 1.0x | {results['tutorial']['images_per_s'] / results['ceiling']['model_images_per_s']:.0%} | |")
    c = results["classify"]
    lines.append(f"| visionstream classify | {c['images_per_s']:.1f} | {_x(c.get('x_tutorial'))} | {c['fraction_of_ceiling']:.0%} | |")
    if "stream" in results:
        s = results["stream"]
        lat = s["latency_ms"]
        lat_text = " / ".join("n/a" if lat[q] is None else f"{lat[q]:.0f}" for q in ("p50", "p95", "p99")) + f" ms at {s['paced_rate_per_s']:.1f} img/s"
        lines.append(f"| stream path (saturated; latency paced at half) | {s['saturated_images_per_s']:.1f} | {_x(s.get('x_tutorial'))} | {s['fraction_of_ceiling']:.0%} | {lat_text} |")
    ceiling_ = results["ceiling"]
    lines.append(f"| ceiling: model alone, pre-decoded tensors | {ceiling_['model_images_per_s']:.1f} | | 100% | |")
    lines.append(f"| decode + preprocess alone, one core | {ceiling_['decode_images_per_s_per_core']:.1f} | | | |")
    lines += ["", "Stage breakdown, mean ms per batch:", "", "| path | " + " | ".join(results["stages"]["classify"]) + " | wait + publish |", "| --- |" + " ---: |" * 5]
    for path, stages in results["stages"].items():
        lines.append(f"| {path} | " + " | ".join(f"{stages.get(s, 0):.0f}" for s in ("fetch", "decode", "queue", "inference")) + f" | {stages.get('wait_and_publish', 0):.0f} |")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def write(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (folder / "latest.json").write_text(json.dumps(results, indent=2))
    (folder / "latest.md").write_text(text + "\n")
    chart(results, folder / "stage_breakdown.png")
    print(text)
    say(f"wrote {folder / 'latest.md'}, latest.json, stage_breakdown.png")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("fetch", "decode", "queue", "inference", "wait_and_publish")
    paths = list(results["stages"])
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(paths)
    for stage in stages:
        values = [results["stages"][p].get(stage, 0.0) for p in paths]
        ax.barh(paths, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("ms per batch (mean)")
    ax.set_title("Where a batch's time goes")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
